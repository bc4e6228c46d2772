"""`data.name=imagefolder data.path=DIR`: ImageNet-layout folders of JPEG and PNG images.

DIR/train/<class>/<image> and DIR/val/<class>/<image> (DIR/test/<class>/<image> too, if
there is one; without it the final evaluation is of DIR/val, as ImageNet results are).
Class ids follow the sorted class folder names of DIR/train, which are saved with the run
(`DataMeta.classes`); every evaluation folder must hold the same classes.

Images are decoded with Pillow in grain worker processes (`data.workers`; 0 decodes in the
training process), a whole batch per element, each process decoding only its rows of the
global batch. Training images get an Inception-style random-resized crop (area fraction in
`data.crop_scale`, aspect ratio in `data.crop_ratio`, log-uniform) to `data.image_size`
and, with `data.augment_flip`, a horizontal flip; evaluation images are resized so that a
centre crop of `data.crop_fraction` of the shorter side becomes `data.image_size`. Pixels
are normalised per channel with `data.mean` and `data.std` (0..255 units; ImageNet's by
default). The draws come from the batch's seeded generator, so a resumed run sees the same
crops. JPEGs are decoded at a reduced scale where the crop allows (Pillow's `draft`).
Greyscale, palette and CMYK images are converted to RGB. An unreadable or truncated image,
or one over MAX_PIXELS pixels (refused before decoding), is skipped and counted: in
training another image of the batch takes its row, in evaluation its row is masked out.
The training step sums the skipped images of every process (`train/bad_images`); more
than `data.max_bad_images` in a run stop it, on every process at the same step, with one
line naming the last one.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterator

import grain
import numpy as np

from jaxbig.config import ConfigError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MAX_PIXELS = 64 * 2**20  # Bounds decoding: a 20000 x 20000 image is refused, not decoded.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


SPLITS = ('train', 'val', 'test')


def list_split(root: str, split: str, field: str = 'data.path'
               ) -> tuple[list[str], list[tuple[str, str]]]:
  """(sorted class names, [(class, file name)]) of root/split; ConfigError for a missing
  folder or a class folder without images."""
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise ConfigError(f'{field}: {folder} is missing (an image folder needs DIR/train/<class>/ '
                      'and DIR/val/<class>/)')
  classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
  if not classes:
    raise ConfigError(f'{field}: {folder} holds no class folders')
  files = []
  for c in classes:
    names = sorted(e.name for e in os.scandir(os.path.join(folder, c))
                   if e.is_file() and e.name.lower().endswith(EXTENSIONS))
    if not names:
      raise ConfigError(f'{field}: class folder {os.path.join(folder, c)} holds no images '
                        f"({', '.join(EXTENSIONS)})")
    files += [(c, n) for n in names]
  return classes, files


def list_folder(root: str, field: str = 'data.path'
                ) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
  """(classes, {split: [(class, file name)]}) of an ImageNet-layout folder: train/ and val/,
  and test/ where there is one; every split must hold the classes of train/."""
  classes, train = list_split(root, 'train', field)  # Listed once: ImageNet's has 1.28M files.
  splits = {'train': train}
  for split in SPLITS[1:]:
    if split == 'test' and not os.path.isdir(os.path.join(root, 'test')):
      continue
    others, splits[split] = list_split(root, split, field)
    if others != classes:
      differ = sorted(set(others) ^ set(classes))
      raise ConfigError(f"{field}: the classes of {split}/ and train/ differ: "
                        f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}")
  return classes, splits


class BadImage(ConfigError):
  """An image that cannot be decoded or is too large; skipped and counted where it occurs."""


def open_image(file, where: str):
  """The image in `file` (a path or a file object), opened, not decoded, and checked;
  BadImage naming it as `where`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    image = Image.open(file)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadImage(f'data.path: {where}: not a readable image ({type(e).__name__})') from None
  width, height = image.size
  if width * height > MAX_PIXELS:
    raise BadImage(f'data.path: {where}: {width} x {height} pixels, over the '
                   f'{MAX_PIXELS >> 20} M-pixel bound')
  return image


