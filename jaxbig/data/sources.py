"""Array data sets held in memory: sklearn's digits and diabetes, user `.npz` files, synthetic.

Every source returns `Arrays`: `x` of shape (N, ...) float32 and `y` of shape (N,) int32
(classification) or (N,) / (N, K) float32 (regression), plus an optional fixed test split.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np

from jaxbig.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Arrays:
  """A data set's examples; `x_test`/`y_test` is a fixed test split when the source has one."""
  x: np.ndarray
  y: np.ndarray
  task: str  # 'classification' or 'regression'
  num_classes: int = 0
  x_test: np.ndarray | None = None
  y_test: np.ndarray | None = None


def _sklearn_data_file(name: str) -> str | None:
  """The path of a data file that sklearn ships (sklearn/datasets/data/NAME), found without
  importing sklearn; None where it is not there."""
  spec = importlib.util.find_spec('sklearn')
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, 'datasets', 'data', name)
    if os.path.isfile(path):
      return path
  return None


def digits() -> Arrays:
  """sklearn's 1,797 handwritten digits, 8x8 grey images with values 0..16, 10 classes.

  Read from the CSV file sklearn ships, as `sklearn.datasets.load_digits` reads it (the same
  arrays: tests/test_data.py), without importing sklearn: its import (scipy with it) took
  1.2 s of every digits run. Where the file is not found, sklearn's own loader.
  """
  path = _sklearn_data_file('digits.csv.gz')
  if path is None:
    from sklearn.datasets import load_digits
    d = load_digits()
    images, target = d.images, d.target
  else:
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      data = np.loadtxt(f, delimiter=',')  # Rows: 64 pixels, then the label.
    images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
  x = images.astype(np.float32)[..., None]
  return Arrays(x=x, y=target.astype(np.int32), task='classification', num_classes=10)


def diabetes() -> Arrays:
  """sklearn's diabetes regression data: 442 patients, 10 features, disease progression."""
  from sklearn.datasets import load_diabetes
  d = load_diabetes()
  return Arrays(x=d.data.astype(np.float32), y=d.target.astype(np.float32), task='regression')


def npz(path: str) -> Arrays:
  """A user file with arrays `x` (N, ...) and `y` (N,) or (N, K); optional `x_test`/`y_test`.

  Integer `y` means classification with classes 0..max(y); float `y` means regression.
  Images are (N, H, W) or (N, H, W, C), channels last.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'data.path: file not found: {path}')
  try:
    f = np.load(path, allow_pickle=False)
  except Exception as e:
    raise ConfigError(f'data.path: {path} is not a readable .npz file ({e})') from None
  missing = [k for k in ('x', 'y') if k not in f.files]
  if missing:
    raise ConfigError(f"data.path: {path} has no array {' or '.join(map(repr, missing))} "
                      f"(found: {', '.join(f.files) or 'nothing'})")
  x, y = f['x'], f['y']
  has_test = 'x_test' in f.files and 'y_test' in f.files
  x_test, y_test = (f['x_test'], f['y_test']) if has_test else (None, None)
  _check_pair(path, 'x', 'y', x, y)
  if has_test:
    _check_pair(path, 'x_test', 'y_test', x_test, y_test)
    if x_test.shape[1:] != x.shape[1:]:
      raise ConfigError(f'data.path: {path}: x_test examples have shape {x_test.shape[1:]}, '
                        f'x examples {x.shape[1:]}')
  if x.ndim == 3:  # (N, H, W) grey images: add the channel axis.
    x = x[..., None]
    x_test = x_test[..., None] if has_test else None
  if np.issubdtype(y.dtype, np.integer):
    if y.ndim != 1 or y.min() < 0:
      raise ConfigError(f'data.path: {path}: integer labels y must be (N,) and >= 0')
    classes = int(max(y.max(), y_test.max() if has_test else 0)) + 1
    cast = lambda a: None if a is None else a.astype(np.int32)
    return Arrays(x.astype(np.float32), cast(y), 'classification', classes,
                  None if x_test is None else x_test.astype(np.float32), cast(y_test))
  cast = lambda a: None if a is None else a.astype(np.float32)
  return Arrays(x.astype(np.float32), cast(y), 'regression', 0, cast(x_test), cast(y_test))


def _check_pair(path: str, xn: str, yn: str, x: np.ndarray, y: np.ndarray) -> None:
  if x.ndim < 2:
    raise ConfigError(f'data.path: {path}: {xn} must be (N, features...) with N examples, '
                      f'got shape {x.shape}')
  if len(x) != len(y):
    raise ConfigError(f'data.path: {path}: {xn} has {len(x)} examples but {yn} has {len(y)}')
  if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
    raise ConfigError(f'data.path: {path}: {xn} and {yn} must be numeric arrays')


def synthetic(shape: tuple, num_classes: int, size: int, seed: int) -> Arrays:
  """Random inputs of any per-example shape with random labels (benchmarks, tests)."""
  if size <= 0 or not shape or any(s <= 0 for s in shape):
    raise ConfigError(f'data.shape/data.size: need positive sizes, got {shape} x {size}')
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((size, *shape), dtype=np.float32)
  if num_classes > 0:
    y = rng.integers(0, num_classes, size, dtype=np.int32)
    return Arrays(x, y, 'classification', num_classes)
  return Arrays(x, rng.standard_normal(size, dtype=np.float32), 'regression')


def load(cfg) -> Arrays:
  """The source named by `data.name`."""
  if cfg.name == 'digits':
    return digits()
  if cfg.name == 'diabetes':
    return diabetes()
  if cfg.name == 'npz':
    if not cfg.path:
      raise ConfigError('data.path: required when data.name=npz')
    return npz(cfg.path)
  if cfg.name == 'synthetic':
    return synthetic(tuple(cfg.shape), cfg.num_classes, cfg.size, cfg.split_seed)
  raise ConfigError(f"data.name: unknown data set '{cfg.name}'; "
                    'choose from digits, diabetes, npz, synthetic, stdlib, text')
