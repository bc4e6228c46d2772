"""`jaxbig prepare text SOURCE --out DIR`: a corpus tokenized once into token shards.

Sources: a folder of text files (`--pattern`, a document per file, split by a hash of its
path as `data.name=text` splits it); a `.jsonl` or `.parquet` file, or a folder of them
(`--pattern '*.parquet'`), a document per record's `--field`, split by a hash of the text;
a folder written by `datasets`' `save_to_disk` (a DatasetDict keeps its own train/validation/
test splits); or one text file, cut into consecutive train/val/test ranges at line ends. A
document's split never depends on the other documents, so it keeps it when the corpus grows.

Output, in DIR: per split, shards `train-00000.bin` of little-endian token ids (uint16 where
the vocabulary fits, else uint32), each document followed by the end-of-document token,
each with a sidecar `train-00000.json` (its tokens, documents, text bytes, SHA-256); the
tokenizer file itself; `unigram.npy` (training token counts); and `manifest.json`, written
last. Flat arrays, not records: training reads windows at any token offset, which a
memory map gives without a per-record index.

The source is read twice and never held whole. The first pass plans the shards from the
documents' text bytes (`--shard-mb`) and digests; the second tokenizes, one open shard per
split, in `--workers` processes. An interrupted run, run again, tokenizes only the shards
without a complete sidecar. A shard is written as `.partial` and renamed; a half-written
shard never counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import shutil
import stat
import sys
import time
import zlib
from typing import Any, Iterator

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data import text as text_lib, tokenizer as tokenizer_lib

MANIFEST = 'manifest.json'
PLAN = 'prepare.json'  # Written first: what this folder is being prepared from.
SPLITS = ('train', 'val', 'test')
MAX_DOCUMENT_BYTES = 256 * 2**20


def _split_of(key: str, val_fraction: float, test_fraction: float) -> str:
  u = zlib.crc32(key.encode('utf-8', 'surrogatepass')) / 2**32
  return 'test' if u < test_fraction else 'val' if u < test_fraction + val_fraction else 'train'


def _checked_text(doc, where: str, field: str) -> str:
  if not isinstance(doc, str):
    raise ConfigError(f"{where}: field '{field}' is not a string")
  try:
    doc.encode('utf-8')
  except UnicodeEncodeError:  # A lone surrogate escape.
    raise ConfigError(f"{where}: field '{field}' is not valid Unicode") from None
  return doc


def _jsonl_texts(path: str, field: str) -> Iterator[tuple[int, str]]:
  if not stat.S_ISREG(os.stat(path).st_mode):  # A FIFO would block.
    raise ConfigError(f'{path}: not a regular file')
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        doc = json.loads(raw.decode('utf-8'))[field]
      except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise ConfigError(f"{path}:{n}: not a UTF-8 JSON object with a string field "
                          f"'{field}' (--field)") from None
      yield n, _checked_text(doc, f'{path}:{n}', field)


def _needs(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConfigError(f"{what} needs {module.split('.')[0]}: pip install 'jaxbig[sources]'"
                      ) from None


def _parquet_texts(path: str, field: str) -> Iterator[tuple[int, str]]:
  pq = _needs('pyarrow.parquet', f'{path}: a parquet source')
  if not stat.S_ISREG(os.stat(path).st_mode):  # A FIFO would block.
    raise ConfigError(f'{path}: not a regular file')
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for a file that is not parquet.
    raise ConfigError(f'{path}: not a parquet file ({type(e).__name__})') from None
  if field not in table.schema_arrow.names:
    raise ConfigError(f"{path}: no column '{field}' (--field); it has "
                      f"{', '.join(table.schema_arrow.names)}")
  n = 0
  for batch in table.iter_batches(batch_size=1024, columns=[field]):
    for doc in batch.column(0).to_pylist():
      n += 1
      if doc is not None:
        yield n, _checked_text(doc, f'{path}: row {n}', field)


def _records(path: str, field: str) -> Iterator[tuple[int, str]]:
  return (_parquet_texts if path.endswith('.parquet') else _jsonl_texts)(path, field)


# A `datasets` DatasetDict's own splits, by name; others (imdb's 'unsupervised') are left out.
HF_SPLITS = {'train': 'train', 'validation': 'val', 'valid': 'val', 'val': 'val', 'test': 'test'}


def is_hf_folder(path: str) -> bool:
  """A folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
  return (os.path.isfile(os.path.join(path, 'dataset_dict.json'))
          or (os.path.isfile(os.path.join(path, 'state.json'))
              and os.path.isfile(os.path.join(path, 'dataset_info.json'))))


