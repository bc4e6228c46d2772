"""Writes an ImageNet-layout folder of generated JPEGs, for `data.name=imagefolder` benchmarks
and smoke runs: OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg, photo-like (smooth colour
waves of a per-class frequency, plus noise), quality 90.

  python benchmarks/make_images.py OUT [--classes 10] [--train 50] [--val 10] [--size 500x375]
"""

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, width: int, height: int, label: int = 0) -> bytes:
  """One photo-like JPEG: three colour waves whose frequencies depend on `label`."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  a, b, c = rng.uniform(0.005, 0.05, 3) * (1 + 0.1 * label)
  waves = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))],
                   -1)
  pixels = np.clip(127 + 100 * waves + rng.normal(0, 12, waves.shape), 0, 255)
  buf = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('out')
  p.add_argument('--classes', type=int, default=10)
  p.add_argument('--train', type=int, default=50, help='images per class in train/')
  p.add_argument('--val', type=int, default=10, help='images per class in val/')
  p.add_argument('--size', default='500x375', help='WIDTHxHEIGHT')
  args = p.parse_args()
  if os.path.exists(args.out):
    print(f'make_images: {args.out} exists; give a new folder', file=sys.stderr)
    return 2
  width, height = (int(v) for v in args.size.lower().split('x'))
  rng = np.random.default_rng(0)
  for split, n in (('train', args.train), ('val', args.val)):
    for k in range(args.classes):
      folder = os.path.join(args.out, split, f'class{k:03d}')
      os.makedirs(folder)
      for i in range(n):
        with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
          f.write(photo(rng, width, height, k))
  print(f'make_images: {args.classes} classes, {args.train} + {args.val} images each -> '
        f'{args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
