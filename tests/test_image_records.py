"""`jaxbig prepare images` and `data.name=imagerecords`: an image folder packed into
ArrayRecord shards reads as the folder does.

The same generated folder as test_images.py: the packed records give the folder's batches
bit for bit (the encoded bytes are the same, so are the decodes); an interrupted prepare
finishes with the same shards; a folder it did not make, or made from another source, is
refused untouched; damaged shards and bad images are named in one line.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxbig import config as config_lib, data as data_lib
from jaxbig.config import ConfigError
from jaxbig.data import image_records

from test_images import EXPERIMENT, _make  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('images')
  _make(root, {'train': 7, 'val': 5, 'test': 2})
  return root


def _data(path, *overrides, name='imagerecords'):
  config = config_lib.load(EXPERIMENT, [f'data.name={name}', f'data.path={path}', *overrides])
  return data_lib.build(config.data, config.seed)


def _prepare(folder, out, **kw) -> dict:
  return image_records.prepare_images(str(folder), str(out), stream=open(os.devnull, 'w'), **kw)


def test_records_give_the_folders_batches_bit_for_bit(folder, tmp_path):
  manifest = _prepare(folder, tmp_path / 'packed', shard_mb=0.01, workers=2)
  assert manifest['classes'] == ['cat', 'dog', 'eel']
  assert {s: v['records'] for s, v in manifest['splits'].items()} == {
      'train': 21, 'val': 15, 'test': 6}
  assert len(manifest['splits']['train']['shards']) > 1  # 10 KB shards: several.
  records, files = _data(tmp_path / 'packed'), _data(folder, name='imagefolder')
  assert (records.meta.classes, records.meta.sizes) == (files.meta.classes, files.meta.sizes)
  a, b = iter(records.train_iter()), iter(files.train_iter())
  for _ in range(3):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x['x'], y['x'])
    np.testing.assert_array_equal(x['y'], y['y'])
  for split in ('val', 'test'):
    for x, y in zip(records.eval_batches(split), files.eval_batches(split), strict=True):
      for k in ('x', 'y', 'mask'):
        np.testing.assert_array_equal(x[k], y[k])
  label, name, data = image_records.decode_record(
      records._images['train'].source()[0])  # pylint: disable=protected-access
  assert (label, name) == (0, 'cat/0.jpg')
  assert bytes(data) == (folder / 'train' / 'cat' / '0.jpg').read_bytes()
  assert records.identity()['source'] == 'imagerecords'


def test_an_interrupted_prepare_finishes_with_the_same_shards(folder, tmp_path):
  out = tmp_path / 'packed'
  first = _prepare(folder, out, shard_mb=0.01)
  shard = out / first['splits']['train']['shards'][1]['file']
  os.remove(out / 'manifest.json')
  os.remove(shard.with_suffix('.json'))  # As if stopped before its sidecar was written.
  shard.write_bytes(b'half')
  others = {p: p.stat().st_mtime_ns for p in out.glob('*.array_record') if p != shard}
  assert _prepare(folder, out, shard_mb=0.01) == first
  assert {p: p.stat().st_mtime_ns for p in others} == others  # Only the unfinished one.


def test_prepare_never_touches_a_folder_it_did_not_make(folder, tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match='not empty and not a jaxbig prepare folder'):
    _prepare(folder, mine)
  assert os.listdir(mine) == ['notes.txt']
  with pytest.raises(ConfigError, match='is inside SOURCE'):
    _prepare(folder, folder / 'packed')
  assert not (folder / 'packed').exists()


def test_prepare_refuses_a_folder_made_from_another_source(tmp_path):
  _make(tmp_path / 'a', {'train': 2, 'val': 1})
  out = tmp_path / 'packed'
  _prepare(tmp_path / 'a', out)
  before = sorted(os.listdir(out))
  (tmp_path / 'a' / 'train' / 'cat' / '0.jpg').write_bytes(b'another image entirely')
  with pytest.raises(ConfigError, match='prepared from another source'):
    _prepare(tmp_path / 'a', out)
  assert sorted(os.listdir(out)) == before


def test_damaged_shards_are_one_line(folder, tmp_path):
  out = tmp_path / 'packed'
  manifest = _prepare(folder, out)
  shard = out / manifest['splits']['val']['shards'][0]['file']
  data = shard.read_bytes()
  shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # Same size, other bytes.
  _data(out)  # Sizes match: opens.
  with pytest.raises(ConfigError, match='does not match its SHA-256'):
    _data(out, 'data.verify_shards=true')
  shard.write_bytes(data[:100])
  with pytest.raises(ConfigError, match=f'{shard} is 100 bytes, the manifest says'):
    _data(out)
  with pytest.raises(ConfigError, match='has no manifest.json'):
    _data(folder)


def test_bad_images_in_records_are_skipped_and_named(tmp_path, capsys):
  _make(tmp_path / 'src', {'train': 3, 'val': 1})
  bad = tmp_path / 'src' / 'val' / 'dog' / '0.jpg'
  bad.write_bytes(bad.read_bytes()[:100])  # Truncated.
  _prepare(tmp_path / 'src', tmp_path / 'packed')
  batches = list(_data(tmp_path / 'packed', 'data.eval_batch_size=8').eval_batches('val'))
  assert batches[0]['mask'].tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
  assert f"skipped bad image 1: {tmp_path / 'packed'} [val/dog/0.jpg]" in capsys.readouterr().err


def test_the_cli_prepares_and_refuses_text_options(folder, tmp_path):
  out = tmp_path / 'packed'
  run = lambda *a: subprocess.run([sys.executable, '-m', 'jaxbig', 'prepare', 'images', *a],
                                  capture_output=True, text=True, timeout=120)
  bad = run(str(folder), '--out', str(out), '--tokenizer', 'bytes')
  assert bad.returncode == 2 and not out.exists()
  assert bad.stderr.strip().splitlines()[-1].endswith('--tokenizer: only for prepare text')
  good = run(str(folder), '--out', str(out), '--shard-mb', '0.02', '--workers', '1')
  assert good.returncode == 0, good.stderr
  assert 'train 21, val 15, test 6 images' in good.stdout
  assert json.loads((out / 'manifest.json').read_text())['format'] == image_records.FORMAT