def _hf_documents(source: str, field: str, val_fraction: float, test_fraction: float):
  """Documents of a `save_to_disk` folder. A DatasetDict keeps its own train/validation/test
  splits; a split it lacks is drawn from its train split by hash, as for other sources."""
  datasets = _needs('datasets', f'{source}: a datasets folder')
  try:
    loaded = datasets.load_from_disk(source)
  except Exception as e:  # datasets raises several types for a damaged folder.
    raise ConfigError(f'{source}: not a datasets save_to_disk folder ({e})') from None
  parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {'': loaded}
  own = {HF_SPLITS[name] for name in parts if name in HF_SPLITS}
  vf = 0.0 if 'val' in own else val_fraction
  tf = 0.0 if 'test' in own else test_fraction
  for name, ds in parts.items():
    if name and name not in HF_SPLITS:
      continue
    if field not in ds.column_names:
      raise ConfigError(f"{source}: split '{name or 'train'}' has no column '{field}' "
                        f"(--field); it has {', '.join(ds.column_names)}")
    n = 0
    for batch in ds.select_columns([field]).iter(batch_size=1024):
      for doc in batch[field]:
        n += 1
        if doc is None:
          continue
        doc = _checked_text(doc, f'{source}: {name or "row"} {n}', field)
        split = HF_SPLITS.get(name, 'train')
        if doc and split == 'train':
          split = _split_of(doc, vf, tf)
        if doc:
          yield split, f'{name}:{n}', doc, True


PIECE_BYTES = 2**20


def _file_pieces(source: str, val_fraction: float, test_fraction: float):
  """One text file, cut into consecutive train/val/test ranges at line ends and read in
  pieces of about PIECE_BYTES, so a large file is never held whole; the end-of-document
  token follows only a range's last piece."""
  try:
    info = os.stat(source)
    if not stat.S_ISREG(info.st_mode):
      raise OSError
    f = open(source, 'rb')
  except OSError:
    raise ConfigError(f'{source}: not a readable regular file') from None
  with f:
    def line_end(pos: int) -> int:  # The first offset after a newline at or past pos.
      if pos <= 0 or pos >= info.st_size:
        return max(0, min(pos, info.st_size))
      f.seek(pos - 1)
      while chunk := f.read(PIECE_BYTES):
        at = chunk.find(b'\n')
        if at >= 0:
          return f.tell() - len(chunk) + at + 1
      return info.st_size

    n = info.st_size
    if not n:
      raise ConfigError(f'{source}: empty; give a non-empty UTF-8 text file, .jsonl, '
                        '.parquet or folder')
    cuts = [line_end(c) for c in (0, int(n * (1 - val_fraction - test_fraction)),
                                  int(n * (1 - test_fraction)), n)]
    for split, lo, hi in zip(SPLITS, cuts, cuts[1:]):
      pos = lo
      f.seek(lo)
      while pos < hi:
        data = f.read(min(PIECE_BYTES, hi - pos))
        if not data:
          raise ConfigError(f'{source}: shrank while it was being read; run again')
        if pos + len(data) < hi:
          at = data.rfind(b'\n')
          if at >= 0:
            data = data[:at + 1]
            f.seek(pos + len(data))
        try:
          text = data.decode('utf-8')
        except UnicodeDecodeError as e:
          if pos + len(data) < hi and 0 < e.start and len(data) - e.start < 4:  # Cut in two.
            data = data[:e.start]
            f.seek(pos + len(data))
            text = data.decode('utf-8')
          else:
            raise ConfigError(f'{source}: not UTF-8 text (byte {pos + e.start})') from None
        yield split, f'{split}@{pos}', text, pos + len(data) >= hi
        pos += len(data)


