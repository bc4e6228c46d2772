"""`data.name=imagefolder`: ImageNet-layout folders decoded with Pillow, in worker processes.

A generated folder of JPEGs and PNGs (greyscale, CMYK and palette images among them) of
three classes: every image decoded, cropped and flipped as the crop functions say; the
training batches the same in worker processes as in the training process, and after a
restore from the iterator's state; evaluation covers every image once; every bad input
named in issue 26 is one line.
"""

import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

import conftest
from jaxbig import config as config_lib, data as data_lib
from jaxbig.config import ConfigError
from jaxbig.data import images

EXPERIMENT = str(pathlib.Path(__file__).resolve().parents[1] / 'experiments' /
                 'resnet50_imagenet.py') + ':smoke'
CLASSES = ('cat', 'dog', 'eel')


def _make(root: pathlib.Path, per_class: dict, seed: int = 0) -> None:
  """root/<split>/<class>/<i>.{jpg,png} images of varied sizes and colour modes."""
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for c in CLASSES:
      folder = root / split / c
      folder.mkdir(parents=True)
      for i in range(n):
        w, h = rng.integers(24, 90, 2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        mode, ext = [('RGB', 'jpg'), ('L', 'jpg'), ('CMYK', 'jpg'), ('P', 'png'),
                     ('RGBA', 'png')][i % 5]
        image.convert(mode).save(folder / f'{i}.{ext}')


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('images')
  _make(root, {'train': 7, 'val': 5})
  return root


def _data(folder, *overrides) -> images.ImageFolder:
  config = config_lib.load(EXPERIMENT, [f'data.path={folder}', *overrides])
  return data_lib.build(config.data, config.seed)


def test_crop_boxes_stay_inside_the_image_within_their_ranges():
  rng = np.random.default_rng(0)
  for _ in range(500):
    w, h = rng.integers(1, 400, 2)
    x0, y0, x1, y1 = images.random_box(w, h, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    assert -1e-9 <= x0 < x1 <= w + 1e-9 and -1e-9 <= y0 < y1 <= h + 1e-9
    ratio = (x1 - x0) / (y1 - y0)
    fallback = (x1 - x0) in (w, pytest.approx(w)) or (y1 - y0) == pytest.approx(h)
    assert 3 / 4 - 1e-9 <= ratio <= 4 / 3 + 1e-9 or fallback
  assert images.center_box(100, 50, 0.5) == (37.5, 12.5, 62.5, 37.5)


def test_every_split_lists_its_classes_and_evaluation_covers_each_image_once(folder):
  data = _data(folder)
  assert data.meta.classes == CLASSES and data.meta.num_classes == 3
  assert data.meta.sizes == {'train': 21, 'val': 15, 'test': 15}  # No test/: val's images.
  batches = list(data.eval_batches('val'))
  labels = np.concatenate([b['y'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 5))
  assert sum(b['mask'].sum() for b in batches) == 15 and len(batches) == 2
  first = batches[0]['x'][3]  # cat/3.png: a PNG, decoded at full scale.
  image = Image.open(folder / 'val' / 'cat' / '3.png')
  want = np.asarray(image.convert('RGB').resize(
      (32, 32), Image.BILINEAR, box=images.center_box(*image.size, 0.875)), np.float32)
  mean, std = np.asarray(images.IMAGENET_MEAN), np.asarray(images.IMAGENET_STD)
  np.testing.assert_allclose(first, (want - mean) / std, atol=1e-5)


def test_training_batches_are_the_same_in_workers_and_after_a_restore(folder):
  inline = iter(_data(folder, 'data.workers=0').train_iter())
  want = [next(inline) for _ in range(4)]
  assert want[0]['x'].shape == (8, 32, 32, 3) and want[0]['x'].dtype == np.float32
  assert not np.array_equal(want[0]['x'], want[3]['x'])
  it = _data(folder, 'data.workers=2').train_iter()
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  got += [next(it) for _ in range(2)]
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a['x'], b['x'])
    np.testing.assert_array_equal(a['y'], b['y'])
  again = _data(folder, 'data.workers=0').train_iter()
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['x'], want[2]['x'])
  # A process's rows are the rows of the global batch.
  half = next(iter(_data(folder, 'data.workers=0').train_iter(rows=(4, 8))))
  np.testing.assert_array_equal(half['x'], want[0]['x'][4:])


def test_a_huge_image_is_refused_unread(folder, tmp_path, monkeypatch):
  monkeypatch.setattr(images, 'MAX_PIXELS', 60 * 60)
  big = tmp_path / 'big.png'
  Image.new('RGB', (61, 60)).save(big)
  with pytest.raises(ConfigError, match='61 x 60 pixels, over the'):
    images.open_image(str(big), str(big))


@pytest.mark.parametrize('damage, named', [
    ('no_val', 'val is missing'),
    ('empty_class', 'holds no images'),
    ('other_classes', 'the classes of val/ and train/ differ: eel, fox'),
])
def test_bad_folders_are_one_line(tmp_path, damage, named):
  _make(tmp_path, {'train': 1, 'val': 1})
  if damage == 'no_val':
    for p in sorted((tmp_path / 'val').rglob('*'), reverse=True):
      p.rmdir() if p.is_dir() else p.unlink()
    (tmp_path / 'val').rmdir()
  elif damage == 'empty_class':
    (tmp_path / 'train' / 'fox').mkdir()
  else:
    os.rename(tmp_path / 'val' / 'eel', tmp_path / 'val' / 'fox')
  with pytest.raises(ConfigError, match=named):
    _data(tmp_path)


def test_bad_images_are_skipped_counted_and_stop_the_run_past_the_limit(tmp_path, capsys):
  _make(tmp_path, {'train': 3, 'val': 1})
  for split in ('train', 'val'):
    bad = tmp_path / split / 'dog' / '0.jpg'
    bad.write_bytes(bad.read_bytes()[:100])  # Truncated.
  (tmp_path / 'train' / 'cat' / '1.jpg').write_bytes(b'not an image')
  batches = list(_data(tmp_path, 'data.workers=0', 'data.eval_batch_size=8').eval_batches('val'))
  assert batches[0]['mask'].tolist() == [1, 0, 1, 0, 0, 0, 0, 0]  # dog/0.jpg masked out.
  assert f"skipped bad image 1: {tmp_path / 'val' / 'dog' / '0.jpg'}" in capsys.readouterr().err
  it = _data(tmp_path, 'data.workers=0', 'data.max_bad_images=100').train_iter()
  seen = [next(it) for _ in range(9)]  # 9 images (2 bad), batches of 8: 8 epochs.
  assert it.seen == 16  # Each time one is drawn...
  assert sum(b['bad'].sum() for b in seen) == 16  # ...and marked for the step's count.
  assert all(b['x'].shape == (8, 32, 32, 3) for b in seen)
  assert set(np.concatenate([b['y'] for b in seen])) == {0, 1, 2}
  # The run counts them from its steps' metrics (the same on every process) and stops past
  # the limit, naming the last one.
  code, _, err = conftest.run_cli(capsys, 'train', EXPERIMENT, f'data.path={tmp_path}',
                                  'data.max_bad_images=3', 'train.log_every=1',
                                  '--workdir', tmp_path / 'wd')
  assert code == 2, err
  assert re.search(r'jaxbig: error: data.path: .*(0.jpg|1.jpg): not a readable image .*: [45] '
                   r'bad images, more than data.max_bad_images \(3\)\n$', err), err
  rows = [json.loads(l) for l in open(tmp_path / 'wd' / 'metrics.jsonl')]
  assert sum(r['train/bad_images'] for r in rows) == int(err.split(' bad images')[0][-1])


@pytest.mark.slow(reason='trains and resumes a ResNet')
def test_training_resumes_bit_identically_with_augmentation_and_workers(folder, tmp_path):
  from jaxbig import train  # pylint: disable=g-import-not-at-top
  args = [f'data.path={folder}', 'train.log_every=1', 'train.ckpt_every=2', 'train.steps=4']
  load = lambda *more: config_lib.load(EXPERIMENT, [*args, *more])
  straight, resumed = tmp_path / 'a', tmp_path / 'b'
  summary = train.train_and_evaluate(load('data.workers=0'), str(straight))
  train.train_and_evaluate(load('data.workers=2'), str(resumed), stop_after=2)
  train.train_and_evaluate(load('data.workers=0'), str(resumed))
  losses = lambda wd: [json.loads(l).get('train/loss') for l in open(wd / 'metrics.jsonl')]
  assert losses(straight) == losses(resumed) and len(losses(straight)) >= 4
  assert 0 <= summary['eval']['accuracy'] <= 1 and summary['step'] == 4


def test_the_bad_image_count_is_saved_up_to_the_step_and_counted_once():
  """The count comes from the steps' metrics: a logged interval adds to it; at a save, the
  steps not yet logged go into the saved state, and are added once when their interval is
  logged; past the limit, one line naming this process's last bad image."""
  from jaxbig import metrics  # pylint: disable=g-import-not-at-top
  it = images.BatchIterator(lambda start: iter([]))
  it.last_bad = 'data.path: x.jpg: not a readable image'
  count = metrics.BadImages(5, it)
  step = lambda n: {'bad_images': np.float32(n)}
  count.add([step(1), step(2)])
  assert it.get_state()['bad_images'] == 3
  count.add([step(1)], logged=False)  # A save before the interval is logged.
  assert it.get_state()['bad_images'] == 4
  count.add([step(1), step(0)])  # That interval, logged: its step counted once.
  assert it.get_state()['bad_images'] == 4 and it.unlogged == 0
  with pytest.raises(ConfigError, match=r'^data.path: x.jpg: not a readable image: 6 bad '
                     r'images, more than data.max_bad_images \(5\)$'):
    count.add([step(2)])
