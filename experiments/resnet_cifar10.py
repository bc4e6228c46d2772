"""A ResNet-18 (3x3 stem, no max-pool) on CIFAR-10 from its binary release.

Data:      the 'cifar-10-batches-bin' folder of https://www.cs.toronto.edu/~kriz/cifar.html
           (cifar-10-binary.tar.gz, 162 MB; raw bytes, read without pickle), e.g.
           data/cifar-10-batches-bin. data.name=cifar100 with the 'cifar-100-binary' folder
           trains on CIFAR-100's fine labels (set data.num_classes=100).
Command:   jaxbig train experiments/resnet_cifar10.py data.path=DIR [key=value ...]
Smoke:     jaxbig train experiments/resnet_cifar10.py:smoke data.path=DIR   (a few steps)
Hardware:  one GPU (minutes per epoch); a 2-core CPU runs the smoke variant only.
Recipe:    SGD with Nesterov momentum 0.9, lr 0.1 at batch 128, cosine over 200 epochs,
           L2 5e-4 on the gradient, random 4-pixel shifts and horizontal flips, per-channel
           normalisation: the usual recipe, which reaches about 95% test accuracy with this
           network. Not measured here (no GPU run yet).
"""

import ml_collections

import resnet_digits  # The model section, and the data and training sections beneath it.

EPOCH = 50_000 // 128  # Steps per epoch of the 45,000 + 5,000 training images at batch 128.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = resnet_digits.get_config(arg)
  c.data.name = 'cifar10'  # cifar10 | cifar100 (binary release folders).
  c.data.path = 'data/cifar-10-batches-bin'
  c.data.num_classes = 10
  c.data.val_fraction = 0.1  # 5,000 of the 50,000 training images; the test split is fixed.
  c.data.normalize = 'channel'  # Per-channel mean and std of the training images.
  c.data.augment_shift = 4
  c.data.augment_flip = True
  c.data.batch_size, c.data.eval_batch_size = 128, 1000
  c.model.width = 64  # ResNet-18's channels.
  c.opt.name, c.opt.lr, c.opt.momentum = 'nesterov', 0.1, 0.9
  # PyTorch's SGD weight_decay=5e-4 is an L2 penalty on the gradient, before momentum.
  c.opt.l2, c.opt.weight_decay, c.opt.clip_norm = 5e-4, 0.0, 0.0
  c.opt.warmup_steps = EPOCH
  c.train.steps = 200 * EPOCH
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 100, 5 * EPOCH, 5 * EPOCH
  if arg == 'smoke':
    c.model.width = 8
    c.data.batch_size, c.data.eval_batch_size = 32, 500
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 5, 10, 10
    c.opt.warmup_steps = 2
  return c