def documents(source: str, pattern: str, field: str, val_fraction: float,
              test_fraction: float, exclude: str = '') -> Iterator[tuple[str, str, str, bool]]:
  """(split, key, text, eos) of every document of `source`, in a fixed order; `eos` is False
  for a piece of a longer text that the next piece continues. Files under `exclude` (the
  output folder) are not read."""
  if os.path.isdir(source) and is_hf_folder(source):
    yield from _hf_documents(source, field, val_fraction, test_fraction)
  elif os.path.isdir(source):
    skip = os.path.relpath(os.path.realpath(exclude), os.path.realpath(source)) if exclude else ''
    jsonl = pattern.endswith('.jsonl')  # Else a .jsonl file is a text document.
    for rel in text_lib.list_files(source, pattern or '*'):
      if skip and not skip.startswith('..') and (rel + os.sep).startswith(skip + os.sep):
        continue
      path = os.path.join(source, rel)
      key = rel.replace(os.sep, '/')
      if rel.endswith('.parquet') or (jsonl and rel.endswith('.jsonl')):
        for n, doc in _records(path, field):
          if doc:
            yield _split_of(doc, val_fraction, test_fraction), f'{key}:{n}', doc, True
        continue
      data = text_lib.read_regular(path, MAX_DOCUMENT_BYTES)
      if data is not None and len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f'{path}: larger than {MAX_DOCUMENT_BYTES >> 20} MiB; not a document')
      if not data or not text_lib.is_utf8(data):
        continue  # Empty, unreadable, not a regular file, or binary: not text.
      yield _split_of(key, val_fraction, test_fraction), key, data.decode('utf-8'), True
  elif source.endswith(('.jsonl', '.parquet')):
    for n, doc in _records(source, field):
      if doc:
        yield _split_of(doc, val_fraction, test_fraction), f'{n}', doc, True
  else:
    yield from _file_pieces(source, val_fraction, test_fraction)


@dataclasses.dataclass
class Shard:
  """What a shard will hold, known before anything is tokenized."""
  documents: int = 0  # Texts, pieces included.
  bytes: int = 0
  eos: int = 0  # Documents ended in it.
  digest: Any = dataclasses.field(default_factory=hashlib.sha256)

  def add(self, key: str, doc: str, eos: bool) -> None:
    self.documents += 1
    self.eos += eos
    self.bytes += len(doc.encode('utf-8'))
    self.digest.update(key.encode('utf-8', 'surrogatepass') + b'\0')
    self.digest.update(hashlib.sha256(doc.encode('utf-8')).digest())


def plan_shards(docs, shard_bytes: int, progress=None) -> dict[str, list[Shard]]:
  """Per split, the shards: each closed once its text reaches shard_bytes. Reads the
  documents once and keeps only their counts and digests."""
  shards = {s: [Shard()] for s in SPLITS}
  for split, key, doc, eos in docs:
    if shards[split][-1].bytes >= shard_bytes:
      shards[split].append(Shard())
    shards[split][-1].add(key, doc, eos)
    if progress:
      progress(shards)
  return {s: [sh for sh in v if sh.documents] for s, v in shards.items()}


_TOKENIZER = None
_DTYPE = None


def _worker_init(spec: str, dtype: str) -> None:
  global _TOKENIZER, _DTYPE
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # One thread per worker process.
  _TOKENIZER, _DTYPE = tokenizer_lib.load(spec), np.dtype(dtype)


def _encode_with(tok, dtype: np.dtype, item: tuple[str, bool]) -> np.ndarray:
  """The document's ids in the shard's dtype (the vocabulary fits it), eos appended."""
  doc, eos = item
  ids = tok.encode(doc)
  return np.append(ids, tok.eos_id).astype(dtype) if eos else ids.astype(dtype)


def _encode(item: tuple[str, bool]) -> np.ndarray:
  return _encode_with(_TOKENIZER, _DTYPE, item)


