"""Tests of jaxbig.config: loading experiment files, typed overrides, validation, round trips."""

import json
import pathlib
import re

import ml_collections
import pytest

from jaxbig import config as config_lib
from jaxbig.config import ConfigError

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
CNN = str(EXPERIMENTS / 'cnn_digits.py')
MLP = str(EXPERIMENTS / 'mlp_diabetes.py')


def _get(config, key: str):
  """The value at a dotted key."""
  for part in key.split('.'):
    config = config[part]
  return config


def _overridden(*overrides: str) -> ml_collections.ConfigDict:
  """The cnn_digits config with `overrides` applied (not validated)."""
  config = config_lib.load_module_config(CNN)
  config_lib.apply_overrides(config, overrides)
  return config


@pytest.mark.parametrize('override, expected', [
    ('train.steps=7', 7),
    ('opt.lr=0.5', 0.5),
    ('opt.lr=3e-3', 3e-3),
    ('opt.lr=1', 1.0),  # An int given to a float field is fine, and stored as a float.
    ('data.augment_flip=true', True),
    ('data.augment_flip=True', True),
    ('data.normalize_targets=false', False),
    ('data.normalize=feature', 'feature'),
    ('model.features=32,64', (32, 64)),
    ('model.features=(32, 64)', (32, 64)),
    ('model.features=16', (16,)),
])
def test_override_parses_as_declared_type(override, expected):
  key = override.partition('=')[0]
  assert _get(config_lib.load_module_config(CNN), key) != expected  # The override changes it.
  value = _get(_overridden(override), key)
  assert value == expected
  assert type(value) is type(expected)


@pytest.mark.parametrize('override', [
    'train.steps=abc',
    'train.steps=1.5',
    'opt.lr=fast',
    'data.augment_flip=maybe',
    'model.features=a,b',
    'model.features=32,64.5',
])
def test_override_of_wrong_type_raises_naming_key(override):
  key = override.partition('=')[0]
  with pytest.raises(ConfigError, match=re.escape(key)):
    _overridden(override)


def test_unknown_key_raises_naming_it_with_a_close_match():
  with pytest.raises(ConfigError, match=r"'opt\.lrr'.*did you mean 'opt\.lr'"):
    _overridden('opt.lrr=1')
  with pytest.raises(ConfigError, match=r"'optt\.lr'.*did you mean 'opt'"):
    _overridden('optt.lr=1')
  with pytest.raises(ConfigError, match=r"'zzz\.q'") as e:
    _overridden('zzz.q=1')
  assert 'did you mean' not in str(e.value)  # No close match, no suggestion.