class Files:
  """A split's images by index, one file each."""

  def __init__(self, paths: list[str]):
    self.paths = paths

  def open(self, k: int):
    """(opened image, its name for messages); BadImage if it is not a readable image."""
    return open_image(self.paths[k], self.paths[k]), self.paths[k]


def _load(image, where: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
  """The `box` (left, top, right, bottom, in the image's pixels) of `image` resized to
  size x size RGB uint8, decoding a JPEG at the smallest scale that keeps the box's pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image.size
  scale = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
  if image.format == 'JPEG' and scale >= 2:
    image.draft('RGB', (math.ceil(width / scale), math.ceil(height / scale)))
  sx, sy = image.size[0] / width, image.size[1] / height  # The draft's scale.
  try:
    rgb = image.convert('RGB')
    out = rgb.resize((size, size), Image.BILINEAR,
                     box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
  except (OSError, ValueError, SyntaxError) as e:  # Truncated or damaged data.
    raise BadImage(f'data.path: {where}: not a readable image ({e})') from None
  return np.asarray(out, np.uint8)


def random_box(width: int, height: int, rng: np.random.Generator, scale: tuple,
               ratio: tuple) -> tuple[float, float, float, float]:
  """An Inception-style crop: area fraction uniform in `scale`, aspect ratio log-uniform in
  `ratio`; after 10 misses, the largest centred crop within `ratio`."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
    if w <= width and h <= height:
      x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
      return x0, y0, x0 + w, y0 + h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
  return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2


def center_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float]:
  """A centred square of `fraction` of the shorter side."""
  side = min(width, height) * fraction
  return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


class _DecodeTrain(grain.transforms.RandomMap):
  """An index batch -> this process's rows of the batch, decoded and augmented. The draws
  are made for the whole batch, then sliced: a batch is the same over any process count."""

  def __init__(self, images, labels: np.ndarray, rows, cfg):
    self.images, self.labels, self.rows = images, labels, rows
    self.size, self.flip = cfg.image_size, cfg.augment_flip
    self.scale, self.ratio = tuple(cfg.crop_scale), tuple(cfg.crop_ratio)
    self.mean = np.asarray(cfg.mean, np.float32)
    self.std = np.asarray(cfg.std, np.float32)

  def random_map(self, idx, rng: np.random.Generator):
    seeds = rng.integers(0, 2**63, len(idx))
    flips = rng.random(len(idx)) < 0.5
    lo, hi = self.rows or (0, len(idx))
    x = np.empty((hi - lo, self.size, self.size, 3), np.uint8)
    rows, bad = [], []
    # This process's rows first; only if all of them are bad, the batch's others in turn.
    for k in [*range(lo, hi), *range(hi, len(idx)), *range(lo)]:
      if k >= hi or k < lo:
        if rows:
          break
      try:
        image, where = self.images.open(idx[k])
        box = random_box(*image.size, np.random.default_rng(seeds[k]), self.scale, self.ratio)
        x[len(rows)] = _load(image, where, box, self.size)
      except BadImage as e:
        if lo <= k < hi:
          bad.append(str(e))
        continue
      if self.flip and flips[k]:
        x[len(rows)] = x[len(rows), :, ::-1].copy()
      rows.append(k)
    if not rows:
      raise ConfigError(f'{bad[-1]}; every image of a training batch is unreadable')
    # The skipped rows repeat the batch's good ones, so the batch keeps its shape; 'bad'
    # marks as many rows as images were skipped (the train step sums it over processes).
    take = np.resize(np.arange(len(rows)), hi - lo)
    flags = np.zeros(hi - lo, np.float32)
    flags[hi - lo - len(bad):] = 1.0
    return {'x': (x[take] - self.mean) / self.std, 'y': self.labels[idx[np.asarray(rows)[take]]],
            'bad': flags, BAD: bad}


