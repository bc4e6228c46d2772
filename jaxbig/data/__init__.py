"""Data: sources -> deterministic train/val/test splits -> normalisation -> grain iterators.

The training iterator is a grain pipeline over shuffled index batches (a seeded permutation
per epoch), so its position is a small JSON state saved with each checkpoint. Evaluation
walks a split in fixed-size batches; the last batch is padded and carries `mask` 0 on padding,
so one compiled eval step serves every batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from typing import Iterator

import grain
import jax
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data import sources, text, tokens

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class DataMeta:
  """What models, losses and `predict` need to know about the data; saved with checkpoints."""
  input_shape: tuple[int, ...]
  num_outputs: int
  task: str
  num_classes: int
  sizes: dict
  x_mean: np.ndarray | float = 0.0
  x_std: np.ndarray | float = 1.0
  y_mean: float = 0.0
  y_std: float = 1.0
  vocab_size: int = 0  # Token inputs (int32) when > 0; float inputs otherwise.
  doc_eos: int = -1  # >= 0: LM rows are packed documents ended by this token (data.pack).
  classes: tuple = ()  # Class names by id, where the source names them (imagefolder).

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ('x_mean', 'x_std'):
      d[k] = np.asarray(d[k]).tolist()
    d['input_shape'] = list(self.input_shape)
    return d

  @classmethod
  def from_json(cls, d: dict) -> 'DataMeta':
    d = dict(d)
    d['input_shape'] = tuple(d['input_shape'])
    d['classes'] = tuple(d.get('classes', ()))
    for k in ('x_mean', 'x_std'):
      d[k] = np.asarray(d[k], np.float32)
    return cls(**d)

  def normalize(self, x: np.ndarray) -> np.ndarray:
    """Applies the training split's input normalisation (also used by `predict`)."""
    return ((x - self.x_mean) / self.x_std).astype(np.float32)


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                   has_test: bool) -> dict[str, np.ndarray]:
  """A fixed permutation cut into test, val and train (the rest)."""
  perm = np.random.default_rng(seed).permutation(n)
  n_test = 0 if has_test else int(round(n * test_fraction))
  n_val = int(round(n * val_fraction))
  return {'test': perm[:n_test], 'val': perm[n_test:n_test + n_val],
          'train': perm[n_test + n_val:]}


def _stats(x: np.ndarray, mode: str) -> tuple:
  if mode == 'none':
    return 0.0, 1.0
  if mode == 'global':
    return float(x.mean()), float(x.std() + 1e-6)
  if mode == 'feature':
    return x.mean(0), x.std(0) + 1e-6
  if mode == 'channel':  # Per channel (the last axis), over examples and positions.
    axes = tuple(range(x.ndim - 1))
    return x.mean(axes, dtype=np.float64).astype(np.float32), (
        x.std(axes, dtype=np.float64) + 1e-6).astype(np.float32)
  if mode == 'minmax':  # Into [0, 1], e.g. pixels as Bernoulli probabilities for a VAE.
    return float(x.min()), float(x.max() - x.min() + 1e-6)
  raise ConfigError(f"data.normalize: unknown mode '{mode}'; "
                    'choose from none, global, feature, channel, minmax')


@functools.lru_cache(maxsize=4)  # The newest epochs (thread-safe: the prefetch thread reads).
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(n)
  order.flags.writeable = False
  return order


