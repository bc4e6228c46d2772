"""Array data sets held in memory: sklearn's digits and diabetes, CIFAR-10/100 from their
binary release, user `.npz` files, synthetic.

Every source returns `Arrays`: `x` of shape (N, ...) float32 and `y` of shape (N,) int32
(classification) or (N,) / (N, K) float32 (regression), plus an optional fixed test split.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import math
import os
import zipfile

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
  arrays: tests/test_data.py), without importing sklearn, whose import (scipy with it)
  slows the start of every digits run. Where the file is not found, sklearn's own loader.
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


# Deflate compresses at most about 1032:1, so a member claiming more bytes than that is forged.
_MAX_RATIO = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1100}
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of the .npy stream `f`, read without reading the array; ValueError on a
  garbled header or object arrays (which would need pickle)."""
  version = np.lib.format.read_magic(f)
  if version not in _NPY_HEADERS:
    raise ValueError(f'unsupported .npy version {version}')
  shape, _, dtype = _NPY_HEADERS[version](f)  # numpy bounds the header's length.
  if dtype.hasobject:
    raise ValueError('object arrays need pickle, which is never loaded')
  return shape, dtype


def _declared_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
  return math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow.


def _check_npz_members(path: str) -> None:
  """Refuses members that are not .npy arrays or declare more bytes than the file can hold,
  before numpy allocates anything."""
  if not zipfile.is_zipfile(path):
    raise ConfigError(f'data.path: {path} is not an .npz file (a zip of .npy arrays)')
  size = os.path.getsize(path)
  try:
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        where = f'data.path: {path}: member {info.filename}'
        if not info.filename.endswith('.npy'):
          raise ConfigError(f'{where} is not a .npy array')
        ratio = _MAX_RATIO.get(info.compress_type)
        if ratio is None:
          raise ConfigError(f'{where} uses zip compression {info.compress_type}; write the file '
                            'with numpy.savez or numpy.savez_compressed')
        if info.compress_size > size or info.file_size > ratio * info.compress_size:
          raise ConfigError(f'{where} claims {info.file_size} bytes, more than the file can '
                            'hold (a forged or damaged zip)')
        with z.open(info) as f:
          try:
            shape, dtype = _npy_header(f)
          except ValueError as e:
            raise ConfigError(f'{where} has a bad .npy header ({e})') from None
          if _declared_bytes(shape, dtype) > info.file_size:
            raise ConfigError(f'{where} declares shape {shape} of {dtype} '
                              f'({_declared_bytes(shape, dtype)} bytes) but holds '
                              f'{info.file_size} bytes')
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ConfigError(f'data.path: {path} is not a readable .npz file ({e})') from None


def load_npy(path: str) -> np.ndarray:
  """An array from a .npy file, its header checked against the file's size before numpy
  allocates anything; ConfigError naming the file otherwise."""
  try:
    with open(path, 'rb') as f:
      shape, dtype = _npy_header(f)
      held = os.fstat(f.fileno()).st_size - f.tell()
      if _declared_bytes(shape, dtype) > held:
        raise ConfigError(f'{path}: declares shape {shape} of {dtype} '
                          f'({_declared_bytes(shape, dtype)} bytes) but holds {held} bytes')
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, MemoryError) as e:
    raise ConfigError(f'{path}: not a readable .npy file ({e})') from None


