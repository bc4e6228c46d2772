"""Tests of jaxbig.data: splits, the seeded checkpointable train iterator, eval batches, sources.

Digits images are all distinct, so an image's bytes identify the example: splits, epochs and
eval batches are checked by comparing sets of image rows.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxbig import config as config_lib
from jaxbig import data as data_lib
from jaxbig.data import sources
from jaxbig.config import ConfigError

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
DIGITS = str(EXPERIMENTS / 'cnn_digits.py') + ':smoke'
DIABETES = str(EXPERIMENTS / 'mlp_diabetes.py') + ':smoke'
NUM_DIGITS = 1797
# cnn_digits' fractions: test round(0.2 * 1797), val round(0.1 * 1797), train the rest.
SIZES = {'train': 1258, 'val': 180, 'test': 359}


def _data(spec: str = DIGITS, *overrides: str) -> data_lib.Data:
  config = config_lib.load(spec, overrides)
  return data_lib.build(config.data, config.seed)


def _rows(x: np.ndarray) -> list[bytes]:
  return [r.tobytes() for r in np.ascontiguousarray(x)]


def _batches(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['x'], y['x'])
    np.testing.assert_array_equal(x['y'], y['y'])


def _batches_differ(a: list[dict], b: list[dict]) -> bool:
  return any(not np.array_equal(x['x'], y['x']) for x, y in zip(a, b))


def _eval_x(data: data_lib.Data, split: str) -> np.ndarray:
  """The split's (normalised) inputs as `eval_batches` gives them, padding dropped."""
  return np.concatenate([b['x'][b['mask'] > 0] for b in data.eval_batches(split)])


def test_digits_splits_are_deterministic_and_partition_the_data():
  a, b = _data(DIGITS, 'data.split_seed=0'), _data(DIGITS, 'data.split_seed=0')
  assert a.meta.sizes == SIZES
  for split in data_lib.SPLITS:
    np.testing.assert_array_equal(a.splits[split][0], b.splits[split][0])
    np.testing.assert_array_equal(a.splits[split][1], b.splits[split][1])
  rows = {k: set(_rows(a.splits[k][0])) for k in data_lib.SPLITS}
  assert all(len(rows[k]) == SIZES[k] for k in rows)
  assert not rows['train'] & rows['val'] and not rows['train'] & rows['test']
  assert not rows['val'] & rows['test']
  assert len(rows['train'] | rows['val'] | rows['test']) == NUM_DIGITS


@pytest.mark.slow(reason='imports sklearn in a subprocess')
def test_digits_are_sklearns_and_load_without_importing_it(monkeypatch):
  """The same arrays as sklearn's loader, read from its file; and with that file missing,
  from sklearn's loader itself."""
  from sklearn.datasets import load_digits
  want = load_digits()
  for found in (True, False):
    if not found:
      monkeypatch.setattr(sources, '_sklearn_data_file', lambda name: None)
    got = sources.digits()
    np.testing.assert_array_equal(got.x[..., 0], want.images.astype(np.float32))
    np.testing.assert_array_equal(got.y, want.target)
    assert got.x.shape == (1797, 8, 8, 1) and got.x.dtype == np.float32
  code = ('import sys; from jaxbig.data import sources; sources.digits(); '
          'assert "sklearn" not in sys.modules, "sklearn imported"')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_split_seed_changes_the_splits():
  a, b = _data(DIGITS, 'data.split_seed=0'), _data(DIGITS, 'data.split_seed=1')
  assert b.meta.sizes == a.meta.sizes
  for split in data_lib.SPLITS:
    assert set(_rows(a.splits[split][0])) != set(_rows(b.splits[split][0]))


def test_train_iter_is_deterministic_for_a_seed_and_changes_with_it():
  # The smoke config augments (shift 1): shuffling and augmentation are both seeded.
  first = _batches(_data(DIGITS, 'seed=0').train_iter(), 4)
  _assert_batches_equal(first, _batches(_data(DIGITS, 'seed=0').train_iter(), 4))
  other = _batches(_data(DIGITS, 'seed=1').train_iter(), 4)
  assert _batches_differ(first, other)
  assert any(not np.array_equal(x['y'], y['y']) for x, y in zip(first, other))


@pytest.mark.parametrize('skip', [3, 38])  # 38: the resumed batches cross into epoch 2.
def test_iterator_state_resumes_the_exact_next_batches(skip):
  data = _data(DIGITS)  # 1258 // 32 = 39 batches make an epoch.
  it = data.train_iter()
  _batches(it, skip)
  state = data_lib.save_iter_state(it)
  expected = _batches(it, 3)
  resumed = _data(DIGITS).train_iter()  # A new process would build the data again.
  resumed.set_state(state)
  _assert_batches_equal(_batches(resumed, 3), expected)
  assert _batches_differ(_batches(data.train_iter(), 3), expected)  # set_state did something.


