"""Experiment configs: load a Python file's `get_config()`, apply `key=value` overrides, validate.

An experiment is one Python file whose `get_config()` returns an `ml_collections.ConfigDict`
with every field declared and commented. `path.py:arg` passes `arg` to `get_config(arg)`
(big_vision's `runlocal` switch). Overrides are type-checked against the declared field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
import sys
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A bad experiment file, override or field value; the message names the culprit."""


def load_module(path: str):
  """Imports an experiment file as a module (its folder importable for variants' bases)."""
  if not os.path.isfile(path):
    raise ConfigError(f'experiment file not found: {path}')
  name, ext = os.path.splitext(os.path.basename(path))
  # Other names get no loader (spec None); a .pyc would run unreviewable bytecode.
  module_spec = (importlib.util.spec_from_file_location(f'jaxbig_experiment_{name}', path)
                 if ext == '.py' else None)
  if module_spec is None:
    raise ConfigError(f'{path}: not an experiment file (a .py file with get_config())')
  module = importlib.util.module_from_spec(module_spec)
  # A variant imports its base by module name (`import cnn_digits`) from the same folder.
  folder = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, folder)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # The user's file: report where, not our traceback.
    raise ConfigError(f'{path}: cannot be imported: {type(e).__name__}: {e}') from e
  finally:
    sys.path.remove(folder)
  return module


