"""ResNet-50 on ImageNet (ILSVRC-2012) in its folder layout, the standard 90-epoch recipe.

Data:      DIR/train/<wnid>/*.JPEG (1,281,167 images) and DIR/val/<wnid>/*.JPEG (50,000,
           sorted into class folders), e.g. data/imagenet.
Command:   jaxbig train experiments/resnet50_imagenet.py data.path=DIR [key=value ...]
Packed:    jaxbig prepare images DIR --out PACKED   (ArrayRecord shards of the JPEG bytes,
           for filesystems slow at many small files), then train with
           data.name=imagerecords data.path=PACKED: the same batches.
Smoke:     jaxbig train experiments/resnet50_imagenet.py:smoke data.path=DIR   (32x32 crops,
           a tiny ResNet, a few steps: any small folder of the same layout)
Hardware:  8 GPUs (A100/H100) or a TPU v5e-16 with mesh.data=-1; bf16; decoding needs
           about 16 CPU cores per 8 accelerators (data.workers: all cores by default).
Recipe:    Nesterov momentum 0.9, lr 0.1 per 256 images (0.4 at batch 1024), 5 warmup
           epochs then cosine, L2 1e-4 on kernels (not BatchNorm or biases), label smoothing
           0.1, random-resized crops to 224 with flips, 87.5% centre crops for evaluation.
Expected:  about 76-77% top-1 on val, as this recipe reaches elsewhere (torchvision's
           ResNet-50 weights: 76.1%); not measured here (no GPU or TPU run yet).
"""

import ml_collections

import base

IMAGES = 1_281_167
BATCH = 1024
EPOCH = IMAGES // BATCH


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagefolder'  # Or imagerecords: the folder packed by `jaxbig prepare images`.
  c.data.path = 'data/imagenet'  # DIR/train/<class>/, DIR/val/<class>/ (DIR/test/ optional).
  c.data.image_size = 224  # Training crops and evaluation centre crops, pixels per side.
  c.data.crop_fraction = 0.875  # Evaluation: the centre crop's share of the shorter side.
  c.data.crop_scale = (0.08, 1.0)  # Training crops: range of their share of the image area.
  c.data.crop_ratio = (3 / 4, 4 / 3)  # Training crops: range of width / height.
  c.data.augment_flip = True  # Random horizontal flips of training images.
  c.data.mean = (123.675, 116.28, 103.53)  # Per-channel mean (0..255), ImageNet's.
  c.data.std = (58.395, 57.12, 57.375)  # Per-channel std (0..255), ImageNet's.
  c.data.workers = -1  # Decoding processes (-1: one per core; 0: in the training process).
  c.data.max_bad_images = 100  # Unreadable training images skipped before the run stops.
  c.data.verify_shards = False  # imagerecords: check every shard's SHA-256 first (reads all).
  c.data.batch_size = BATCH  # Global training batch.
  c.data.eval_batch_size = 1000  # Evaluation batch (the last one is padded and masked).

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet50'  # resnet18 | resnet34 | resnet50 | resnet_tiny.
  c.model.width = 64  # Channels of the first stage (doubling after).
  c.model.small_input = False  # 7x7 stride-2 stem and max-pool, for 224x224 images.
  c.model.init = 'he'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.

  c.opt.name, c.opt.lr, c.opt.momentum = 'nesterov', 0.1 * BATCH / 256, 0.9
  c.opt.l2, c.opt.weight_decay, c.opt.clip_norm = 1e-4, 0.0, 0.0
  c.opt.warmup_steps = 5 * EPOCH
  c.train.steps = 90 * EPOCH
  c.train.label_smoothing = 0.1
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 100, 5 * EPOCH, EPOCH
  c.precision = 'bf16'
  if arg == 'smoke':
    c.data.image_size, c.data.batch_size, c.data.eval_batch_size = 32, 8, 8
    c.data.workers = 0
    c.model.name, c.model.width, c.model.small_input = 'resnet_tiny', 8, True
    c.opt.lr, c.opt.warmup_steps = 0.1, 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 6, 2, 6, 6
    c.precision = 'fp32'
  return c