def file_sha256(path: str) -> tuple[int, str]:
  """(size in bytes, SHA-256 hex) of a file, read in chunks."""
  digest, size = hashlib.sha256(), 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def npz(path: str) -> Arrays:
  """A user file with arrays `x` (N, ...) and `y` (N,) or (N, K); optional `x_test`/`y_test`.

  Integer `y` means classification with classes 0..max(y); float `y` means regression.
  Images are (N, H, W) or (N, H, W, C), channels last.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'data.path: file not found: {path}')
  _check_npz_members(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      files = list(f.files)
      missing = [k for k in ('x', 'y') if k not in files]
      if missing:
        raise ConfigError(f"data.path: {path} has no array {' or '.join(map(repr, missing))} "
                          f"(found: {', '.join(files) or 'nothing'})")
      has_test = 'x_test' in files and 'y_test' in files
      names = ('x', 'y', 'x_test', 'y_test') if has_test else ('x', 'y')
      arrays = {k: f[k] for k in names}
  except ConfigError:
    raise
  except Exception as e:  # Anything numpy or zlib raise on a damaged file, MemoryError too.
    raise ConfigError(f'data.path: {path} is not a readable .npz file ({e})') from None
  x, y = arrays['x'], arrays['y']
  x_test, y_test = arrays.get('x_test'), arrays.get('y_test')
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
    classes = _num_classes(path, y, y_test)
    cast = lambda a: None if a is None else a.astype(np.int32)
    return Arrays(x.astype(np.float32), cast(y), 'classification', classes,
                  None if x_test is None else x_test.astype(np.float32), cast(y_test))
  cast = lambda a: None if a is None else a.astype(np.float32)
  return Arrays(x.astype(np.float32), cast(y), 'regression', 0, cast(x_test), cast(y_test))


def _num_classes(path: str, y: np.ndarray, y_test: np.ndarray | None) -> int:
  """max(label) + 1 of integer labels 0..K-1; refuses labels that would make most classes
  empty (ids offset by 10**6 would otherwise build a million-way output layer)."""
  for a in (y, y_test):
    if a is not None and (a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or a.min() < 0):
      raise ConfigError(f'data.path: {path}: integer labels y (and y_test) must be (N,) and >= 0')
  labels = y if y_test is None else np.concatenate([y, y_test])
  top, distinct = int(labels.max()), len(np.unique(labels))
  # Fewer than half of the ids 0..top occur, and unused outputs would be many (a few unused
  # classes of a small file are harmless; labels offset by 10**6 are not).
  if top >= max(2 * distinct, 1000):
    raise ConfigError(f'data.path: {path}: the labels run up to {top} but only {distinct} '
                      f'distinct ones occur; relabel them to 0..K-1 '
                      '(np.unique(y, return_inverse=True))')
  return top + 1


def _check_pair(path: str, xn: str, yn: str, x: np.ndarray, y: np.ndarray) -> None:
  if x.ndim < 2:
    raise ConfigError(f'data.path: {path}: {xn} must be (N, features...) with N examples, '
                      f'got shape {x.shape}')
  if y.ndim not in (1, 2):
    raise ConfigError(f'data.path: {path}: {yn} must be (N,) or (N, K), got shape {y.shape}')
  if len(x) != len(y):
    raise ConfigError(f'data.path: {path}: {xn} has {len(x)} examples but {yn} has {len(y)}')
  if not len(x):
    raise ConfigError(f'data.path: {path}: {xn} has no examples')
  if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
    raise ConfigError(f'data.path: {path}: {xn} and {yn} must be numeric arrays')


# CIFAR's binary release: per image, its label byte(s), then 32x32 red, green and blue
# planes, row-major. CIFAR-100 records carry the coarse label before the fine one.
# `files`: (name, images) per split.
CIFAR = {
    'cifar10': dict(folder='cifar-10-batches-bin', labels=1, classes=10, files={
        'train': [(f'data_batch_{i}.bin', 10_000) for i in range(1, 6)],
        'test': [('test_batch.bin', 10_000)]}),
    'cifar100': dict(folder='cifar-100-binary', labels=2, classes=100, files={
        'train': [('train.bin', 50_000)], 'test': [('test.bin', 10_000)]}),
}
_CIFAR_PIXELS = 32 * 32 * 3


def _cifar_file(path: str, images: int, labels: int,
                classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(images_Nx32x32x3 uint8, fine labels) of one binary CIFAR file; raw bytes, no pickle."""
  record = labels + _CIFAR_PIXELS
  size = os.path.getsize(path)
  if size != images * record:
    raise ConfigError(f'data.path: {path} has {size} bytes, not the {images} x {record} of '
                      'its CIFAR release: damaged, truncated or another file')
  raw = np.fromfile(path, np.uint8).reshape(-1, record)
  y = raw[:, labels - 1].astype(np.int32)  # The fine label is the last label byte.
  if y.max() >= classes:
    raise ConfigError(f'data.path: {path} holds label {y.max()}, over the {classes} classes: '
                      'another CIFAR release?')
  x = raw[:, labels:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x, y


def cifar(name: str, path: str) -> Arrays:
  """CIFAR-10 or CIFAR-100 (fine labels) from the folder of its binary release (or the
  folder holding it): 50,000 training and 10,000 test images, 32x32x3, values 0..255."""
  spec = CIFAR[name]
  if not path:
    raise ConfigError(f"data.path: required when data.name={name} (the '{spec['folder']}' "
                      'folder of the binary release)')
  if os.path.isdir(os.path.join(path, spec['folder'])):
    path = os.path.join(path, spec['folder'])
  parts = {}
  for split, files in spec['files'].items():
    for f, _ in files:
      if not os.path.isfile(os.path.join(path, f)):
        raise ConfigError(f"data.path: {os.path.join(path, f)} is missing (data.name={name} "
                          f"reads the binary release, '{spec['folder']}')")
    xs, ys = zip(*(_cifar_file(os.path.join(path, f), n, spec['labels'], spec['classes'])
                   for f, n in files))
    parts[split] = np.concatenate(xs), np.concatenate(ys)
  return Arrays(x=parts['train'][0].astype(np.float32), y=parts['train'][1],
                task='classification', num_classes=spec['classes'],
                x_test=parts['test'][0].astype(np.float32), y_test=parts['test'][1])


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
    arrays = npz(cfg.path)
    declared = cfg.num_classes if 'num_classes' in cfg else 0  # Seq and VAE configs lack it.
    if arrays.task == 'classification' and 0 < declared < arrays.num_classes:
      raise ConfigError(f'data.num_classes={declared}: the labels of {cfg.path} run up to '
                        f'{arrays.num_classes - 1}; set data.num_classes={arrays.num_classes} '
                        'or relabel')
    return arrays
  if cfg.name == 'synthetic':
    return synthetic(tuple(cfg.shape), cfg.num_classes, cfg.size, cfg.split_seed)
  if cfg.name in CIFAR:
    return cifar(cfg.name, cfg.path)
  raise ConfigError(f"data.name: unknown data set '{cfg.name}'; "
                    'choose from digits, diabetes, cifar10, cifar100, npz, synthetic, stdlib, '
                    'text, tokens, random_tokens, imagefolder, imagerecords')