class _DecodeEval(grain.transforms.Map):
  """A batch of (index or -1 for padding) -> the batch decoded, centre-cropped, masked."""

  def __init__(self, images, labels: np.ndarray, cfg):
    self.images, self.labels = images, labels
    self.size, self.fraction = cfg.image_size, cfg.crop_fraction
    self.mean = np.asarray(cfg.mean, np.float32)
    self.std = np.asarray(cfg.std, np.float32)

  def map(self, idx):
    x = np.zeros((len(idx), self.size, self.size, 3), np.float32)
    keep, bad = idx >= 0, []
    for i, k in enumerate(idx):
      if k >= 0:
        try:
          image, where = self.images.open(k)
          box = center_box(*image.size, self.fraction)
          x[i] = (_load(image, where, box, self.size) - self.mean) / self.std
        except BadImage as e:
          keep[i] = False
          bad.append(str(e))
    return {'x': x, 'y': np.where(keep, self.labels[np.maximum(idx, 0)], 0).astype(np.int32),
            'mask': keep.astype(np.float32), BAD: bad}


BAD = 'bad_images'  # A batch's skipped images (their one-line reasons), taken out of it.


def _note_bad(reasons: list[str], total: int) -> None:
  from jaxbig import metrics  # pylint: disable=g-import-not-at-top
  for i, reason in enumerate(reasons, total - len(reasons) + 1):
    metrics.note(f'skipped bad image {i}: {reason.removeprefix("data.path: ")}')


class BatchIterator:
  """Batches of `make(start)`, from batch `start` on. Its state is the next batch's number
  and the run's count of skipped training images (`bad`: kept up to date by the training
  loop from the step's metrics, which sum every process's), not the worker processes'
  positions: a run resumes with any `data.workers`. `last_bad` is the last skipped image
  this process met, for the message when the run passes `data.max_bad_images`."""

  def __init__(self, make):
    self._make, self._next, self._it = make, 0, None
    self.bad, self.unlogged, self.seen, self.last_bad = 0, 0, 0, ''

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._make(self._next)
    batch = next(self._it)
    self._next += 1
    reasons = list(batch.pop(BAD))
    if reasons:
      self.seen += len(reasons)
      self.last_bad = reasons[-1]
      _note_bad(reasons, self.seen)
    return batch

  def get_state(self) -> dict:
    return {'next_batch': self._next, 'bad_images': self.bad + self.unlogged}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next, self.bad = int(state['next_batch']), int(state.get('bad_images', 0))
    self.unlogged = 0

  def close(self) -> None:
    """Stops the worker processes (and frees their shared memory)."""
    _close(self._it)
    self._it = None


def _close(it) -> None:
  close = getattr(it, 'close', None)
  if close is not None:
    close()


