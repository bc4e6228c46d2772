"""Text as UTF-8 bytes (vocabulary 256, no tokenizer): files -> split by path -> byte windows.

Sources: `data.name=stdlib` reads the `.py` files of the running interpreter's standard
library (real text on every machine; site-packages excluded), `data.name=text` reads
`data.path`, a file or a folder searched recursively for `data.pattern`.

Each file goes to test, val or train by a hash of its path relative to the root, so a file's
split never depends on which other files exist; a single file is cut into consecutive byte
ranges instead. Files of a split are concatenated in path order.

Only regular files are read, each at most `data.max_file_mb` and all together at most
`data.max_total_mb` (MiB); FIFOs, devices, sockets and broken links in a folder are never
opened, only counted and reported in one warning line.

Training draws `data.batch_size` windows of `seq_len + 1` bytes at uniformly random offsets
from a grain pipeline (seeded, its position checkpointed like every jaxbig iterator); `x` is
the first `seq_len` bytes, `y` the next-byte targets. Evaluation reads up to
`data.eval_windows` non-overlapping windows spread evenly over the split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import sys
import sysconfig
import zlib
from typing import Iterator

import grain
import jax
import numpy as np

from jaxbig.config import ConfigError

# Every training iterator: one thread makes the next two batches while the step runs, so the
# input pipeline is off the step's path on an accelerator. The order stays the seeded one and
# a checkpoint stores the position of the batch last handed out (grain's prefetch iterator).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

VOCAB_SIZE = 256  # Bytes.


def stdlib_root() -> str:
  """The folder of the running interpreter's standard library."""
  return sysconfig.get_paths()['stdlib']