def load_module_config(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the experiment file named by `spec` (`path.py` or `path.py:arg`)."""
  path, _, arg = spec.partition(':')
  module = load_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path}: has no get_config() function')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:
    raise ConfigError(f'{spec}: get_config() failed: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() must return an ml_collections.ConfigDict')
  return config


def _lookup(config: ml_collections.ConfigDict, key: str):
  """Returns (parent ConfigDict, leaf name) for a dotted key, or raises naming the key."""
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      prefix = '.'.join(parts[:i])
      siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, siblings, n=1)
      hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ''
      where = f" in '{prefix}'" if prefix else ''
      raise ConfigError(f"unknown config key '{key}'{where}{hint}")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


_TRUE = {'true', '1', 'yes', 'on'}
_FALSE = {'false', '0', 'no', 'off'}


def parse_value(key: str, text: str, declared_type: type) -> Any:
  """Parses an override's text as the declared type of its field."""
  bad = ConfigError(f"{key}: expected {declared_type.__name__}, got '{text}'")
  if declared_type is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise bad
  if declared_type is int:
    try:
      return int(text)
    except ValueError:
      raise bad from None
  if declared_type is float:
    try:
      return float(text)
    except ValueError:
      raise bad from None
  if declared_type is str:
    return text
  if declared_type in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      # `features=32,64` and `features=relu` alike: split on commas, parse each item.
      value = tuple(_literal_or_str(t) for t in text.split(',') if t.strip())
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  raise ConfigError(f'{key}: fields of type {declared_type.__name__} cannot be overridden')


def _literal_or_str(text: str) -> Any:
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `key=value` strings in place, each checked against its declared field."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep or not key:
      raise ConfigError(f"override '{item}' is not of the form key=value")
    parent, leaf = _lookup(config, key)
    if isinstance(parent[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"{key}: is a section; override its fields ({key}.<field>=...)")
    declared = parent.get_type(leaf)
    value = parse_value(key, text, declared)
    old = parent[leaf]
    if isinstance(old, tuple) and old and isinstance(value, tuple):
      _check_items(key, old, value)
    try:
      parent[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{key}: expected {declared.__name__}, got '{text}'") from e


def _check_items(key: str, old: tuple, new: tuple) -> None:
  """Items of a tuple override must have the type of the declared items (int -> float is fine)."""
  kinds = {type(x) for x in old}
  for x in new:
    ok = type(x) in kinds or (float in kinds and type(x) is int)
    if not ok:
      names = '/'.join(sorted(k.__name__ for k in kinds))
      raise ConfigError(f"{key}: items must be {names}, got {x!r}")


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def from_dict(d: dict) -> ml_collections.FrozenConfigDict:
  """Rebuilds a frozen config from `to_dict`'s output (the workdir's config.json)."""
  return ml_collections.FrozenConfigDict(d)


def diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  """Dotted keys whose values differ between two config dicts."""
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    name = f'{prefix}{k}'
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += diff(va, vb, name + '.')
    elif va != vb:
      out.append(name)
  return out


def flatten(d: dict, prefix: str = '') -> dict:
  """A nested config dict as {dotted key: value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


# xent: classes or next tokens; mse: regression; elbo: VAE; recon: autoencoder.
LOSSES = ('xent', 'mse', 'elbo', 'recon')
ON_NONFINITE = ('skip', 'abort')  # What a step with a non-finite loss or gradient does.


def _check_finite(config: ml_collections.ConfigDict, prefix: str = '') -> None:
  """No float field (or float item of a tuple) may be NaN or infinite."""
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, name + '.')
    elif isinstance(value, float) or (isinstance(value, tuple) and
                                      any(isinstance(x, float) for x in value)):
      items = value if isinstance(value, tuple) else (value,)
      _require(all(math.isfinite(x) for x in items if isinstance(x, float)),
               f'{name} must be finite, got {value}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every experiment shares; the sections' builders check their own."""
  for section in ('seed', 'data', 'model', 'opt', 'train', 'mesh'):
    _require(section in config, f"config: missing section '{section}'")
  _require('kernels' in config, "config: missing field 'kernels' (auto or reference)")
  _require(config.kernels in ('auto', 'reference'),
           f"kernels: unknown policy '{config.kernels}'; choose from auto, reference")
  # The seed becomes a 32-bit PRNG key (and numpy seeds): larger ones would overflow there.
  _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
           f'seed must be in 0..{2**32 - 1}, got {config.seed}')
  _check_finite(config)
  t = config.train
  _require(t.steps > 0, f'train.steps must be > 0, got {t.steps}')
  _require(t.log_every > 0, f'train.log_every must be > 0, got {t.log_every}')
  _require(t.eval_every >= 0, f'train.eval_every must be >= 0, got {t.eval_every}')
  _require(t.ckpt_every >= 0, f'train.ckpt_every must be >= 0, got {t.ckpt_every}')
  _require(t.keep_checkpoints > 0, f'train.keep_checkpoints must be > 0, got {t.keep_checkpoints}')
  _require(t.accum_steps > 0, f'train.accum_steps must be > 0, got {t.accum_steps}')
  _require(t.loss in LOSSES, f"train.loss: unknown loss '{t.loss}'; choose from {', '.join(LOSSES)}")
  _require(0.0 <= t.label_smoothing < 1.0,
           f'train.label_smoothing must be in [0, 1), got {t.label_smoothing}')
  _require(t.on_nonfinite in ON_NONFINITE, f"train.on_nonfinite: unknown mode "
           f"'{t.on_nonfinite}'; choose from {', '.join(ON_NONFINITE)}")
  _require(t.max_consecutive_skips >= 0,
           f'train.max_consecutive_skips must be >= 0, got {t.max_consecutive_skips}')
  if 'profile_steps' in t:  # Configs saved before profiling existed lack it.
    _require(t.profile_steps >= 0, f'train.profile_steps must be >= 0, got {t.profile_steps}')
    _require(t.profile_start >= 0, f'train.profile_start must be >= 0, got {t.profile_start}')
  d = config.data
  _require(d.batch_size > 0, f'data.batch_size must be > 0, got {d.batch_size}')
  _require(d.eval_batch_size > 0, f'data.eval_batch_size must be > 0, got {d.eval_batch_size}')
  if 'split_seed' in d:  # Data that is split by a seeded permutation.
    _require(d.split_seed >= 0, f'data.split_seed must be >= 0, got {d.split_seed}')
  if 'augment_shift' in d:  # Image data only.
    _require(d.augment_shift >= 0, f'data.augment_shift must be >= 0, got {d.augment_shift}')
  _require(d.batch_size % t.accum_steps == 0,
           f'data.batch_size ({d.batch_size}) must be divisible by train.accum_steps '
           f'({t.accum_steps})')


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
  """Loads an experiment, applies overrides, validates and freezes it."""
  config = load_module_config(spec)
  apply_overrides(config, overrides)
  validate(config)
  return ml_collections.FrozenConfigDict(config)


def placeholder(kind: type) -> Any:
  """An optional field of a declared type (None until overridden)."""
  return config_dict.placeholder(kind)