def fmt_rate(n: float, seconds: float, unit: str) -> str:
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
  shard_bytes = int(shard_mb * 2**20)
  read = lambda: documents(source, pattern, field, val_fraction, test_fraction, exclude=out)
  shards = plan_shards(read(), shard_bytes, _Progress(stream, 'prepare: reading'))
  if not shards['train']:
    raise ConfigError(f'{source}: no document of the source fell into the train split')
  digests = {s: [sh.digest.hexdigest() for sh in v] for s, v in shards.items()}
  source_digest = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
  plan = {'tokenizer': tok.identity, 'source_digest': source_digest,
          'val_fraction': val_fraction, 'test_fraction': test_fraction}
  claim(out, plan)
  vocab = tokenizer_lib.padded_vocab(tok.vocab_size)
  dtype = np.dtype('<u2') if vocab <= 2**16 else np.dtype('<u4')
  total_bytes = sum(sh.bytes for v in shards.values() for sh in v)
  todo = {s: [_complete(out, f'{s}-{i:05d}', dtype, tok.identity, digests[s][i]) is None
              for i in range(len(v))] for s, v in shards.items()}
  done_bytes, tokens_made = 0, 0
  t0 = time.perf_counter()
  if workers > 1:
    ctx = multiprocessing.get_context('spawn')  # No fork of a process that may hold threads.
    pool = ctx.Pool(workers, _worker_init, (tokenizer, dtype.str))
    encode = lambda items, chunk: pool.map(_encode, items, chunksize=chunk)
  else:  # In this process: a worker's start (importing jaxbig.data) costs seconds.
    pool = contextlib.nullcontext()
    encode = lambda items, chunk: [_encode_with(tok, dtype, item) for item in items]
  with pool:
    # The source again, a shard at a time: one open shard per split is all that is held.
    for split, i, docs in _regroup(read(), shards, todo):
      name, shard = f'{split}-{i:05d}', shards[split][i]
      if docs is not None:
        check = Shard()
        for key, doc, eos in docs:
          check.add(key, doc, eos)
        if check.digest.hexdigest() != digests[split][i]:
          raise ConfigError(f'{source}: changed while it was being prepared; run again')
        chunk = max(1, len(docs) // (4 * workers))
        ids = np.concatenate(encode([(d, e) for _, d, e in docs], chunk))
        _write_shard(out, name, ids, shard.eos, shard.bytes, tok.identity,
                     digests[split][i])
        tokens_made += len(ids)
      done_bytes += shard.bytes
      elapsed = time.perf_counter() - t0
      eta = elapsed / max(done_bytes, 1) * (total_bytes - done_bytes)
      print(f'prepare: {name} {"done" if docs is not None else "was done"}; '
            f'{done_bytes / 2**20:.1f}/{total_bytes / 2**20:.1f} MiB, '
            f'{fmt_rate(tokens_made, elapsed, "tokens")}, '
            f'{fmt_rate(done_bytes, elapsed, "B")}, eta {eta:.0f} s', file=stream, flush=True)
  return _finish(out, tok, tokenizer, dtype, shards, plan)


class _Progress:
  """A line every few seconds while the source is read for the plan."""

  def __init__(self, stream, what: str, every: float = 5.0):
    self.stream, self.what, self.every = stream, what, every
    self.last = time.perf_counter()

  def __call__(self, shards: dict) -> None:
    if time.perf_counter() - self.last >= self.every:
      self.last = time.perf_counter()
      size = sum(sh.bytes for v in shards.values() for sh in v)
      print(f'{self.what}: {size / 2**20:.1f} MiB so far', file=self.stream, flush=True)


def _regroup(docs, shards: dict, todo: dict):
  """(split, index, [(key, text, eos)] or None where the shard is already whole) per shard,
  from the document stream, in the order the shards are completed."""
  index = {s: 0 for s in SPLITS}
  held = {s: [] for s in SPLITS}
  count = {s: 0 for s in SPLITS}
  for split, key, doc, eos in docs:
    i = index[split]
    if i >= len(shards[split]):
      raise ConfigError('the source grew while it was being prepared; run again')
    count[split] += 1
    if todo[split][i]:
      held[split].append((key, doc, eos))
    if count[split] == shards[split][i].documents:
      yield split, i, held[split] if todo[split][i] else None
      index[split] += 1
      held[split], count[split] = [], 0
  if any(index[s] != len(shards[s]) for s in SPLITS):
    raise ConfigError('the source shrank while it was being prepared; run again')


def claim(out: str, plan: dict) -> None:
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
      if saved.get('format') != plan.get('format'):
        raise ConfigError(f'--out: {out} holds another kind of prepared data; give a new folder')
      what = 'tokenizer' if saved.get('tokenizer') != plan.get('tokenizer') else 'source'
      raise ConfigError(f'--out: {out} was prepared from another {what}; give a new folder')
    return
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f'--out: {out} exists and is not a folder')
  os.makedirs(out, exist_ok=True)
  write_json(plan_path, plan)


def read_manifest(path: str, kind: str, fmt: str, check) -> dict:
  """`data.path`'s manifest.json, checked to be one `jaxbig prepare KIND` wrote: format
  `fmt`, and `check(manifest)` finds its fields (KeyError or TypeError if not)."""
  file = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise ConfigError(f'data.path: not a folder: {path} (a folder made by jaxbig prepare {kind})')
  if not os.path.isfile(file):
    raise ConfigError(f'data.path: {path} has no {MANIFEST}; make it with `jaxbig prepare '
                      f'{kind}` (a run that was interrupted: run it again)')
  try:
    with open(file) as f:
      manifest = json.load(f)
    if manifest['format'] != fmt:
      raise TypeError
    check(manifest)
  except (ValueError, KeyError, TypeError):
    raise ConfigError(f'{file}: not a manifest of jaxbig prepare {kind}') from None
  return manifest


def inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies under it, links resolved."""
  rel = os.path.relpath(os.path.realpath(path), os.path.realpath(folder))
  return rel != os.pardir and not rel.startswith(os.pardir + os.sep)


def write_json(path: str, obj) -> None:
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
  write_json(os.path.join(out, name + '.json'), {
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
  write_json(os.path.join(out, MANIFEST), manifest)
  return manifest