class _ShuffledBatches(grain.MapDataset):
  """Element i: the example indices of training batch i, endless and random-access.

  The examples are read epoch after epoch, each in its own seeded order (a numpy
  permutation per epoch), and cut into batches of `batch_size`; a batch may span two
  epochs. Not grain's per-example `shuffle`: its host time competes with XLA:CPU's step.
  """

  def __init__(self, n: int, batch_size: int, seed: int):
    super().__init__()
    self.n, self.batch_size, self.seed = n, batch_size, seed

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self.batch_size
    stop = start + self.batch_size
    parts = []
    while start < stop:
      epoch, pos = divmod(start, self.n)
      take = min(stop - start, self.n - pos)
      parts.append(_epoch_order(self.n, self.seed, epoch)[pos:pos + take])
      start += take
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class _Gather(grain.transforms.RandomMap):
  """Index batch -> this process's rows of the example batch, randomly shifted and flipped.

  Augmentations are drawn for the whole batch, then sliced: a batch is the same whatever
  the number of processes it is spread over.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, rows: tuple[int, int] | None, shift: int,
               flip: bool):
    self.x, self.y, self.rows, self.shift, self.flip = x, y, rows, shift, flip

  def random_map(self, idx, rng: np.random.Generator):
    lo, hi = self.rows or (0, len(idx))
    x = self.x[idx[lo:hi]]
    if self.shift:
      s = self.shift
      padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
      offsets = rng.integers(0, 2 * s + 1, size=(len(idx), 2))[lo:hi]
      h, w = x.shape[1:3]
      rows_BxH = offsets[:, :1] + np.arange(h)
      cols_BxW = offsets[:, 1:] + np.arange(w)
      x = padded[np.arange(len(x))[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]
    if self.flip:
      flips = (rng.random(len(idx)) < 0.5)[lo:hi]
      x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return {'x': x, 'y': self.y[idx[lo:hi]]}


class Data:
  """A data set in memory, split, normalised, with a checkpointable training iterator."""

  def __init__(self, cfg, seed: int):
    arrays = sources.load(cfg)
    _check_fractions(cfg)
    idx = _split_indices(len(arrays.x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                         arrays.x_test is not None)
    self.splits = {k: (arrays.x[v], arrays.y[v]) for k, v in idx.items()}
    if arrays.x_test is not None:
      self.splits['test'] = (arrays.x_test, arrays.y_test)
    x_train, y_train = self.splits['train']
    if len(x_train) == 0:
      raise ConfigError('data.val_fraction/data.test_fraction leave no training examples')
    if cfg.batch_size > len(x_train):
      raise ConfigError(f'data.batch_size ({cfg.batch_size}) is larger than the training split '
                        f'({len(x_train)} examples)')
    if (cfg.augment_shift or cfg.augment_flip) and x_train.ndim != 4:
      raise ConfigError(f'data.augment_shift/augment_flip need images (N, H, W, C), '
                        f'got examples of shape {x_train.shape[1:]}')
    x_mean, x_std = _stats(x_train, cfg.normalize)
    y_mean, y_std = 0.0, 1.0
    if arrays.task == 'regression' and cfg.normalize_targets:
      y_mean, y_std = float(y_train.mean()), float(y_train.std() + 1e-6)
    num_outputs = arrays.num_classes if arrays.task == 'classification' else (
        1 if y_train.ndim == 1 else y_train.shape[1])
    self.meta = DataMeta(
        input_shape=tuple(x_train.shape[1:]), num_outputs=num_outputs, task=arrays.task,
        num_classes=arrays.num_classes, sizes={k: len(v[0]) for k, v in self.splits.items()},
        x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std)
    self.cfg, self.seed = cfg, seed
    self._prepared = {k: self._prepare(*v) for k, v in self.splits.items()}
    self._identity = _arrays_identity(cfg, arrays)  # Hashed as loaded: files change later.

  def identity(self) -> dict:
    """What the data are (for resume checks), JSON-ready: for npz the file's path, size and
    SHA-256; for digits and diabetes a SHA-256 of the arrays; {} for synthetic data, which
    the config fully determines."""
    return dict(self._identity)

  @property
  def train_labels(self) -> np.ndarray:
    return self.splits['train'][1]

  def _prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = self.meta
    if m.task == 'regression':
      y = ((y - m.y_mean) / m.y_std).astype(np.float32)
      y = y[:, None] if y.ndim == 1 else y
    return m.normalize(x), y

  def train_iter(self, rows: tuple[int, int] | None = None) -> grain.DatasetIterator:
    """An endless, seeded, checkpointable iterator of training batches {'x', 'y'}.

    `rows` = (lo, hi) keeps only those rows of each batch: a process's share.
    """
    x, y = self._prepared['train']
    gather = _Gather(x, y, rows, self.cfg.augment_shift, self.cfg.augment_flip)
    ds = _ShuffledBatches(len(x), self.cfg.batch_size, self.seed).random_map(
        gather, seed=self.seed + 1)
    return iter(ds.to_iter_dataset(text.READ_OPTIONS))

  def batch_spec(self, size: int, with_mask: bool) -> dict:
    """Shapes and dtypes of a batch of `size` examples (what the steps are compiled for)."""
    x, y = self._prepared['train']
    spec = {'x': jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype),
            'y': jax.ShapeDtypeStruct((size, *y.shape[1:]), y.dtype)}
    if with_mask:
      spec['mask'] = jax.ShapeDtypeStruct((size,), np.float32)
    return spec

  def eval_batches(self, split: str) -> Iterator[dict]:
    """The split in order, in batches of `eval_batch_size`, padded, with a 0/1 `mask`."""
    x, y = self._prepared[split]
    bs = self.cfg.eval_batch_size
    for start in range(0, len(x), bs):
      xb, yb = x[start:start + bs], y[start:start + bs]
      pad = bs - len(xb)
      mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
      if pad:
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
      yield {'x': xb, 'y': yb, 'mask': mask}

  def baseline_mse(self, split: str) -> float:
    """MSE (original units) of predicting the training mean: the bar a regressor must clear."""
    y_train, y = self.splits['train'][1], self.splits[split][1]
    return float(np.mean((y - y_train.mean(0)) ** 2))

  def baseline_linear_mse(self, split: str) -> float:
    """MSE (original units) of a least-squares linear fit on the training split."""
    (x_train, y_train), (x, y) = self.splits['train'], self.splits[split]
    design = lambda a: np.concatenate([a.reshape(len(a), -1), np.ones((len(a), 1))], 1)
    coef, *_ = np.linalg.lstsq(design(x_train).astype(np.float64), y_train, rcond=None)
    return float(np.mean((design(x) @ coef - y) ** 2))


def _check_fractions(cfg) -> None:
  for name in ('val_fraction', 'test_fraction'):
    v = cfg[name]
    if not 0.0 <= v < 1.0:
      raise ConfigError(f'data.{name} must be in [0, 1), got {v}')
  if cfg.val_fraction + cfg.test_fraction >= 1.0:
    raise ConfigError('data.val_fraction + data.test_fraction must be < 1')


def _arrays_identity(cfg, arrays: sources.Arrays) -> dict:
  """`Data.identity` of the arrays a source loaded."""
  if cfg.name == 'synthetic':
    return {}
  if cfg.name == 'npz':
    size, sha = sources.file_sha256(cfg.path)
    return {'source': 'npz', 'path': cfg.path, 'size': size, 'sha256': sha}
  digest = hashlib.sha256()
  for a in (arrays.x, arrays.y, arrays.x_test, arrays.y_test):
    if a is not None:
      a = np.ascontiguousarray(a)
      digest.update(f'{a.dtype.str}{a.shape}'.encode())
      digest.update(a.data)
  return {'source': cfg.name, 'sha256': digest.hexdigest()}


def _first(names: list[str], what: str) -> list[str]:
  """['file NAME WHAT (and N more)'] for the first of `names`; [] for none."""
  if not names:
    return []
  more = f' (and {len(names) - 1} more)' if len(names) > 1 else ''
  return [f'file {names[0]} {what}{more}']


def describe_change(saved: dict, new: dict) -> str | None:
  """None when two `identity()`s describe the same bytes (a moved file is the same data),
  else a short phrase naming what changed, e.g. 'data.path: file lib/foo.py changed'."""
  if saved == new:
    return None
  source, old_source = new.get('source'), saved.get('source')
  if source != old_source:
    return (f"data: the source changed ({old_source or 'made by the config'} -> "
            f"{source or 'made by the config'})")
  if source == 'npz':
    if saved.get('sha256') == new.get('sha256'):
      return None
    return (f"data.path: {new.get('path')} changed (size {saved.get('size')} -> "
            f"{new.get('size')})")
  if source in TEXT_SOURCES:
    if saved.get('digest') == new.get('digest'):
      return None
    label = 'data.path' if source == 'text' else 'data.name=stdlib'
    old, cur = saved.get('files', {}), new.get('files', {})
    parts = (_first(sorted(k for k in old.keys() & cur.keys() if old[k] != cur[k]), 'changed')
             + _first(sorted(cur.keys() - old.keys()), 'added')
             + _first(sorted(old.keys() - cur.keys()), 'removed'))
    return f"{label}: {', '.join(parts) or 'the contents changed'}"
  if source == 'tokens':
    if saved.get('digest') == new.get('digest'):  # A moved folder is the same tokens.
      return None
    return f"data.path: the shards in {new.get('path')} changed (prepared again)"
  if saved.get('sha256') == new.get('sha256'):
    return None
  return f'data.name={source}: the loaded arrays changed'


def save_iter_state(it: grain.DatasetIterator) -> dict:
  """The iterator's position as JSON-ready data."""
  return json.loads(json.dumps(it.get_state()))


