"""A ResNet-18 (3x3 stem, no max-pool) on sklearn's digits: the cnn_digits run with BatchNorm.

Command:   jaxbig train experiments/resnet_digits.py [key=value ...]
Smoke:     jaxbig train experiments/resnet_digits.py:smoke   (resnet_tiny, a few steps)
Hardware:  any CPU; model.name=resnet34 or resnet50 (model.small_input=false for 224x224
           images) on a GPU.
Wall time: about 70 s on a 2-core CPU, compile included (67 s on an Intel Xeon VM).
Expected:  summary.json eval.accuracy 0.994 on the held-out test split (359 images).
"""

import ml_collections

import cnn_digits  # The base: data, optimizer, training and mesh sections.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = cnn_digits.get_config(arg)
  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet_tiny' if arg == 'smoke' else 'resnet18'  # resnet18|34|50|_tiny.
  c.model.width = 8 if arg == 'smoke' else 32  # Channels of the first stage (doubling after).
  c.model.small_input = True  # 3x3 stride-1 stem without max-pool, for small images.
  c.model.init = 'he'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.
  if not arg:
    c.train.steps = 600  # BatchNorm trains fast; fewer steps than the plain CNN.
  return c
