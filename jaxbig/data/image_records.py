"""`jaxbig prepare images DIR --out OUT`, and `data.name=imagerecords data.path=OUT`.

An ImageNet-layout folder (as `data.name=imagefolder` reads it) packed into ArrayRecord
shards, for filesystems where opening millions of small files is the slow part. A record
is one image file's bytes as they were (a JPEG stays a JPEG: decoding and augmentation
happen in training, exactly as for the folder) behind a header of its label and its name
under DIR. Per split, shards `train-00000.array_record` of about `--shard-mb` in sorted
class/file order, each with a sidecar `.json`; `train-labels.npy`; `manifest.json`, written
last. Records are read by random access (grain's ArrayRecordDataSource), so the order
they were written in does not matter to shuffling.

Like `prepare text`, an interrupted run, run again, writes only the shards without a
complete sidecar, and `--out` must be a new folder or one this command began from the
same source. Shard sizes are checked when a run opens the folder, SHA-256 with
`data.verify_shards=true`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import struct
import sys
import time

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data import images, prepare

FORMAT = 'jaxbig-images-1'
HEADER = struct.Struct('<iH')  # Label, then the length of the name that follows.


def encode_record(label: int, name: str, data: bytes) -> bytes:
  raw = name.encode('utf-8', 'surrogateescape')
  return HEADER.pack(label, len(raw)) + raw + data


def decode_record(record: bytes) -> tuple[int, str, memoryview]:
  """(label, name, the image file's bytes) of a record."""
  label, n = HEADER.unpack_from(record)
  view = memoryview(record)
  return label, bytes(view[HEADER.size:HEADER.size + n]).decode('utf-8', 'surrogateescape'), \
      view[HEADER.size + n:]


def _plan(source: str, shard_bytes: int) -> tuple[list[str], dict]:
  """(classes, {split: [shard: [(name under split/, label, bytes)]]}) of the folder."""
  classes, splits = images.list_folder(source, 'SOURCE')
  ids = {c: i for i, c in enumerate(classes)}
  plan = {}
  for split, files in splits.items():
    shards, size = [[]], 0
    for c, n in files:
      if size >= shard_bytes:
        shards.append([])
        size = 0
      nbytes = os.path.getsize(os.path.join(source, split, c, n))
      shards[-1].append((f'{c}/{n}', ids[c], nbytes))
      size += nbytes
    plan[split] = shards
  return classes, plan


def _digest(files: list) -> str:
  h = hashlib.sha256()
  for name, label, nbytes in files:
    h.update(f'{name}\0{label}\0{nbytes}\n'.encode('utf-8', 'surrogateescape'))
  return h.hexdigest()


def _sha256(path: str) -> str:
  sha = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(2**24):
      sha.update(chunk)
  return sha.hexdigest()


def _complete(out: str, name: str, digest: str) -> bool:
  try:
    with open(os.path.join(out, name + '.json')) as f:
      side = json.load(f)
    size = os.path.getsize(os.path.join(out, name + '.array_record'))
  except (OSError, ValueError):
    return False
  return side.get('files_digest') == digest and side.get('file_bytes') == size


def _pack(source: str, out: str, split: str, name: str, files: list, digest: str) -> int:
  """Writes shard `name` (as .partial, then renamed) and its sidecar; returns its bytes."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, name + '.array_record')
  writer = array_record_module.ArrayRecordWriter(path + '.partial', 'group_size:1')
  try:
    for rel, label, nbytes in files:
      with open(os.path.join(source, split, rel), 'rb') as f:
        data = f.read(nbytes + 1)
      if len(data) != nbytes:
        raise ConfigError(f'SOURCE: {os.path.join(source, split, rel)} changed while it was '
                          'being prepared; run again')
      writer.write(encode_record(label, rel, data))
  finally:
    writer.close()
  sha = _sha256(path + '.partial')
  os.replace(path + '.partial', path)
  prepare.write_json(os.path.join(out, name + '.json'), {
      'records': len(files), 'bytes': sum(f[2] for f in files),
      'file_bytes': os.path.getsize(path), 'sha256': sha, 'files_digest': digest})
  return sum(f[2] for f in files)


def prepare_images(source: str, out: str, *, shard_mb: float = 256.0, workers: int = 0,
                   stream=None) -> dict:
  """Packs the image folder `source` into shards in `out` (see the module docstring);
  returns the manifest. Reruns finish what an interrupted run left."""
  stream = stream or sys.stderr
  if not os.path.isdir(source):
    raise ConfigError(f'SOURCE: not a folder: {source} (DIR/train/<class>/, DIR/val/<class>/)')
  if not shard_mb > 0:
    raise ConfigError(f'--shard-mb must be > 0, got {shard_mb}')
  if prepare.inside(out, source):
    raise ConfigError(f'--out: {out} is inside SOURCE; give a folder outside it')
  classes, plan = _plan(source, int(shard_mb * 2**20))
  digests = {s: [_digest(files) for files in shards] for s, shards in plan.items()}
  source_digest = hashlib.sha256(json.dumps(
      [classes, digests], sort_keys=True).encode()).hexdigest()
  prepare.claim(out, {'format': FORMAT, 'source_digest': source_digest})
  jobs = [(split, i) for split, shards in plan.items() for i in range(len(shards))]
  total = sum(f[2] for shards in plan.values() for files in shards for f in files)
  done, t0 = 0, time.perf_counter()
  # Threads: reading, writing and hashing release the GIL, and no process has to start.
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    futures = {}
    for split, i in jobs:
      name = f'{split}-{i:05d}'
      if not _complete(out, name, digests[split][i]):
        futures[name] = pool.submit(_pack, source, out, split, name, plan[split][i],
                                    digests[split][i])
    for split, i in jobs:
      name = f'{split}-{i:05d}'
      made = name in futures
      done += futures[name].result() if made else sum(f[2] for f in plan[split][i])
      elapsed = time.perf_counter() - t0
      print(f'prepare: {name} {"done" if made else "was done"}; {done / 2**20:.1f}/'
            f'{total / 2**20:.1f} MiB, {prepare.fmt_rate(done, elapsed, "B")}', file=stream,
            flush=True)
  splits = {}
  for split, shards in plan.items():
    entries = []
    for i in range(len(shards)):
      with open(os.path.join(out, f'{split}-{i:05d}.json')) as f:
        side = json.load(f)
      entries.append({'file': f'{split}-{i:05d}.array_record',
                      **{k: side[k] for k in ('records', 'bytes', 'file_bytes', 'sha256')}})
    labels = np.array([f[1] for files in shards for f in files], np.int32)
    np.save(os.path.join(out, f'{split}-labels.npy.partial.npy'), labels)
    os.replace(os.path.join(out, f'{split}-labels.npy.partial.npy'),
               os.path.join(out, f'{split}-labels.npy'))
    splits[split] = {'shards': entries, 'records': len(labels),
                     'bytes': sum(e['bytes'] for e in entries)}
  manifest = {'format': FORMAT, 'classes': classes, 'splits': splits,
              'source': os.path.abspath(source), 'source_digest': source_digest}
  prepare.write_json(os.path.join(out, prepare.MANIFEST), manifest)
  return manifest


class Records:
  """A split's images by index, from its shards. Copies and pickles (grain copies its
  transforms into worker processes) carry paths; readers open on first use."""

  def __init__(self, root: str, split: str, files: list[str]):
    self.root, self.split, self.files, self._source = root, split, files, None

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def source(self):
    if self._source is None:
      from grain import sources  # pylint: disable=g-import-not-at-top
      self._source = sources.ArrayRecordDataSource(self.files)
    return self._source

  def open(self, k: int):
    """(opened image, its name for messages); BadImage if it is not a readable image."""
    _, name, data = decode_record(self.source()[int(k)])
    where = f'{self.root} [{self.split}/{name}]'
    return images.open_image(io.BytesIO(data), where), where


def read_manifest(path: str) -> dict:
  """DIR/manifest.json, checked to be one `jaxbig prepare images` wrote."""
  return prepare.read_manifest(
      path, 'images', FORMAT,
      lambda m: (m['classes'], m['splits']['train']['shards'], m['splits']['val']))


class ImageRecords(images.ImageFolder):
  """Shards of `jaxbig prepare images`, read as `ImageFolder` reads its folder."""

  SOURCE = 'imagerecords'

  def _list(self, cfg) -> None:
    manifest = read_manifest(cfg.path)
    self.classes, self._manifest = list(manifest['classes']), manifest
    self._images, self._labels = {}, {}
    for split in images.SPLITS:
      if split not in manifest['splits']:  # No test/: the final evaluation is of val.
        self._images[split], self._labels[split] = self._images['val'], self._labels['val']
        continue
      files = []
      for entry in manifest['splits'][split]['shards']:
        file = os.path.join(cfg.path, entry['file'])
        size = os.path.getsize(file) if os.path.isfile(file) else -1
        if size != entry['file_bytes']:
          raise ConfigError(f'data.path: {file} is {"missing" if size < 0 else f"{size} bytes"}'
                            f", the manifest says {entry['file_bytes']}; prepare it again")
        if cfg.get('verify_shards', False) and _sha256(file) != entry['sha256']:
          raise ConfigError(f'data.path: {file} does not match its SHA-256 in the manifest')
        files.append(file)
      file = os.path.join(cfg.path, f'{split}-labels.npy')
      try:
        labels = np.load(file)
      except (OSError, ValueError):
        labels = None
      if labels is None or labels.shape != (manifest['splits'][split]['records'],):
        raise ConfigError(f'data.path: {file} is missing or does not match the manifest; '
                          'prepare the folder again')
      self._images[split] = Records(cfg.path, split, files)
      self._labels[split] = labels

  def identity(self) -> dict:
    return {'source': self.SOURCE, 'path': os.path.abspath(self.cfg.path),
            'digest': self._manifest['source_digest']}