TEXT_SOURCES = ('stdlib', 'text')


def build(cfg, seed: int) -> 'Data | text.TextData | tokens.TokensData':
  """Loads and splits the data named by the `data` section of a config."""
  if cfg.name in TEXT_SOURCES:
    return text.TextData(cfg, seed)
  if cfg.name == 'tokens':
    return tokens.TokensData(cfg, seed)
  if cfg.name == 'random_tokens':
    return tokens.RandomTokens(cfg, seed)
  if cfg.name == 'none':
    return tokens.NoCorpus(cfg, seed)
  if cfg.name == 'imagefolder':
    from jaxbig.data import images  # pylint: disable=g-import-not-at-top
    return images.ImageFolder(cfg, seed)
  if cfg.name == 'imagerecords':
    from jaxbig.data import image_records  # pylint: disable=g-import-not-at-top
    return image_records.ImageRecords(cfg, seed)
  return Data(cfg, seed)


def check_finite(cfg, data: Data) -> None:
  """Float inputs and targets must be finite: a NaN in the data would poison every epoch."""
  for split, arrays in getattr(data, 'splits', {}).items():
    for name, a in zip(('x', 'y'), arrays if isinstance(arrays, tuple) else ()):  # Not text.
      a = np.asarray(a)
      if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        source = f'data.path: {cfg.path}' if cfg.name == 'npz' else 'data.name'
        raise ConfigError(f'{source}: {name} of the {split} split holds non-finite values in '
                          f'{len(bad)} examples (the first: {bad[0]}); clean the data')