class ImageFolder:
  """ImageNet-layout image folders with the interface of `jaxbig.data.Data`."""

  SOURCE = 'imagefolder'

  def __init__(self, cfg, seed: int):
    try:
      self._init(cfg, seed)
    except AttributeError as e:  # ConfigDict: a field this source needs is not declared.
      field = str(e).splitlines()[0].strip('"\'')
      raise ConfigError(f'data.{field}: data.name={self.SOURCE} needs this field; the '
                        "experiment's data section does not declare it") from None

  def _init(self, cfg, seed: int) -> None:
    from jaxbig.data import DataMeta  # Circular otherwise.
    if not cfg.path:
      raise ConfigError(f'data.path: required when data.name={self.SOURCE}')
    if cfg.image_size <= 0:
      raise ConfigError(f'data.image_size must be > 0, got {cfg.image_size}')
    if not 0 < cfg.crop_fraction <= 1:
      raise ConfigError(f'data.crop_fraction must be in (0, 1], got {cfg.crop_fraction}')
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ConfigError(f'data.crop_scale must be 0 < lo <= hi <= 1, got {tuple(cfg.crop_scale)}')
    lo, hi = cfg.crop_ratio
    if not 0 < lo <= hi:
      raise ConfigError(f'data.crop_ratio must be 0 < lo <= hi, got {tuple(cfg.crop_ratio)}')
    if cfg.max_bad_images < 0:
      raise ConfigError(f'data.max_bad_images must be >= 0, got {cfg.max_bad_images}')
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
      raise ConfigError('data.mean and data.std: three values each (RGB), std > 0')
    self.cfg, self.seed = cfg, seed
    self._list(cfg)
    if cfg.batch_size > len(self._labels['train']):
      raise ConfigError(f'data.batch_size ({cfg.batch_size}) is larger than the training split '
                        f"({len(self._labels['train'])} images)")
    self.meta = DataMeta(
        input_shape=(cfg.image_size, cfg.image_size, 3), num_outputs=len(self.classes),
        task='classification', num_classes=len(self.classes),
        sizes={k: len(v) for k, v in self._labels.items()},
        x_mean=np.asarray(cfg.mean, np.float32), x_std=np.asarray(cfg.std, np.float32),
        classes=tuple(self.classes))
    self.workers = (os.cpu_count() or 1) if cfg.workers < 0 else cfg.workers

  def _list(self, cfg) -> None:
    """Sets the classes, and per split the images (`Files`) and their labels."""
    self.classes, splits = list_folder(cfg.path)
    ids = {c: i for i, c in enumerate(self.classes)}
    self._images, self._labels = {}, {}
    for split in SPLITS:
      if split not in splits:  # No test/: the final evaluation is of val, as for ImageNet.
        self._images[split], self._labels[split] = self._images['val'], self._labels['val']
        continue
      files = splits[split]
      self._images[split] = Files([os.path.join(cfg.path, split, c, n) for c, n in files])
      self._labels[split] = np.array([ids[c] for c, _ in files], np.int32)

  @property
  def train_labels(self) -> np.ndarray:
    return self._labels['train']

  def identity(self) -> dict:
    """The folder and a digest of its file list (names and sizes), for resume checks."""
    digest = hashlib.sha256()
    for split in SPLITS:
      for path in self._images[split].paths:
        digest.update(f'{path}\0{os.path.getsize(path)}\n'.encode('utf-8', 'surrogatepass'))
    return {'source': self.SOURCE, 'path': os.path.abspath(self.cfg.path),
            'digest': digest.hexdigest()}

  def _parallel(self, ds: grain.MapDataset) -> grain.IterDataset:
    from jaxbig.data import text  # pylint: disable=g-import-not-at-top
    it = ds.to_iter_dataset(text.READ_OPTIONS)
    if self.workers:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags' defaults.
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=2))
    return it

  def train_iter(self, rows: tuple[int, int] | None = None) -> 'BatchIterator':
    """An endless, seeded, checkpointable iterator of augmented training batches."""
    from jaxbig.data import _ShuffledBatches  # pylint: disable=g-import-not-at-top
    decode = _DecodeTrain(self._images['train'], self._labels['train'], rows, self.cfg)
    ds = _ShuffledBatches(len(self._labels['train']), self.cfg.batch_size, self.seed)
    ds = ds.random_map(decode, seed=self.seed + 1)  # Batch i's draws depend on i alone.
    return BatchIterator(lambda start: iter(self._parallel(ds[start:])))

  def batch_spec(self, size: int, with_mask: bool) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    s = self.cfg.image_size
    spec = {'x': jax.ShapeDtypeStruct((size, s, s, 3), np.float32),
            'y': jax.ShapeDtypeStruct((size,), np.int32)}
    if with_mask:
      spec['mask'] = jax.ShapeDtypeStruct((size,), np.float32)
    else:  # Training: the rows that stand in for skipped images.
      spec['bad'] = jax.ShapeDtypeStruct((size,), np.float32)
    return spec

  def eval_batches(self, split: str) -> Iterator[dict]:
    """Every image of `split` once, in order, centre-cropped, in padded, masked batches."""
    n, bs = len(self._labels[split]), self.cfg.eval_batch_size
    padded = np.full(-(-n // bs) * bs, -1, np.int64)
    padded[:n] = np.arange(n)
    ds = grain.MapDataset.source(padded.reshape(-1, bs)).map(
        _DecodeEval(self._images[split], self._labels[split], self.cfg))
    it, bad = iter(self._parallel(ds)), 0
    try:
      for batch in it:
        reasons = list(batch.pop(BAD))
        bad += len(reasons)
        _note_bad(reasons, bad)
        yield batch
    finally:
      _close(it)
