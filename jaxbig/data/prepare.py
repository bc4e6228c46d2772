"""`jaxbig prepare text SOURCE --out DIR`: a corpus tokenized once into token shards.

Sources: a folder of text files (`--pattern`, a document per file, split by a hash of its
path as `data.name=text` splits it), a `.jsonl` file (a document per line, its `--field`,
split by a hash of the text) or one text file (cut into consecutive train/val/test ranges).
A document's split never depends on the other documents, so it keeps it when the corpus
grows.

Output, in DIR: per split, shards `train-00000.bin` of little-endian token ids (uint16 where
the vocabulary fits, else uint32), each document followed by the end-of-document token,
each with a sidecar `train-00000.json` (its tokens, documents, text bytes, SHA-256); the
tokenizer file itself; `unigram.npy` (training token counts); and `manifest.json`, written
last. Flat arrays, not records: training reads windows at any token offset, which a
memory map gives without a per-record index.

Shard boundaries follow the documents' text bytes (`--shard-mb`), so they are known before
anything is tokenized: an interrupted run, run again, tokenizes only the shards without a
complete sidecar. A shard is written as `.partial` and renamed; a half-written shard never
counts. Tokenizing runs in `--workers` processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import sys
import time
import zlib
from typing import Iterator

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data import text as text_lib, tokenizer as tokenizer_lib

MANIFEST = 'manifest.json'
PLAN = 'prepare.json'  # Written first: what this folder is being prepared from.
SPLITS = ('train', 'val', 'test')
MAX_DOCUMENT_BYTES = 256 * 2**20
MAX_SINGLE_FILE_BYTES = 16 * 2**30


def _split_of(key: str, val_fraction: float, test_fraction: float) -> str:
  u = zlib.crc32(key.encode('utf-8', 'surrogatepass')) / 2**32
  return 'test' if u < test_fraction else 'val' if u < test_fraction + val_fraction else 'train'


def documents(source: str, pattern: str, field: str, val_fraction: float,
              test_fraction: float) -> Iterator[tuple[str, str, str]]:
  """(split, key, text) of every document of `source`, in a fixed order."""
  if os.path.isdir(source):
    for rel in text_lib.list_files(source, pattern or '*'):
      path = os.path.join(source, rel)
      data = text_lib.read_regular(path, MAX_DOCUMENT_BYTES)
      if data is not None and len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f'{path}: larger than {MAX_DOCUMENT_BYTES >> 20} MiB; not a document')
      if not data or not text_lib.is_utf8(data):
        continue  # Empty, unreadable, not a regular file, or binary: not text.
      key = rel.replace(os.sep, '/')
      yield _split_of(key, val_fraction, test_fraction), key, data.decode('utf-8')
  elif source.endswith('.jsonl'):
    if not stat.S_ISREG(os.stat(source).st_mode):  # A FIFO would block.
      raise ConfigError(f'{source}: not a regular file')
    with open(source, 'rb') as f:
      for n, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          doc = json.loads(raw.decode('utf-8'))[field]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
          raise ConfigError(f"{source}:{n}: not a UTF-8 JSON object with a string field "
                            f"'{field}' (--field)") from None
        if not isinstance(doc, str):
          raise ConfigError(f"{source}:{n}: field '{field}' is not a string")
        try:
          doc.encode('utf-8')
        except UnicodeEncodeError:  # A lone surrogate escape.
          raise ConfigError(f"{source}:{n}: field '{field}' is not valid Unicode") from None
        if doc:
          yield _split_of(doc, val_fraction, test_fraction), f'{n}', doc
  else:
    data = text_lib.read_regular(source, MAX_SINGLE_FILE_BYTES)
    if data is not None and len(data) > MAX_SINGLE_FILE_BYTES:
      raise ConfigError(f'{source}: one file over {MAX_SINGLE_FILE_BYTES >> 30} GiB; give a '
                        'folder of files or a .jsonl file')
    if not data or not text_lib.is_utf8(data):
      raise ConfigError(f'{source}: not a non-empty UTF-8 text file, .jsonl file or folder')
    n = len(data)
    cuts = (0, int(n * (1 - val_fraction - test_fraction)), int(n * (1 - test_fraction)), n)
    for split, lo, hi in zip(SPLITS, cuts, cuts[1:]):
      if hi > lo:
        yield split, f'{split}', data[lo:hi].decode('utf-8', errors='replace')


def plan_shards(docs, shard_bytes: int) -> dict[str, list[list]]:
  """Per split, shards as lists of (key, text), closed when their text reaches shard_bytes."""
  shards = {s: [[]] for s in SPLITS}
  sizes = {s: 0 for s in SPLITS}
  for split, key, doc in docs:
    if sizes[split] >= shard_bytes:
      shards[split].append([])
      sizes[split] = 0
    shards[split][-1].append((key, doc))
    sizes[split] += len(doc.encode('utf-8'))
  return {s: [sh for sh in v if sh] for s, v in shards.items()}


def _digest(docs: list) -> str:
  h = hashlib.sha256()
  for key, doc in docs:
    h.update(key.encode('utf-8', 'surrogatepass') + b'\0')
    h.update(hashlib.sha256(doc.encode('utf-8')).digest())
  return h.hexdigest()


_TOKENIZER = None


def _worker_init(spec: str) -> None:
  global _TOKENIZER
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # One thread per worker process.
  _TOKENIZER = tokenizer_lib.load(spec)


def _encode(doc: str) -> np.ndarray:
  ids = _TOKENIZER.encode(doc)
  return np.append(ids, _TOKENIZER.eos_id).astype(np.int64)


def _fmt_rate(n: float, seconds: float, unit: str) -> str:
  rate = n / max(seconds, 1e-9)
  return f'{rate / 1e6:.2f} M{unit}/s' if rate >= 1e5 else f'{rate:.0f} {unit}/s'


def prepare_text(source: str, out: str, tokenizer: str = 'bytes', *, pattern: str = '',
                 field: str = 'text', val_fraction: float = 0.05, test_fraction: float = 0.05,
                 shard_mb: float = 256.0, workers: int = 0, stream=None) -> dict:
  """Tokenizes `source` into shards in `out` (see the module docstring); returns the
  manifest. Reruns finish what an interrupted run left."""
  stream = stream or sys.stderr
  if not os.path.exists(source):
    raise ConfigError(f'SOURCE: not found: {source}')
  for name, value in (('--val-fraction', val_fraction), ('--test-fraction', test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ConfigError(f'{name} must be in [0, 1), got {value}')
  if val_fraction + test_fraction >= 1.0:
    raise ConfigError('--val-fraction + --test-fraction must be < 1')
  if not shard_mb > 0:
    raise ConfigError(f'--shard-mb must be > 0, got {shard_mb}')
  tok = tokenizer_lib.load(tokenizer, '--tokenizer')
  workers = workers or os.cpu_count() or 1
  t0 = time.perf_counter()
  shards = plan_shards(documents(source, pattern, field, val_fraction, test_fraction),
                       int(shard_mb * 2**20))
  if not shards['train']:
    raise ConfigError(f'{source}: no document of the source fell into the train split')
  digests = {s: [_digest(sh) for sh in v] for s, v in shards.items()}
  source_digest = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
  plan = {'tokenizer': tok.identity, 'source_digest': source_digest,
          'val_fraction': val_fraction, 'test_fraction': test_fraction}
  _claim(out, plan)
  vocab = tokenizer_lib.padded_vocab(tok.vocab_size)
  dtype = np.dtype('<u2') if vocab <= 2**16 else np.dtype('<u4')
  total_bytes = sum(len(d.encode('utf-8')) for v in shards.values() for sh in v for _, d in sh)
  done_bytes, tokens_made = 0, 0
  ctx = multiprocessing.get_context('spawn')  # No fork of a process that may hold threads.
  with ctx.Pool(workers, _worker_init, (tokenizer,)) as pool:
    for split in SPLITS:
      for i, docs in enumerate(shards[split]):
        name = f'{split}-{i:05d}'
        size = sum(len(d.encode('utf-8')) for _, d in docs)
        if _complete(out, name, dtype, tok.identity, digests[split][i]) is None:
          chunk = max(1, len(docs) // (4 * workers))
          arrays = pool.map(_encode, [d for _, d in docs], chunksize=chunk)
          ids = np.concatenate(arrays)
          _write_shard(out, name, ids.astype(dtype), len(docs), size, tok.identity,
                       digests[split][i])
          tokens_made += len(ids)
        done_bytes += size
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(done_bytes, 1) * (total_bytes - done_bytes)
        print(f'prepare: {name} done; {done_bytes / 2**20:.1f}/{total_bytes / 2**20:.1f} MiB, '
              f'{_fmt_rate(tokens_made, elapsed, "tokens")}, '
              f'{_fmt_rate(done_bytes, elapsed, "B")}, eta {eta:.0f} s', file=stream, flush=True)
  manifest = _finish(out, tok, tokenizer, dtype, shards, plan)
  return manifest


def _claim(out: str, plan: dict) -> None:
  """Makes `out` ours, or checks that it is ours and made from the same source and
  tokenizer; never touches a folder jaxbig did not create."""
  plan_path = os.path.join(out, PLAN)
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(plan_path):
      raise ConfigError(f'--out: {out} is not empty and not a jaxbig prepare folder; '
                        'give a new folder')
    with open(plan_path) as f:
      saved = json.load(f)
    if saved != plan:
      what = 'tokenizer' if saved.get('tokenizer') != plan['tokenizer'] else 'source'
      raise ConfigError(f'--out: {out} was prepared from another {what}; give a new folder')
    return
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f'--out: {out} exists and is not a folder')
  os.makedirs(out, exist_ok=True)
  _write_json(plan_path, plan)


def _write_json(path: str, obj) -> None:
  tmp = path + '.partial'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _complete(out: str, name: str, dtype, tokenizer: str, digest: str) -> dict | None:
  """The sidecar of shard `name` if the shard is whole and made from these documents."""
  try:
    with open(os.path.join(out, name + '.json')) as f:
      side = json.load(f)
    size = os.path.getsize(os.path.join(out, name + '.bin'))
  except (OSError, ValueError):
    return None
  if (side.get('tokenizer') != tokenizer or side.get('documents_digest') != digest
      or side.get('dtype') != dtype.str or size != side.get('tokens', -1) * dtype.itemsize):
    return None
  return side


def _write_shard(out: str, name: str, ids: np.ndarray, docs: int, size: int, tokenizer: str,
                 digest: str) -> None:
  path = os.path.join(out, name + '.bin')
  with open(path + '.partial', 'wb') as f:
    f.write(ids.tobytes())
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.partial', path)
  _write_json(os.path.join(out, name + '.json'), {
      'tokens': int(len(ids)), 'documents': docs, 'bytes': size, 'dtype': ids.dtype.str,
      'sha256': hashlib.sha256(ids.tobytes()).hexdigest(), 'tokenizer': tokenizer,
      'documents_digest': digest})


def _finish(out: str, tok, spec: str, dtype, shards: dict, plan: dict) -> dict:
  """Copies the tokenizer in, counts the training tokens and writes manifest.json."""
  tok_file = ''
  if tok.path:
    tok_file = 'tokenizer' + os.path.splitext(tok.path)[1]
    shutil.copyfile(tok.path, os.path.join(out, tok_file + '.partial'))
    os.replace(os.path.join(out, tok_file + '.partial'), os.path.join(out, tok_file))
  splits = {}
  counts = np.zeros(tokenizer_lib.padded_vocab(tok.vocab_size), np.int64)
  for split in SPLITS:
    entries = []
    for i in range(len(shards[split])):
      name = f'{split}-{i:05d}'
      with open(os.path.join(out, name + '.json')) as f:
        side = json.load(f)
      entries.append({'file': name + '.bin', **{k: side[k] for k in
                                                ('tokens', 'documents', 'bytes', 'sha256')}})
      if split == 'train':
        ids = np.memmap(os.path.join(out, name + '.bin'), dtype, 'r')
        for lo in range(0, len(ids), 2**26):  # In slices: bincount copies to 8-byte ints.
          counts += np.bincount(ids[lo:lo + 2**26], minlength=len(counts))[:len(counts)]
    splits[split] = {'shards': entries,
                     **{k: sum(e[k] for e in entries) for k in ('tokens', 'documents', 'bytes')}}
  np.save(os.path.join(out, 'unigram.npy.partial.npy'), counts)
  os.replace(os.path.join(out, 'unigram.npy.partial.npy'), os.path.join(out, 'unigram.npy'))
  manifest = {'format': 'jaxbig-tokens-1', 'tokenizer': {
      'identity': tok.identity, 'file': tok_file, 'vocab_size': tok.vocab_size,
      'eos_id': tok.eos_id, 'source': spec}, 'dtype': dtype.str, 'splits': splits,
      'source_digest': plan['source_digest'], 'val_fraction': plan['val_fraction'],
      'test_fraction': plan['test_fraction']}
  _write_json(os.path.join(out, MANIFEST), manifest)
  return manifest
