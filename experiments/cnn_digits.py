"""The seed CNN on sklearn's handwritten digits (8x8 grey images, 10 classes).

Command:   jaxbig train experiments/cnn_digits.py [key=value ...]
Smoke:     jaxbig train experiments/cnn_digits.py:smoke   (a few steps, for tests)
Hardware:  any CPU; 2 cores are enough.
Wall time: about 15 s on a 2-core CPU, compile included (14.1 s measured on an Intel Xeon VM).
Expected:  summary.json eval.accuracy 0.994 on the held-out test split (359 images).
"""

import ml_collections

import base  # The shared optimizer, training, mesh and precision settings.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base.get_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'  # digits | diabetes | npz | synthetic.
  c.data.path = ''  # The .npz file when name=npz (arrays x, y; see the README).
  c.data.shape = (8, 8, 1)  # Per-example input shape when name=synthetic.
  c.data.num_classes = 10  # Classes: synthetic's count; npz labels must be below it (0: any).
  c.data.size = 0  # Number of examples when name=synthetic.
  c.data.split_seed = 0  # Seed of the fixed train/val/test permutation.
  c.data.val_fraction = 0.1  # Share of the examples held out for validation.
  c.data.test_fraction = 0.2  # Share held out for the final test (ignored if the data has one).
  c.data.normalize = 'global'  # none | global (one mean/std) | feature (per input feature).
  c.data.normalize_targets = True  # Regression: standardise targets with training statistics.
  c.data.augment_shift = 1  # Random shift of training images by up to this many pixels.
  c.data.augment_flip = False  # Random horizontal flips (wrong for digits: 2 vs 5).
  c.data.batch_size = 64  # Global training batch.
  c.data.eval_batch_size = 512  # Evaluation batch (the last one is padded and masked).

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'  # A name from jaxbig.models.MODELS.
  c.model.features = (64, 128)  # Channels of the conv stages (each: 3x3 conv, ReLU, 2x2 pool).
  c.model.hidden = 1024  # Width of the dense layer before the classifier.
  c.model.dropout = 0.1  # Dropout rate before the classifier.
  c.model.init = 'he'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.

  # Shared settings (experiments/base.py) this experiment changes.
  c.opt.lr = 2e-3  # Peak learning rate.
  c.train.steps = 800  # Optimizer updates.

  if arg == 'smoke':  # Seconds, for tests and a first look.
    c.model.features, c.model.hidden = (8, 16), 32
    c.data.batch_size, c.data.eval_batch_size = 32, 128
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 20, 5, 10, 10
    c.opt.warmup_steps = 2
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  return c
