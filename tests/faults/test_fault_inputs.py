"""Bad configs and inputs, one table: each is refused before anything is compiled, with one
line naming the field and exit code 2, and nothing is written to the workdir.

Each row has a good twin, the same command with the one value fixed, which the checks accept
(`test_the_good_twin_is_accepted`): the row's value is what is refused, not the rest."""

import json

import numpy as np
import pytest

import conftest
import fault_helpers as fh
from jaxbig import config as config_lib, train, workdir as workdir_lib

CNN, MLP = fh.CNN, fh.MLP

# name: (experiment, bad overrides, what the message names, good overrides, workdir). Data
# files are {clean_images}, {nan_images}, {clean_table}, {inf_table}, {truncated}; a workdir
# of 'file', 'bad_json' or 'other_model' exists before the command (else it does not).
TABLE = {
    'unknown_nonfinite_mode': (CNN, ['train.on_nonfinite=ignore'], 'train.on_nonfinite',
                               ['train.on_nonfinite=abort'], None),
    'negative_skip_limit': (CNN, ['train.max_consecutive_skips=-1'],
                            'train.max_consecutive_skips', ['train.max_consecutive_skips=0'],
                            None),
    'abort_under_loss_scaling': (CNN, ['precision=fp16', 'train.on_nonfinite=abort'],
                                 'train.on_nonfinite', ['precision=fp16'], None),
    'lr_nan': (CNN, ['opt.lr=nan'], 'opt.lr', ['opt.lr=0.01'], None),
    'lr_inf': (CNN, ['opt.lr=inf'], 'opt.lr', ['opt.lr=1e3'], None),
    'weight_decay_nan': (CNN, ['opt.weight_decay=nan'], 'opt.weight_decay',
                         ['opt.weight_decay=0'], None),
    'clip_norm_inf': (CNN, ['opt.clip_norm=inf'], 'opt.clip_norm', ['opt.clip_norm=0'], None),
    'init_std_inf': (CNN, ['model.init=normal', 'model.init_std=inf'], 'model.init_std',
                     ['model.init=normal', 'model.init_std=1'], None),
    'dropout_nan': (CNN, ['model.dropout=nan'], 'model.dropout', ['model.dropout=0'], None),
    'label_smoothing_nan': (CNN, ['train.label_smoothing=nan'], 'train.label_smoothing',
                            ['train.label_smoothing=0.1'], None),
    'val_fraction_nan': (CNN, ['data.val_fraction=nan'], 'data.val_fraction',
                         ['data.val_fraction=0.2'], None),
    'loss_scale_factor_nan': (CNN, ['precision=fp16', 'loss_scale.factor=nan'],
                              'loss_scale.factor', ['precision=fp16', 'loss_scale.factor=4'],
                              None),
    'negative_ckpt_every': (CNN, ['train.ckpt_every=-1'], 'train.ckpt_every',
                            ['train.ckpt_every=0'], None),
    'no_checkpoints_kept': (CNN, ['train.keep_checkpoints=0'], 'train.keep_checkpoints',
                            ['train.keep_checkpoints=1'], None),
    'nan_in_images': (CNN, ['data.name=npz', 'data.path={nan_images}'], 'data.path',
                      ['data.name=npz', 'data.path={clean_images}'], None),
    'inf_in_targets': (MLP, ['data.name=npz', 'data.path={inf_table}'], 'data.path',
                       ['data.name=npz', 'data.path={clean_table}'], None),
    'truncated_data_file': (CNN, ['data.name=npz', 'data.path={truncated}'], 'data.path',
                            ['data.name=npz', 'data.path={clean_images}'], None),
    'workdir_is_a_file': (CNN, [], '--workdir', [], 'file'),
    'workdir_config_not_json': (CNN, [], '--workdir', [], 'bad_json'),
    'workdir_of_another_model': (CNN, [], 'model.hidden', ['model.hidden=64'], 'other_model'),
}
ROWS = [pytest.param(*row, id=name) for name, row in TABLE.items()]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The data files that rows name."""
  d = tmp_path_factory.mktemp('data')
  rng = np.random.default_rng(0)
  images, labels = rng.random((120, 8, 8)).astype(np.float32), np.arange(120) % 10
  np.savez(d / 'clean_images.npz', x=images, y=labels)
  bad = images.copy()
  bad[7, 3, 4] = np.nan
  np.savez(d / 'nan_images.npz', x=bad, y=labels)
  table, targets = rng.random((120, 10)).astype(np.float32), rng.random(120).astype(np.float32)
  np.savez(d / 'clean_table.npz', x=table, y=targets)
  targets = targets.copy()
  targets[11] = np.inf
  np.savez(d / 'inf_table.npz', x=table, y=targets)
  whole = (d / 'clean_images.npz').read_bytes()
  (d / 'truncated.npz').write_bytes(whole[:len(whole) // 2])
  return {p.stem: str(p) for p in d.iterdir()}


def _workdir(kind, root):
  """The workdir a row runs in, made as the row says."""
  path = root / 'wd'
  if kind == 'file':
    path.write_text('notes\n')
  elif kind == 'bad_json':
    path.mkdir()
    (path / 'config.json').write_text('{"seed": 0, "data": {')  # Cut short.
  elif kind == 'other_model':
    path.mkdir()
    saved = config_lib.to_dict(config_lib.load(CNN, ['model.hidden=64']))
    (path / 'config.json').write_text(json.dumps(saved))
  return path


@pytest.mark.parametrize('spec, bad, named, good, kind', ROWS)
def test_bad_input_is_refused_before_compile(spec, bad, named, good, kind, files, capsys,
                                             tmp_path, monkeypatch):
  del good
  fh.forbid_compiling(monkeypatch)
  workdir = _workdir(kind, tmp_path)
  before = fh.snapshot(workdir)
  overrides = [o.format(**files) for o in bad]
  code, out, err = conftest.run_cli(capsys, 'train', spec, *overrides, '--workdir', workdir)
  lines = err.strip().splitlines()
  assert code == 2 and not out, err
  assert len(lines) == 1 and lines[0].startswith('jaxbig: error: ') and named in lines[0], err
  assert fh.snapshot(workdir) == before  # Nothing written, created or changed.


@pytest.mark.parametrize('spec, bad, named, good, kind', ROWS)
def test_the_good_twin_is_accepted(spec, bad, named, good, kind, files, tmp_path):
  del bad, named
  config = config_lib.load(spec, [o.format(**files) for o in good])
  train.setup(config)  # Everything the bad row fails, short of compiling.
  workdir = _workdir('other_model' if kind == 'other_model' else None, tmp_path)
  workdir_lib.prepare(str(workdir), config)
  assert (workdir / 'config.json').is_file()