@pytest.mark.parametrize('override, message', [
    ('opt.lr', "'opt.lr' is not of the form key=value"),
    ('=1', "'=1' is not of the form key=value"),
    ('opt=1', 'opt: is a section'),
])
def test_malformed_override_raises(override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    _overridden(override)


def test_missing_experiment_file_raises_naming_it(tmp_path):
  path = str(tmp_path / 'nope.py')
  with pytest.raises(ConfigError, match=re.escape(f'experiment file not found: {path}')):
    config_lib.load(path)
  with pytest.raises(ConfigError, match=re.escape(path)):
    config_lib.load(path + ':smoke')


@pytest.mark.parametrize('source, message', [
    ('X = 1\n', 'has no get_config() function'),
    ('def get_config(:\n', 'cannot be imported: SyntaxError'),
    ('def get_config():\n  return {"a": 1}\n', 'must return an ml_collections.ConfigDict'),
])
def test_bad_experiment_file_raises_naming_it(tmp_path, source, message):
  path = tmp_path / 'bad.py'
  path.write_text(source)
  with pytest.raises(ConfigError, match=re.escape(message)) as e:
    config_lib.load(str(path))
  assert str(path) in str(e.value)


@pytest.mark.parametrize('experiment', [CNN, MLP])
def test_smoke_variant_changes_fields(experiment):
  default = config_lib.to_dict(config_lib.load(experiment))
  smoke = config_lib.to_dict(config_lib.load(experiment + ':smoke'))
  changed = config_lib.diff(default, smoke)
  assert {'train.steps', 'train.log_every', 'opt.warmup_steps'} <= set(changed)
  assert smoke['train']['steps'] < default['train']['steps']
  assert 'data.name' not in changed and 'model.name' not in changed


def test_unknown_variant_raises():
  with pytest.raises(ConfigError, match=r"cnn_digits\.py:big: get_config\(\) failed.*'big'"):
    config_lib.load(CNN + ':big')


def test_experiments_validate():
  for spec in (CNN, CNN + ':smoke', MLP, MLP + ':smoke'):
    config_lib.validate(config_lib.load_module_config(spec))


@pytest.mark.parametrize('good, bad, message', [
    ('train.steps=1', 'train.steps=0', 'train.steps must be > 0'),
    ('train.log_every=1', 'train.log_every=-1', 'train.log_every must be > 0'),
    ('train.accum_steps=4', 'train.accum_steps=3', 'must be divisible by train.accum_steps'),
    ('train.eval_every=0', 'train.eval_every=-1', 'train.eval_every must be >= 0'),
    ('data.batch_size=1', 'data.batch_size=0', 'data.batch_size must be > 0'),
])
def test_validate_rejects_bad_values(good, bad, message):
  config_lib.validate(_overridden(good))  # The boundary value passes ...
  with pytest.raises(ConfigError, match=re.escape(message)):  # ... one step past it fails.
    config_lib.validate(_overridden(bad))


def test_load_applies_overrides_and_freezes():
  config = config_lib.load(CNN + ':smoke', ['opt.lr=3e-3', 'model.features=4,8'])
  assert isinstance(config, ml_collections.FrozenConfigDict)
  assert (config.opt.lr, config.model.features) == (3e-3, (4, 8))
  assert config.train.steps == 20  # From the smoke variant.
  with pytest.raises(ConfigError, match='train.steps must be > 0'):
    config_lib.load(CNN, ['train.steps=0'])


def test_to_dict_from_dict_round_trip():
  config = config_lib.load(CNN + ':smoke', ['opt.lr=3e-3'])
  d = config_lib.to_dict(config)
  restored = config_lib.from_dict(json.loads(json.dumps(d)))  # Through JSON, like config.json.
  assert isinstance(restored, ml_collections.FrozenConfigDict)
  assert config_lib.to_dict(restored) == d
  assert restored.model.features == (8, 16)  # Lists in JSON come back as tuples.
  assert (restored.opt.lr, restored.train.steps) == (3e-3, 20)
  assert config_lib.to_dict(config_lib.load(CNN + ':smoke')) != d  # The override survives.


def test_diff_lists_changed_dotted_keys():
  base = config_lib.to_dict(config_lib.load(CNN))
  changed = config_lib.to_dict(config_lib.load(CNN, ['opt.lr=0.1', 'model.features=1,2',
                                                     'seed=3']))
  assert config_lib.diff(base, base) == []
  assert config_lib.diff(base, changed) == ['model.features', 'opt.lr', 'seed']
  assert config_lib.diff({'a': {'b': 1}}, {'a': {'b': 1, 'c': 2}}) == ['a.c']


def test_a_run_saved_with_the_boolean_remat_field_resumes_with_its_new_name(tmp_path):
  """`model.remat` was a boolean; a run saved then (false) resumes under 'none', and its
  checkpoints' fingerprint still matches; 'full' is another config."""
  from jaxbig import workdir
  spec = str(pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'gpt_stdlib.py')
  config = config_lib.load(spec + ':smoke', [])
  assert config.model.remat == 'none'
  saved = config_lib.to_dict(config)
  saved['model']['remat'] = False
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  workdir.check_config(str(tmp_path), config)  # Resumes.
  assert workdir.fingerprint_config(config)['model.remat'] is False
  assert workdir.fingerprint_config(
      config_lib.load(spec + ':smoke', ['model.remat=dots']))['model.remat'] == 'dots'
  with pytest.raises(ConfigError, match=r'different config \(model.remat\)'):
    workdir.check_config(str(tmp_path), config_lib.load(spec + ':smoke', ['model.remat=full']))
