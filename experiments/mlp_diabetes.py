"""The seed MLP (1000-500-100-1) regressing disease progression on sklearn's diabetes data.

Command:   jaxbig train experiments/mlp_diabetes.py [key=value ...]
Smoke:     jaxbig train experiments/mlp_diabetes.py:smoke   (a few steps, for tests)
Hardware:  any CPU.
Wall time: about 7 s on a 2-core CPU, compile included.
Expected:  summary.json eval.mse_vs_mean 0.47 (test MSE 53% below predicting the
           training mean) and eval.mse_vs_linear 0.98 (no worse than least squares).
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameter init, dropout and shuffling all derive from this.

  c.data = ml_collections.ConfigDict()
  c.data.name = 'diabetes'  # digits | diabetes | npz | synthetic.
  c.data.path = ''  # The .npz file when name=npz (arrays x, y; see the README).
  c.data.shape = (10,)  # Per-example input shape when name=synthetic.
  c.data.num_classes = 0  # Classes when name=synthetic (0: regression).
  c.data.size = 0  # Number of examples when name=synthetic.
  c.data.split_seed = 0  # Seed of the fixed train/val/test permutation.
  c.data.val_fraction = 0.1  # Share of the examples held out for validation.
  c.data.test_fraction = 0.2  # Share held out for the final test (ignored if the data has one).
  c.data.normalize = 'feature'  # none | global (one mean/std) | feature (per input feature).
  c.data.normalize_targets = True  # Standardise targets with training statistics.
  c.data.augment_shift = 0  # Image shifts: not for tabular data.
  c.data.augment_flip = False  # Image flips: not for tabular data.
  c.data.batch_size = 32  # Global training batch.
  c.data.eval_batch_size = 128  # Evaluation batch (the last one is padded and masked).

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'  # A name from jaxbig.models.MODELS.
  c.model.widths = (1000, 500, 100)  # Hidden layer widths (the seed's 1000-500-100-1).
  c.model.activation = 'relu'  # relu | gelu | tanh | sigmoid.
  c.model.dropout = 0.0  # Dropout after each hidden layer (L2 regularises better here).
  c.model.init = 'he'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.

  c.opt = ml_collections.ConfigDict()
  c.opt.name = 'adamw'  # sgd | momentum | nesterov | adagrad | rmsprop | adam | adamw | lion.
  c.opt.lr = 1e-3  # Peak learning rate.
  c.opt.momentum = 0.9  # Momentum (momentum, nesterov) or decay (rmsprop).
  c.opt.b1 = 0.9  # Adam/Lion first-moment decay.
  c.opt.b2 = 0.999  # Adam/Lion second-moment decay.
  c.opt.eps = 1e-8  # Adam epsilon.
  c.opt.weight_decay = 1e-2  # Decoupled weight decay (kernels only, not biases or norms).
  c.opt.l1 = 0.0  # L1 penalty added to the gradient (kernels only).
  c.opt.l2 = 0.3  # L2 penalty added to the gradient (kernels only): 310 examples, 0.6M weights.
  c.opt.clip_norm = 1.0  # Global gradient-norm clipping (0: off).
  c.opt.schedule = 'cosine'  # constant | cosine | linear, after the warmup.
  c.opt.warmup_steps = 20  # Linear warmup from 0 to lr.
  c.opt.end_lr_factor = 0.0  # Final learning rate as a fraction of lr.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500  # Optimizer updates.
  c.train.accum_steps = 1  # Micro-batches per update (gradient accumulation).
  c.train.loss = 'mse'  # xent (classification) | mse (regression).
  c.train.label_smoothing = 0.0  # Cross-entropy only.
  c.train.class_weights = (0.0,) * 0  # Cross-entropy only.
  c.train.balance_classes = False  # Cross-entropy only.
  c.train.log_every = 50  # Steps between metric lines (metrics.jsonl, TensorBoard).
  c.train.eval_every = 100  # Steps between validation evaluations (0: only at the end).
  c.train.ckpt_every = 0  # Steps between checkpoints (0: only at the end).
  c.train.keep_checkpoints = 2  # Newest checkpoints kept.
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
    c.model.widths = (16, 8)
    c.train.steps, c.train.log_every, c.train.eval_every = 20, 5, 10
    c.opt.warmup_steps = 2
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  return c
