"""Tests of jaxbig.data.text: byte splits by file path, random windows, eval windows, bad input."""

import pathlib

import numpy as np
import pytest

from jaxbig import config as config_lib
from jaxbig import data as data_lib
from jaxbig.config import ConfigError
from jaxbig.data import text

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
GPT = str(EXPERIMENTS / 'gpt_stdlib.py') + ':smoke'


def _data(*overrides: str) -> text.TextData:
  config = config_lib.load(GPT, overrides)
  return data_lib.build(config.data, config.seed)


def _folder(root: pathlib.Path, n: int, size: int = 400) -> pathlib.Path:
  """`n` distinct UTF-8 files of `size` bytes under root/ (one in a subfolder)."""
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    sub = root / 'pkg' if i == 0 else root
    sub.mkdir(exist_ok=True)
    line = f'file {i}: def f{i}(x): return x + {i}  # é\n'.encode()
    (sub / f'f{i:03d}.txt').write_bytes((line * (size // len(line) + 1))[:size])
  return root


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.write_bytes(data)
  return path


def _which_split(data: text.TextData, marker: bytes) -> str:
  found = [k for k, v in data.splits.items() if marker in v.tobytes()]
  assert len(found) == 1, found
  return found[0]


def test_stdlib_default_reads_this_pythons_sources():
  d = _data()
  assert d.meta.task == 'lm' and d.meta.vocab_size == 256
  assert d.files['files']['train'] > 100 and d.files['files']['val'] > 0
  assert all(d.meta.sizes[k] > 10_000 for k in data_lib.SPLITS)
  assert b'def ' in d.splits['train'][:200_000].tobytes()


def test_files_split_by_path_and_keep_their_split_when_files_are_added(tmp_path):
  root = _folder(tmp_path / 'corpus', 40)
  args = ('data.name=text', f'data.path={root}', 'data.val_fraction=0.2',
          'data.test_fraction=0.2')
  a = _data(*args)
  splits_a = {i: _which_split(a, f'file {i}:'.encode()) for i in range(40)}
  assert set(splits_a.values()) == {'train', 'val', 'test'}
  assert sum(a.meta.sizes.values()) == 40 * 400
  (root / 'zz_new.txt').write_text('file new: x = 1\n' * 30)
  b = _data(*args)
  assert {i: _which_split(b, f'file {i}:'.encode()) for i in range(40)} == splits_a


def test_single_file_is_cut_into_consecutive_byte_ranges(tmp_path):
  path = tmp_path / 'one.txt'
  content = bytes(range(32, 127)) * 40
  path.write_bytes(content)
  d = _data('data.name=text', f'data.path={path}', 'data.val_fraction=0.1',
            'data.test_fraction=0.1')
  joined = b''.join(d.splits[k].tobytes() for k in ('train', 'val', 'test'))
  assert joined == content
  assert d.meta.sizes['val'] == int(len(content) * 0.1)


def test_folders_skip_non_utf8_and_empty_files(tmp_path):
  root = _folder(tmp_path / 'c', 30)
  (root / 'blob.bin').write_bytes(b'\xff\xfe\x00binary' * 50)
  (root / 'empty.txt').write_bytes(b'')
  d = _data('data.name=text', f'data.path={root}', 'data.val_fraction=0.2',
            'data.test_fraction=0.2')
  assert d.files['skipped'] == 1
  assert all(b'binary' not in v.tobytes() for v in d.splits.values())
  only_txt = _data('data.name=text', f'data.path={root}', 'data.pattern=*.txt',
                   'data.val_fraction=0.2', 'data.test_fraction=0.2')
  assert only_txt.files['skipped'] == 0


def test_train_windows_are_next_byte_pairs_seeded_and_resumable():
  d = _data()
  it = d.train_iter()
  first = [next(it) for _ in range(3)]
  b = first[0]
  assert b['x'].shape == (8, 32) and b['x'].dtype == np.int32
  np.testing.assert_array_equal(b['x'][:, 1:], b['y'][:, :-1])
  stream = d.splits['train'].tobytes()
  assert all(bytes(row.astype(np.uint8)) in stream for row in b['x'])
  state = it.get_state()
  later = [next(it) for _ in range(2)]
  again = d.train_iter()
  again.set_state(state)
  for x, y in zip(later, [next(again) for _ in range(2)]):
    np.testing.assert_array_equal(x['x'], y['x'])
  fresh = d.train_iter()
  np.testing.assert_array_equal(next(fresh)['x'], first[0]['x'])
  other = _data('seed=1').train_iter()
  assert not np.array_equal(next(other)['x'], first[0]['x'])


def test_eval_windows_are_deterministic_non_overlapping_and_masked():
  d = _data('data.eval_windows=20', 'data.eval_batch_size=16')
  windows = d.eval_windows('val')
  assert windows.shape == (20, 33)
  tokens = d.splits['val']
  starts = [np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 33) == w,
                                  axis=1))[0] for w in windows[:3]]
  assert all(s % 32 == 0 for s in starts) and starts == sorted(starts)
  batches = list(d.eval_batches('val'))
  assert [b['mask'].sum() for b in batches] == [16, 4]
  np.testing.assert_array_equal(batches[1]['x'][4:], 0)
  np.testing.assert_array_equal(
      np.concatenate([b['x'][b['mask'] > 0] for b in batches]), windows[:, :-1])
  assert 3.0 < d.unigram_bits_per_byte('val') < 8.0


@pytest.mark.parametrize('make, overrides, field', [
    (lambda p: _write(p, b''), (), 'is empty'),
    (lambda p: p.mkdir() or p, (), 'no non-empty UTF-8 files'),
    (lambda p: (p.mkdir(), (p / 'a.txt').write_bytes(b'')) and p, (), 'no non-empty UTF-8'),
    (lambda p: _write(p, b'\xff\xfe' * 100), (), 'not UTF-8'),
    (lambda p: p, (), 'not found'),
    (lambda p: _write(p, b'x' * 1000), ('data.seq_len=200',), 'data.seq_len'),
    (lambda p: _folder(p, 2), ('data.val_fraction=0.2',), r'data\.(val|test)_fraction'),
])
def test_bad_text_input_names_the_problem(tmp_path, make, overrides, field):
  path = make(tmp_path / 'input')
  with pytest.raises(ConfigError, match=field):
    _data('data.name=text', f'data.path={path}', *overrides)


def test_text_needs_a_path_and_positive_sizes():
  with pytest.raises(ConfigError, match='data.path: required'):
    _data('data.name=text')
  with pytest.raises(ConfigError, match='data.seq_len'):
    _data('data.seq_len=0')
  with pytest.raises(ConfigError, match='data.eval_windows'):
    _data('data.eval_windows=0')


def test_process_rows_are_slices_of_the_global_batch():
  """Each process of a multi-host run reads its rows of the same random windows."""
  d = _data()
  it = d.train_iter()
  whole = [next(it) for _ in range(2)]
  halves = [d.train_iter(rows) for rows in ((0, 4), (4, 8))]
  for batch in whole:
    parts = [next(h) for h in halves]
    for k in ('x', 'y'):
      assert parts[0][k].shape == (4, 32)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