def list_files(root: str, pattern: str) -> list[str]:
  """Relative paths of files under `root` matching `pattern`, sorted, site-packages excluded."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ('site-packages', 'dist-packages', '__pycache__'))
    for name in filenames:
      if fnmatch.fnmatch(name, pattern):
        out.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(out)


def _hash_unit(relpath: str) -> float:
  """A fixed number in [0, 1) for a path, the same on every machine."""
  return zlib.crc32(relpath.replace(os.sep, '/').encode()) / 2**32


def is_utf8(data: bytes) -> bool:
  try:
    data.decode('utf-8')
    return True
  except UnicodeDecodeError:
    return False


MIB = 2**20
LIMITS = {'max_file_mb': 256, 'max_total_mb': 4096}  # Field: MiB, for configs without it.
MAX_LIMIT_MB = 2**20  # 1 TiB: a larger limit is a typo, and bytes counts stay small ints.


def _limits(cfg) -> tuple[int, int]:
  """(per-file, total) byte limits of the data section."""
  out = []
  for name, default in LIMITS.items():
    # The one `get`: config.json of runs older than these fields must still load for eval.
    mb = cfg.get(name, default)
    if not 0 < mb <= MAX_LIMIT_MB:
      raise ConfigError(f'data.{name} must be in 1..{MAX_LIMIT_MB} (MiB), got {mb}')
    out.append(mb * MIB)
  return out[0], out[1]


def read_regular(path: str, cap: int) -> bytes | None:
  """At most `cap` + 1 bytes of `path` if it is a regular file (or a link to one); None for
  anything else (FIFO, device, socket, broken link, unreadable), which is never read."""
  try:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # Opening a FIFO would block; /dev/zero never ends.
      return None
    # Non-blocking, and checked again once open: a file swapped for a FIFO after the stat
    # must not block the open either.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except OSError:
    return None
  with open(fd, 'rb') as f:
    try:
      if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
      want = min(info.st_size, cap) + 1  # No buffer of `cap` bytes for every small file.
      data = f.read(want)
      if len(data) == want <= cap:  # More than its size said (growing, or /proc-like).
        data += f.read(cap + 1 - len(data))
    except OSError:
      return None
  return data


def _file_key(rel: str) -> str:
  return rel.replace(os.sep, '/')


def _read_files(paths: list[str], label: str, cfg) -> tuple[dict[str, bytes], list[str]]:
  """{path: bytes} of the regular files among `paths`, within the size limits, and the
  paths that are not regular files (skipped unread)."""
  file_cap, total_cap = _limits(cfg)
  out, total, not_regular = {}, 0, []
  for path in paths:
    budget = total_cap - total
    data = read_regular(path, min(file_cap, budget))
    if data is None:
      not_regular.append(path)
      continue
    if len(data) > file_cap:
      raise ConfigError(f'data.max_file_mb: {path} is larger than {file_cap // MIB} MiB; '
                        'raise data.max_file_mb to read it')
    if len(data) > budget:
      raise ConfigError(f'data.max_total_mb: the files of {label} pass {total_cap // MIB} MiB '
                        f'at {path}; raise data.max_total_mb or narrow data.pattern')
    total += len(data)
    out[path] = data
  return out, not_regular


def load_splits(cfg) -> tuple[dict[str, np.ndarray], dict, dict[str, str]]:
  """Bytes of the train/val/test splits as uint8 arrays, facts about the files read, and
  the SHA-256 of each file used ({relative path: hex})."""
  if cfg.name == 'stdlib':
    root, pattern = stdlib_root(), cfg.pattern or '*.py'
    label = f'data.name=stdlib ({root})'
  else:
    if not cfg.path:
      raise ConfigError('data.path: required when data.name=text (a text file or a folder)')
    if not os.path.exists(cfg.path):
      raise ConfigError(f'data.path: not found: {cfg.path}')
    root, pattern = cfg.path, cfg.pattern or '*'
    label = f'data.path {root}'
  fractions = {'test': cfg.test_fraction, 'val': cfg.val_fraction}
  if os.path.isfile(root):
    data = _read_files([root], label, cfg)[0].get(root)
    if data is None:
      raise ConfigError(f'data.path: {root} cannot be read')
    if not data:
      raise ConfigError(f'data.path: {root} is empty')
    if not is_utf8(data):
      raise ConfigError(f'data.path: {root} is not UTF-8 text')
    n = len(data)
    n_train = int(n * (1 - fractions['val'] - fractions['test']))
    n_val = int(n * fractions['val'])
    cuts = {'train': data[:n_train], 'val': data[n_train:n_train + n_val],
            'test': data[n_train + n_val:]}
    splits = {k: np.frombuffer(v, np.uint8) for k, v in cuts.items()}
    hashes = {os.path.basename(root): hashlib.sha256(data).hexdigest()}
    return splits, {'files': {'train': 1, 'val': 1, 'test': 1}, 'skipped': 0,
                    'not_regular': 0}, hashes
  if not os.path.isdir(root):  # A FIFO, a device, a socket: never opened.
    raise ConfigError(f'data.path: {root} is not a regular file or a folder')
  rels = list_files(root, pattern)
  read, not_regular = _read_files([os.path.join(root, r) for r in rels], label, cfg)
  if not_regular:
    print(f'jaxbig: warning: {label}: skipped {len(not_regular)} entries that are not '
          f'readable regular files (FIFOs, devices, sockets, broken links), e.g. '
          f'{not_regular[0]}', file=sys.stderr)
  parts = {'train': [], 'val': [], 'test': []}
  skipped, hashes = 0, {}
  for rel in rels:
    data = read.get(os.path.join(root, rel))
    if not data:  # Empty, or not a regular file.
      continue
    if not is_utf8(data):  # Binary or other encodings: not text for a byte model.
      skipped += 1
      continue
    hashes[_file_key(rel)] = hashlib.sha256(data).hexdigest()
    u = _hash_unit(rel)
    split = ('test' if u < fractions['test'] else
             'val' if u < fractions['test'] + fractions['val'] else 'train')
    parts[split].append(data)
  if not any(parts.values()):
    raise ConfigError(f"data.path: no non-empty UTF-8 files matching '{pattern}' under {root}")
  total = sum(map(len, parts.values()))
  if not parts['train']:
    raise ConfigError(f'data.val_fraction/data.test_fraction: no file of {root} is left for '
                      f'training ({total} files)')
  for split, fraction in fractions.items():
    if fraction > 0 and not parts[split]:
      raise ConfigError(f'data.{split}_fraction: no file of {root} fell into the {split} split '
                        f'({total} files); use more files or another fraction')
  splits = {k: np.frombuffer(b''.join(v), np.uint8) for k, v in parts.items()}
  return splits, {'files': {k: len(v) for k, v in parts.items()}, 'skipped': skipped,
                  'not_regular': len(not_regular)}, hashes


def files_identity(source: str, hashes: dict[str, str]) -> dict:
  """JSON-ready identity of text files: one digest over the sorted (path, SHA-256) pairs,
  and the first 16 hex digits of each file's hash, so that a change can be named."""
  digest = hashlib.sha256()
  for rel, hexdigest in sorted(hashes.items()):
    digest.update(f'{rel}\0{hexdigest}\n'.encode())
  return {'source': source, 'digest': digest.hexdigest(),
          'files': {rel: h[:16] for rel, h in sorted(hashes.items())}}


class _Windows(grain.transforms.RandomMap):
  """A batch of indices -> a batch of random windows of the byte stream."""

  def __init__(self, tokens: np.ndarray, seq_len: int, rows: tuple[int, int] | None):
    self.tokens, self.seq_len, self.rows = tokens, seq_len, rows

  def random_map(self, idx, rng: np.random.Generator):
    lo, hi = self.rows or (0, len(idx))  # Draw for the whole batch, keep this process's rows.
    starts = rng.integers(0, len(self.tokens) - self.seq_len, size=len(idx))[lo:hi]
    windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
    return {'x': windows[:, :-1], 'y': windows[:, 1:]}


