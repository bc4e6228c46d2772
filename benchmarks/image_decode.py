"""Decoding JPEGs for training: Pillow (full scale and with `draft`) against simplejpeg.

Issue 26 asks for decode + random-resized crop to 224 + flip of 500x375 JPEGs at 150 images/s
or more per worker process, and for the faster decoder here to be chosen by measurement.
Each row decodes the same generated photos-like JPEGs (quality 90, smooth gradients and
noise), draws an Inception-style crop with jaxbig's `random_box`, resizes it to 224x224
bilinearly and flips half: one process, best of REPEATS passes.

  python benchmarks/image_decode.py [--images 200] [--out FILE.md]
"""

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from jaxbig.data import images

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_images  # pylint: disable=g-import-not-at-top,wrong-import-position

REPEATS = 3
SIZE = 224


def _photos(n: int) -> list[bytes]:
  rng = np.random.default_rng(0)
  return [make_images.photo(rng, 500, 375) for _ in range(n)]


def _pillow(data: bytes, rng, draft: bool) -> np.ndarray:
  image = Image.open(io.BytesIO(data))
  box = images.random_box(*image.size, rng, (0.08, 1.0), (3 / 4, 4 / 3))
  if draft:
    return images._load(image, 'x', box, SIZE)  # pylint: disable=protected-access
  return np.asarray(image.convert('RGB').resize((SIZE, SIZE), Image.BILINEAR, box=box))


def _simplejpeg(data: bytes, rng) -> np.ndarray:
  import simplejpeg  # pylint: disable=g-import-not-at-top
  width, height, _, _ = simplejpeg.decode_jpeg_header(data)
  box = images.random_box(width, height, rng, (0.08, 1.0), (3 / 4, 4 / 3))
  # Its own DCT scaling: the smallest of 1/8 .. 1 that keeps the crop's pixels.
  scale = min((box[2] - box[0]) / SIZE, (box[3] - box[1]) / SIZE)
  factor = max([f for f in (1, 2, 4, 8) if f <= scale] or [1])
  pixels = simplejpeg.decode_jpeg(data, colorspace='RGB', min_width=width // factor,
                                  min_height=height // factor)
  sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
  return np.asarray(Image.fromarray(pixels).resize(
      (SIZE, SIZE), Image.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--images', type=int, default=200)
  p.add_argument('--out', default='')
  args = p.parse_args()
  photos = _photos(args.images)
  rows = {'Pillow, full-scale decode': lambda d, r: _pillow(d, r, False),
          'Pillow with draft (jaxbig)': lambda d, r: _pillow(d, r, True)}
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top,unused-import
    rows['simplejpeg with its scaling'] = _simplejpeg
  except ImportError:
    print('simplejpeg is not installed: its row is left out')
  lines = ['| decoder | images/s, one process |', '|---|---|']
  for name, fn in rows.items():
    best = float('inf')
    for _ in range(REPEATS):
      rng = np.random.default_rng(1)
      t0 = time.perf_counter()
      for data in photos:
        x = fn(data, rng)
        if rng.random() < 0.5:
          x = x[:, ::-1].copy()
      best = min(best, time.perf_counter() - t0)
    lines.append(f'| {name} | {len(photos) / best:.0f} |')
  table = '\n'.join([f'{len(photos)} JPEGs of 500x375, quality 90 -> random-resized crop '
                     f'{SIZE}x{SIZE} + flip.', '', *lines])
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  main()
