"""`data.name=tokens data.path=DIR`: training on token shards made by `jaxbig prepare text`.

The shards are memory-mapped, never read whole: resident memory does not grow with the
corpus. Training draws `data.batch_size` windows of `seq_len + 1` tokens at seeded random
offsets (a shard chosen in proportion to its windows, then an offset in it); each process
reads only its rows of the global batch; the iterator's position is checkpointed. Windows
may cross a document's end-of-document token, as in GPT-2 and nanoGPT training.

Evaluation reads up to `data.eval_windows` non-overlapping windows spread evenly over a
split and reports bits per byte (bits per token x tokens per text byte of that split, so
byte and BPE models share a scale) beside the loss per token.

Every shard's size is checked against the manifest when the data is opened, and its
SHA-256 with `data.verify_shards=true`; the run's tokenizer (`data.tokenizer`, by default
the copy in DIR) must be the one that made the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from typing import Iterator

import grain
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data import prepare, text as text_lib, tokenizer as tokenizer_lib


def read_manifest(path: str) -> dict:
  """DIR/manifest.json, checked to be one `jaxbig prepare text` wrote."""
  return prepare.read_manifest(
      path, 'text', 'jaxbig-tokens-1',
      lambda m: (m['splits']['train']['shards'], m['tokenizer']['identity']))


def run_tokenizer(cfg, manifest: dict):
  """The run's tokenizer: `data.tokenizer`, or the copy the prepared folder holds; it must
  be the one the shards were made with."""
  spec = cfg.get('tokenizer', '')
  own = manifest['tokenizer']
  if not spec:
    spec = os.path.join(cfg.path, own['file']) if own['file'] else tokenizer_lib.BYTES
  tok = tokenizer_lib.load(spec)
  if tok.identity != own['identity']:
    raise ConfigError(f'data.tokenizer: {spec} is not the tokenizer that made the shards in '
                      f'{cfg.path} (SHA-256 {tok.identity[:12]} vs {own["identity"][:12]})')
  return tok


class _Maps:
  """Memory maps of shard files, opened on first use. Copies and pickles (grain copies its
  transforms) carry the paths, never the tokens: copying a memory map reads it whole."""

  def __init__(self, paths: list[str], dtype: np.dtype):
    self.paths, self.dtype, self._maps = paths, dtype, None

  def __getstate__(self):
    return {'paths': self.paths, 'dtype': self.dtype, '_maps': None}

  def __getitem__(self, i: int) -> np.ndarray:
    if self._maps is None:  # Plain arrays over the maps: np.memmap's slices are slow to make.
      self._maps = [np.memmap(p, self.dtype, 'r').view(np.ndarray) for p in self.paths]
    return self._maps[i]


class _Windows(grain.transforms.RandomMap):
  """A batch number -> a batch of random windows of seq_len + 1 tokens from the shards
  (one grain element per batch: grain's per-element cost would dominate small windows)."""

  def __init__(self, shards: list[np.ndarray], seq_len: int, batch_size: int,
               rows: tuple[int, int] | None):
    self.shards = (_Maps([s.filename for s in shards], shards[0].dtype)
                   if all(isinstance(s, np.memmap) for s in shards) else shards)
    self.seq_len, self.batch_size, self.rows = seq_len, batch_size, rows
    windows = np.array([max(len(s) - seq_len, 0) for s in shards], np.float64)
    self.p = windows / windows.sum()

  def random_map(self, batch, rng: np.random.Generator):
    del batch  # The draws come from the per-batch rng.
    size = self.batch_size
    lo, hi = self.rows or (0, size)  # Draw for the whole batch, keep this process's rows.
    which = rng.choice(len(self.p), size=size, p=self.p)[lo:hi]
    unit = rng.random(size)[lo:hi]
    windows = np.empty((hi - lo, self.seq_len + 1), np.int32)
    offsets = np.arange(self.seq_len + 1)
    for w in np.unique(which):  # One gather per shard drawn.
      rows = np.flatnonzero(which == w)
      shard = self.shards[w]
      starts = (unit[rows] * (len(shard) - self.seq_len)).astype(np.int64)
      windows[rows] = shard[starts[:, None] + offsets]
    return {'x': windows[:, :-1], 'y': windows[:, 1:]}


class TokensData:
  """Prepared token shards with the interface of `jaxbig.data.Data`."""

  def __init__(self, cfg, seed: int):
    from jaxbig.data import DataMeta  # Circular otherwise.
    if cfg.seq_len <= 0:
      raise ConfigError(f'data.seq_len must be > 0, got {cfg.seq_len}')
    if cfg.eval_windows <= 0:
      raise ConfigError(f'data.eval_windows must be > 0, got {cfg.eval_windows}')
    self.manifest, self.tokenizer, self.shards, counts = self._load(cfg, seed)
    for split, shards in self.shards.items():  # Every split with tokens needs a window.
      longest = max((len(s) for s in shards), default=0)
      if (split == 'train' or longest) and longest <= cfg.seq_len:
        raise ConfigError(f'data.seq_len ({cfg.seq_len}) must be shorter than the longest '
                          f'{split} shard ({longest} tokens)')
    vocab = tokenizer_lib.padded_vocab(self.tokenizer.vocab_size)
    sizes = {split: info['tokens'] for split, info in self.manifest['splits'].items()}
    self.meta = DataMeta(input_shape=(cfg.seq_len,), num_outputs=vocab, task='lm',
                         num_classes=self.tokenizer.vocab_size, sizes=sizes, vocab_size=vocab,
                         doc_eos=self.tokenizer.eos_id if cfg.get('pack', False) else -1)
    self.cfg, self.seed = cfg, seed
    counts = counts.astype(np.float64)[:vocab]
    counts[:self.tokenizer.vocab_size] += 1.0  # Add-one smoothed; padding ids stay at 0.
    with np.errstate(divide='ignore'):
      self._unigram_log2 = np.log2(counts / counts.sum())

  @classmethod
  def _load(cls, cfg, seed: int) -> tuple[dict, object, dict, np.ndarray]:
    """(manifest, tokenizer, {split: [shard]}, training unigram counts)."""
    del seed
    if not cfg.path:
      raise ConfigError('data.path: required when data.name=tokens (a folder made by '
                        'jaxbig prepare text)')
    manifest = read_manifest(cfg.path)
    tokenizer = run_tokenizer(cfg, manifest)
    dtype = np.dtype(manifest['dtype'])
    shards = {split: [cls._open(cfg, entry, dtype, cfg.get('verify_shards', False))
                      for entry in info['shards']]
              for split, info in manifest['splits'].items()}
    return manifest, tokenizer, shards, np.load(os.path.join(cfg.path, 'unigram.npy'))

  @staticmethod
  def _open(cfg, entry: dict, dtype: np.dtype, verify: bool) -> np.ndarray:
    path = os.path.join(cfg.path, entry['file'])
    want = entry['tokens'] * dtype.itemsize
    try:
      size = os.path.getsize(path)
    except OSError:
      raise ConfigError(f'data.path: shard {path} is missing') from None
    if size != want:
      raise ConfigError(f'data.path: shard {path} has {size} bytes, the manifest {want}: '
                        'damaged or truncated; prepare the folder again')
    if entry['tokens'] == 0:
      return np.zeros(0, dtype)
    shard = np.memmap(path, dtype, 'r')
    if verify and hashlib.sha256(shard).hexdigest() != entry['sha256']:
      raise ConfigError(f'data.path: shard {path} does not match its SHA-256 in the manifest')
    return shard

  def identity(self) -> dict:
    """What the tokens are (for resume checks): the manifest's shard digests."""
    digest = hashlib.sha256(json.dumps(self.manifest['splits'], sort_keys=True).encode())
    return {'source': 'tokens', 'path': os.path.abspath(self.cfg.path),
            'digest': digest.hexdigest(), 'tokenizer': self.manifest['tokenizer']['identity']}

  def tokens_per_byte(self, split: str) -> float:
    info = self.manifest['splits'][split]
    return info['tokens'] / max(info['bytes'], 1)

  def train_iter(self, rows: tuple[int, int] | None = None) -> grain.DatasetIterator:
    """An endless, seeded, checkpointable iterator of {'x', 'y'} int32 (batch, seq_len)."""
    shards = [s for s in self.shards['train'] if len(s) > self.cfg.seq_len]
    total = sum(len(s) for s in shards)
    per_epoch = max(total // self.cfg.seq_len // self.cfg.batch_size, 1)
    windows = _Windows(shards, self.cfg.seq_len, self.cfg.batch_size, rows)
    ds = grain.MapDataset.range(per_epoch).repeat().random_map(windows, seed=self.seed)
    return iter(ds.to_iter_dataset(text_lib.READ_OPTIONS))

  def batch_spec(self, size: int, with_mask: bool) -> dict:
    return text_lib.window_batch_spec(size, self.cfg.seq_len, with_mask)

  def eval_windows(self, split: str) -> np.ndarray:
    """Up to `eval_windows` non-overlapping windows, evenly spread over the split's shards."""
    length, shards = self.cfg.seq_len, self.shards[split]
    ends = np.cumsum([max(len(s) - 1, 0) // length for s in shards])  # Windows so far.
    if not len(ends) or ends[-1] == 0:
      return np.zeros((0, length + 1), np.int32)
    picks = np.unique(np.linspace(0, ends[-1] - 1, min(ends[-1], self.cfg.eval_windows))
                      .astype(np.int64))
    rows = []
    for p in picks:
      i = int(np.searchsorted(ends, p, side='right'))  # The shard holding window p.
      k = int(p - (ends[i - 1] if i else 0))
      rows.append(np.asarray(shards[i][k * length:(k + 1) * length + 1], np.int32))
    return np.stack(rows)

  def eval_batches(self, split: str) -> Iterator[dict]:
    """The split's evaluation windows in padded batches with a 0/1 `mask` per window."""
    return text_lib.window_batches(self.eval_windows(split), self.cfg.eval_batch_size)

  def unigram_bits_per_byte(self, split: str) -> float:
    """Bits per byte of the training tokens' frequencies on `split`: the bar to clear."""
    windows = self.eval_windows(split)
    if not len(windows):
      return float('nan')
    return float(-self._unigram_log2[windows[:, 1:]].mean()) * self.tokens_per_byte(split)


class RandomTokens(TokensData):
  """`data.name=random_tokens`: uniformly random ids of a `data.vocab_size` vocabulary, for
  `jaxbig plan` and `jaxbig bench` at any vocabulary without a corpus (nothing to learn:
  the loss stays near ln(vocab)). The last id plays the end-of-document token."""

  @classmethod
  def _load(cls, cfg, seed: int):
    vocab = cfg.get('vocab_size', 0)
    if not 2 <= vocab < tokenizer_lib.MAX_VOCAB:
      raise ConfigError(f'data.vocab_size: data.name=random_tokens needs a vocabulary of '
                        f'2..{tokenizer_lib.MAX_VOCAB - 1}, got {vocab}')
    rng = np.random.default_rng(seed)
    size = {'train': max(2**20, 4 * (cfg.seq_len + 1)), 'val': 2 * (cfg.seq_len + 1)}
    size['test'] = size['val']
    shards = {s: [rng.integers(0, vocab, n, dtype=np.uint32)] for s, n in size.items()}
    tokenizer = types.SimpleNamespace(vocab_size=vocab, eos_id=vocab - 1,
                                      identity=f'random-{vocab}')
    manifest = {'tokenizer': {'identity': tokenizer.identity},
                'splits': {s: {'tokens': n, 'bytes': n, 'documents': 0} for s, n in size.items()}}
    return manifest, tokenizer, shards, np.ones(vocab)

  def identity(self) -> dict:
    return {}  # Made by the config, as synthetic arrays are.


class NoCorpus(TokensData):
  """`data.name=none`: a language model's tokenizer (`data.tokenizer`) and no text, as in a
  workdir that `jaxbig import-hf` wrote: `generate` and `export-hf` work on it; training or
  evaluating needs a data source (`train.init_from=` that workdir in a run that has one)."""

  trains = False

  @classmethod
  def _load(cls, cfg, seed: int):
    del seed
    tokenizer = tokenizer_lib.load(cfg.get('tokenizer', '') or tokenizer_lib.BYTES)
    # One window of padding ids per split: enough for the checks, never read.
    shards = {s: [np.zeros(cfg.seq_len + 1, np.uint32)] for s in ('train', 'val', 'test')}
    manifest = {'tokenizer': {'identity': tokenizer.identity},
                'splits': {s: {'tokens': 0, 'bytes': 0, 'documents': 0} for s in shards}}
    return manifest, tokenizer, shards, np.ones(tokenizer.vocab_size)

  def identity(self) -> dict:
    return {'tokenizer': self.manifest['tokenizer']['identity']}

  def train_iter(self, rows=None):
    raise ConfigError('data.name=none: this run has no text to train or evaluate on; train '
                      'with a data source and train.init_from=<this workdir>')