def test_each_epoch_is_a_permutation_of_the_training_split():
  data = _data(DIGITS, 'data.augment_shift=0')
  train = set(_rows(_eval_x(data, 'train')))
  n, bs = SIZES['train'], data.cfg.batch_size
  batches = _batches(data.train_iter(), -(-2 * n // bs))  # Enough to cover two epochs.
  x = np.concatenate([b['x'] for b in batches])
  assert all(len(b['x']) == bs for b in batches)
  whole_batches = _rows(x[:n // bs * bs])
  assert len(set(whole_batches)) == len(whole_batches)  # No example repeats within an epoch.
  epoch1, epoch2 = _rows(x[:n]), _rows(x[n:2 * n])
  assert set(epoch1) == train and len(set(epoch1)) == n
  assert set(epoch2) == train and len(set(epoch2)) == n
  assert epoch1 != epoch2  # Reshuffled every epoch.


@pytest.mark.parametrize('split', data_lib.SPLITS)
def test_eval_batches_cover_the_split_once_in_order(split):
  data = _data(DIGITS)
  bs = data.cfg.eval_batch_size
  batches = list(data.eval_batches(split))
  assert all(len(b['x']) == len(b['y']) == len(b['mask']) == bs for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == SIZES[split]
  assert SIZES[split] % bs and not mask[SIZES[split]:].any()  # Padded, padding at the end.
  x_raw, y = data.splits[split]
  np.testing.assert_array_equal(_eval_x(data, split), data.meta.normalize(x_raw))
  np.testing.assert_array_equal(
      np.concatenate([b['y'][b['mask'] > 0] for b in batches]), y)


def test_global_normalisation_standardises_the_training_inputs():
  x = _eval_x(_data(DIGITS, 'data.normalize=global'), 'train')
  assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
  raw = _eval_x(_data(DIGITS, 'data.normalize=none'), 'train')
  assert raw.mean() > 3 and raw.std() > 3  # Pixel values 0..16 untouched.
  feature = _eval_x(_data(DIGITS, 'data.normalize=feature'), 'train')
  np.testing.assert_allclose(feature.mean(0), 0, atol=1e-4)


def test_augment_shift_changes_images_and_zero_does_not():
  plain, shifted = _data(DIGITS, 'data.augment_shift=0'), _data(DIGITS, 'data.augment_shift=1')
  train = set(_rows(_eval_x(plain, 'train')))
  a, b = _batches(plain.train_iter(), 4), _batches(shifted.train_iter(), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['y'], y['y'])  # Same shuffle; only the images change.
  assert all(r in train for x in a for r in _rows(x['x']))
  moved = [r not in train for x in b for r in _rows(x['x'])]
  assert np.mean(moved) > 0.5  # 8 of 9 offsets move the image.


def _save_npz(path, **arrays) -> str:
  np.savez(path, **arrays)
  return str(path)


def _npz_data(path: str, spec: str = DIABETES, *overrides: str) -> data_lib.Data:
  return _data(spec, 'data.name=npz', f'data.path={path}', *overrides)


def test_npz_integer_labels_make_a_classification_task(tmp_path):
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((50, 6)), np.arange(50) % 3
  data = _npz_data(_save_npz(tmp_path / 'c.npz', x=x, y=y))
  m = data.meta
  assert (m.task, m.num_classes, m.num_outputs, m.input_shape) == ('classification', 3, 3, (6,))
  assert data.splits['train'][1].dtype == np.int32
  assert sum(m.sizes.values()) == 50


def test_npz_float_targets_make_a_regression_task(tmp_path):
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((50, 6)), rng.standard_normal(50) * 5 + 3
  data = _npz_data(_save_npz(tmp_path / 'r.npz', x=x, y=y))
  assert (data.meta.task, data.meta.num_outputs) == ('regression', 1)
  assert data.meta.y_mean == pytest.approx(data.splits['train'][1].mean(), rel=1e-5)
  yb = next(data.eval_batches('train'))['y']
  assert yb.shape == (data.cfg.eval_batch_size, 1)  # Targets standardised, one column.


def test_npz_grey_images_get_a_channel_axis_and_x_test_is_the_test_split(tmp_path):
  rng = np.random.default_rng(0)
  path = _save_npz(tmp_path / 'img.npz', x=rng.random((100, 5, 7)), y=np.arange(100) % 4,
                   x_test=rng.random((30, 5, 7)), y_test=np.arange(30) % 5)
  data = _npz_data(path, DIGITS)
  m = data.meta
  assert m.input_shape == (5, 7, 1)
  assert m.num_classes == 5  # y_test has a class y lacks.
  assert m.sizes['test'] == 30 and m.sizes['train'] + m.sizes['val'] == 100
  x_test, y_test = data.splits['test']
  np.testing.assert_array_equal(x_test[..., 0], np.load(path)['x_test'].astype(np.float32))
  np.testing.assert_array_equal(y_test, np.arange(30) % 5)


@pytest.mark.parametrize('arrays', [
    None,  # No file.
    {'x': np.zeros((10, 3))},  # No y.
    {'x': np.zeros((10, 3)), 'y': np.zeros(9, np.int32)},  # Lengths differ.
    {'x': np.zeros(10), 'y': np.zeros(10, np.int32)},  # x without a feature axis.
    {'x': np.zeros((10, 3)), 'y': np.zeros(10, np.int32) - 1},  # Negative labels.
], ids=['missing', 'no_y', 'lengths', 'x_1d', 'negative_y'])
def test_bad_npz_raises_naming_data_path(tmp_path, arrays):
  path = str(tmp_path / 'bad.npz')
  if arrays is not None:
    _save_npz(path, **arrays)
  with pytest.raises(ConfigError, match=r'^data\.path: ') as e:
    _npz_data(path)
  assert path in str(e.value)


def test_npz_path_required():
  with pytest.raises(ConfigError, match='data.path: required'):
    _data(DIABETES, 'data.name=npz')


def test_batch_larger_than_the_training_split_raises():
  n = SIZES['train']
  assert len(_data(DIGITS, f'data.batch_size={n}').splits['train'][0]) == n
  with pytest.raises(ConfigError, match=rf'data\.batch_size \({n + 1}\).*\({n} examples\)'):
    _data(DIGITS, f'data.batch_size={n + 1}')


def test_linear_baseline_beats_the_mean_on_diabetes():
  data = _data(DIABETES)
  y_train, y_test = data.splits['train'][1], data.splits['test'][1]
  mean_mse = data.baseline_mse('test')
  assert mean_mse == pytest.approx(np.mean((y_test - y_train.mean()) ** 2), rel=1e-5)
  assert 0 < data.baseline_linear_mse('test') < 0.8 * mean_mse


def test_process_rows_are_slices_of_the_global_batch():
  """Each process of a multi-host run gets its rows of the same batches, augmentation included."""
  data = _data(DIGITS, 'data.augment_shift=1')
  whole = _batches(data.train_iter(), 3)
  parts = [_batches(data.train_iter(rows), 3) for rows in ((0, 8), (8, 32))]
  for i, batch in enumerate(whole):
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([p[i][k] for p in parts]), batch[k])
  assert parts[0][0]['x'].shape[0] == 8
  # Not vacuous: the augmentation draws differ between batches.
  assert not np.array_equal(whole[0]['x'], whole[1]['x'])


def _write_cifar(folder: pathlib.Path, name: str, images: int, rng) -> dict:
  """A binary release of `images` random images per file, as CIFAR lays it out (labels,
  then the red, green and blue planes); returns the images and labels written per split."""
  spec = sources.CIFAR[name]
  folder.mkdir(parents=True)
  written = {}
  for split, files in spec['files'].items():
    xs, ys = [], []
    for f, _ in files:
      x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
      labels = rng.integers(0, spec['classes'], (images, spec['labels']), dtype=np.uint8)
      planes = x.transpose(0, 3, 1, 2).reshape(images, -1)
      (folder / f).write_bytes(np.concatenate([labels, planes], axis=1).tobytes())
      xs.append(x)
      ys.append(labels[:, -1])
    written[split] = np.concatenate(xs), np.concatenate(ys)
  return written


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_binary_release_reads_images_labels_and_the_fixed_test_split(tmp_path, name,
                                                                           monkeypatch):
  small = {k: {**v, 'files': {s: [(f, 20) for f, _ in fs] for s, fs in v['files'].items()}}
           for k, v in sources.CIFAR.items()}
  monkeypatch.setattr(sources, 'CIFAR', small)
  folder = tmp_path / small[name]['folder']
  written = _write_cifar(folder, name, 20, np.random.default_rng(0))
  # The folder holding the release works too.
  for path in (folder, tmp_path):
    arrays = sources.cifar(name, str(path))
    np.testing.assert_array_equal(arrays.x, written['train'][0].astype(np.float32))
    np.testing.assert_array_equal(arrays.y, written['train'][1])
    np.testing.assert_array_equal(arrays.x_test, written['test'][0].astype(np.float32))
    assert arrays.num_classes == small[name]['classes']
  data = _data(str(EXPERIMENTS / 'resnet_cifar10.py') + ':smoke', f'data.name={name}',
               f'data.path={folder}', 'data.batch_size=8')
  assert data.meta.sizes['test'] == 20 and data.meta.input_shape == (32, 32, 3)
  x = data._prepared['train'][0]  # pylint: disable=protected-access
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)  # data.normalize=channel.
  np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-3)
  first = list(sources.CIFAR[name]['files']['train'])[0][0]
  (folder / first).write_bytes((folder / first).read_bytes()[:-1])
  with pytest.raises(ConfigError, match=f'{first} has .* bytes, not the 20 x'):
    sources.cifar(name, str(folder))
  (folder / first).unlink()
  with pytest.raises(ConfigError, match=f'{first} is missing'):
    sources.cifar(name, str(folder))
