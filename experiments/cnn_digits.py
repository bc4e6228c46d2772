"""The seed CNN on sklearn's handwritten digits (8x8 grey images, 10 classes).

Command:   jaxbig train experiments/cnn_digits.py [key=value ...]
Smoke:     jaxbig train experiments/cnn_digits.py:smoke   (a few steps, for tests)
Hardware:  any CPU; 2 cores are enough.
Wall time: about 15 s on a 2-core CPU, compile included (14.1 s measured on an Intel Xeon VM).
Expected:  summary.json eval.accuracy 0.994 on the held-out test split (359 images).
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameter init, dropout and shuffling all derive from this.

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

  c.opt = ml_collections.ConfigDict()
  c.opt.name = 'adamw'  # sgd | momentum | nesterov | adagrad | rmsprop | adam | adamw | lion.
  c.opt.lr = 2e-3  # Peak learning rate.
  c.opt.momentum = 0.9  # Momentum (momentum, nesterov) or decay (rmsprop).
  c.opt.b1 = 0.9  # Adam/Lion first-moment decay.
  c.opt.b2 = 0.999  # Adam/Lion second-moment decay.
  c.opt.eps = 1e-8  # Adam epsilon.
  c.opt.weight_decay = 1e-4  # Decoupled weight decay (kernels only, not biases or norms).
  c.opt.l1 = 0.0  # L1 penalty added to the gradient (kernels only).
  c.opt.l2 = 0.0  # L2 penalty added to the gradient (kernels only).
  c.opt.clip_norm = 1.0  # Global gradient-norm clipping (0: off).
  c.opt.schedule = 'cosine'  # constant | cosine | linear, after the warmup.
  c.opt.warmup_steps = 50  # Linear warmup from 0 to lr.
  c.opt.end_lr_factor = 0.0  # Final learning rate as a fraction of lr.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 800  # Optimizer updates.
  c.train.accum_steps = 1  # Micro-batches per update (gradient accumulation).
  c.train.loss = 'xent'  # xent (classification) | mse (regression).
  c.train.label_smoothing = 0.0  # Cross-entropy label smoothing.
  c.train.class_weights = (0.0,) * 0  # Per-class loss weights; empty: all 1.
  c.train.balance_classes = False  # Weights inversely proportional to class frequency.
  c.train.log_every = 50  # Steps between metric lines (metrics.jsonl, TensorBoard).
  c.train.eval_every = 200  # Steps between validation evaluations (0: only at the end).
  c.train.ckpt_every = 200  # Steps between checkpoints (0: only at the end).
  c.train.keep_checkpoints = 3  # Newest checkpoints kept.
  c.train.on_nonfinite = 'skip'  # Non-finite loss or gradients: skip (state kept) | abort.
  c.train.max_consecutive_skips = 25  # skip: more in a row stop the run (exit 3).
  c.train.profile_steps = 0  # Steps traced by jax.profiler into WORKDIR/tb (0: none).
  c.train.profile_start = 10  # Tracing starts after this step (past compile and warm-up).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel devices (-1: all that remain).
  c.mesh.fsdp = 1  # Devices sharding parameters and batch (fully sharded data parallel).
  c.mesh.tensor = 1  # Devices sharding layer widths (tensor parallel).
  # Overrides of the logical-axis -> mesh-axis rules (jaxbig/sharding.py), e.g. 'embed=none'.
  c.mesh.rules = ''

  # fp32 (matmul precision 'highest') | tf32 | bf16 | fp16 | fp8 | int8: jaxbig/precision.py.
  c.precision = 'fp32'
  # auto: the fast paths measured on the devices' platform | reference: plain XLA, autodiff
  # (jaxbig/kernels/__init__.py).
  c.kernels = 'auto'
  c.loss_scale = ml_collections.ConfigDict()  # Loss scaling, for fp16 gradients.
  c.loss_scale.mode = 'auto'  # auto (dynamic for fp16, else none) | dynamic | static | none.
  c.loss_scale.init = 2.0**15  # Initial (static: the) scale.
  c.loss_scale.growth_interval = 2000  # Finite steps in a row before the scale grows.
  c.loss_scale.factor = 2.0  # Growth on success, backoff on overflow.
  c.loss_scale.max = 2.0**24  # Cap on the scale.

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = 'jit'  # jit: one program over the mesh; pmap: per-device data parallel.

  if arg == 'smoke':  # Seconds, for tests and a first look.
    c.model.features, c.model.hidden = (8, 16), 32
    c.data.batch_size, c.data.eval_batch_size = 32, 128
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 20, 5, 10, 10
    c.opt.warmup_steps = 2
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  return c
