"""Token shards as flat memory-mapped arrays or as ArrayRecord files: random windows per second.

Issue 25 asked for the choice between the two to be measured. Both hold the same random
uint16 tokens (a 50k vocabulary); training reads windows of seq_len + 1 tokens at random
offsets. The memory map slices them directly. ArrayRecord holds records of RECORD tokens
(group_size:1, so each record is read alone); a window reads the one or two records it
overlaps and slices them. Each row is the best of REPEATS timings of BATCHES batches.

  python benchmarks/shard_format.py [--tokens 50000000] [--out FILE.md]
"""

import argparse
import os
import tempfile
import time

import numpy as np

RECORD = 4096  # Tokens per ArrayRecord record: a window of up to 4096 spans at most two.
BATCHES, REPEATS = 50, 3


def _time(fn) -> float:
  best = float('inf')
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    for b in range(BATCHES):
      fn(np.random.default_rng(b))
    best = min(best, time.perf_counter() - t0)
  return best / BATCHES


def main() -> None:
  from array_record.python import array_record_module as ar  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tokens', type=int, default=50_000_000)
  p.add_argument('--out', default='')
  args = p.parse_args()
  ids = np.random.default_rng(0).integers(0, 50257, args.tokens, dtype=np.uint16)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    flat = os.path.join(tmp, 'train.bin')
    ids.tofile(flat)
    records = os.path.join(tmp, 'train.array_record')
    writer = ar.ArrayRecordWriter(records, 'group_size:1')
    for lo in range(0, len(ids), RECORD):
      writer.write(ids[lo:lo + RECORD].tobytes())
    writer.close()
    sizes = {'flat': os.path.getsize(flat), 'array_record': os.path.getsize(records)}
    mm = np.memmap(flat, np.uint16, 'r').view(np.ndarray)
    reader = ar.ArrayRecordReader(records)

    for batch, seq in ((32, 64), (64, 1024), (16, 4096)):
      offsets = np.arange(seq + 1)

      def flat_batch(rng):
        starts = rng.integers(0, len(mm) - seq - 1, batch)
        return mm[starts[:, None] + offsets].astype(np.int32)

      def record_batch(rng):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        first = starts // RECORD
        want = np.unique(np.concatenate([first, (starts + seq) // RECORD]))
        got = dict(zip(want.tolist(), reader.read(want.tolist())))
        out = np.empty((batch, seq + 1), np.int32)
        for i, (s, r) in enumerate(zip(starts, first)):
          chunk = np.frombuffer(got[r] + got.get(r + 1, b''), np.uint16)
          out[i] = chunk[s - r * RECORD:s - r * RECORD + seq + 1]
        return out

      check = np.random.default_rng(7)
      assert (flat_batch(check) == record_batch(np.random.default_rng(7))).all()
      for name, fn in (('flat memmap', flat_batch), ('ArrayRecord', record_batch)):
        t = _time(fn)
        rows.append(f'| {batch} x {seq} | {name} | {t * 1e3:.3f} | {batch * seq / t / 1e6:.1f} |')
  table = '\n'.join([
      f'{args.tokens:,} uint16 tokens; file bytes: flat {sizes["flat"]:,}, '
      f'ArrayRecord {sizes["array_record"]:,}.', '',
      '| batch x seq | format | ms per batch | M tokens/s |', '|---|---|---|---|', *rows])
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  main()