def window_batch_spec(size: int, seq_len: int, with_mask: bool) -> dict:
  """Shapes and dtypes of a batch of `size` windows of a language model's tokens."""
  shape = (size, seq_len)
  spec = {'x': jax.ShapeDtypeStruct(shape, np.int32), 'y': jax.ShapeDtypeStruct(shape, np.int32)}
  if with_mask:
    spec['mask'] = jax.ShapeDtypeStruct((size,), np.float32)
  return spec


def window_batches(windows: np.ndarray, batch_size: int) -> Iterator[dict]:
  """(seq_len + 1)-token windows in padded batches with a 0/1 `mask` per window."""
  for start in range(0, len(windows), batch_size):
    w = windows[start:start + batch_size]
    pad = batch_size - len(w)
    mask = np.concatenate([np.ones(len(w), np.float32), np.zeros(pad, np.float32)])
    w = np.concatenate([w, np.zeros((pad, w.shape[1]), np.int32)])
    yield {'x': w[:, :-1], 'y': w[:, 1:], 'mask': mask}


class TextData:
  """Byte-level language-modelling data with the interface of `jaxbig.data.Data`."""

  def __init__(self, cfg, seed: int):
    from jaxbig.data import DataMeta  # Circular otherwise.
    if cfg.seq_len <= 0:
      raise ConfigError(f'data.seq_len must be > 0, got {cfg.seq_len}')
    if cfg.eval_windows <= 0:
      raise ConfigError(f'data.eval_windows must be > 0, got {cfg.eval_windows}')
    for name in ('val_fraction', 'test_fraction'):
      if not 0.0 <= cfg[name] < 1.0:
        raise ConfigError(f'data.{name} must be in [0, 1), got {cfg[name]}')
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
      raise ConfigError('data.val_fraction + data.test_fraction must be < 1')
    self.splits, self.files, self._hashes = load_splits(cfg)
    for split, tokens in self.splits.items():
      if len(tokens) and len(tokens) <= cfg.seq_len:
        raise ConfigError(f'data.seq_len ({cfg.seq_len}) must be shorter than the {split} '
                          f'split ({len(tokens)} bytes)')
    if len(self.splits['train']) == 0:
      raise ConfigError('data.val_fraction/data.test_fraction leave no training text')
    self.meta = DataMeta(
        input_shape=(cfg.seq_len,), num_outputs=VOCAB_SIZE, task='lm', num_classes=VOCAB_SIZE,
        sizes={k: len(v) for k, v in self.splits.items()}, vocab_size=VOCAB_SIZE)
    self.cfg, self.seed = cfg, seed
    counts = np.bincount(self.splits['train'], minlength=VOCAB_SIZE) + 1.0  # Add-one smoothed.
    self._unigram_log2 = np.log2(counts / counts.sum())

  def identity(self) -> dict:
    """What the text is (for resume checks): see `files_identity`."""
    return files_identity(self.cfg.name, self._hashes)

  def train_iter(self, rows: tuple[int, int] | None = None) -> grain.DatasetIterator:
    """An endless, seeded, checkpointable iterator of {'x', 'y'} int32 (batch, seq_len).

    `rows` = (lo, hi) keeps only those rows of each batch: a process's share.
    """
    tokens = self.splits['train']
    per_epoch = max(len(tokens) // self.cfg.seq_len // self.cfg.batch_size, 1)
    ds = (grain.MapDataset.range(per_epoch * self.cfg.batch_size).repeat()
          .batch(self.cfg.batch_size, drop_remainder=True)
          .random_map(_Windows(tokens, self.cfg.seq_len, rows), seed=self.seed))
    return iter(ds.to_iter_dataset(READ_OPTIONS))

  def batch_spec(self, size: int, with_mask: bool) -> dict:
    return window_batch_spec(size, self.cfg.seq_len, with_mask)

  def eval_windows(self, split: str) -> np.ndarray:
    """Up to `eval_windows` non-overlapping (seq_len + 1)-byte windows, evenly spread."""
    tokens, length = self.splits[split], self.cfg.seq_len
    count = (len(tokens) - 1) // length
    picks = np.unique(np.linspace(0, count - 1, min(count, self.cfg.eval_windows)).astype(int))
    return np.stack([tokens[i * length:i * length + length + 1] for i in picks]).astype(np.int32)

  def eval_batches(self, split: str) -> Iterator[dict]:
    return window_batches(self.eval_windows(split), self.cfg.eval_batch_size)

  def tokens_per_byte(self, split: str) -> float:
    del split  # A token is a byte.
    return 1.0

  def unigram_bits_per_byte(self, split: str) -> float:
    """Bits per byte of the training split's byte frequencies on `split`: the bar to clear."""
    return float(-self._unigram_log2[self.eval_windows(split)[:, 1:]].mean())
