"""The seed MLP (1000-500-100-1) regressing disease progression on sklearn's diabetes data.

Command:   jaxbig train experiments/mlp_diabetes.py [key=value ...]
Smoke:     jaxbig train experiments/mlp_diabetes.py:smoke   (a few steps, for tests)
Hardware:  any CPU.
Wall time: about 7 s on a 2-core CPU, compile included.
Expected:  summary.json eval.mse_vs_mean 0.47 (test MSE 53% below predicting the
           training mean) and eval.mse_vs_linear 0.98 (no worse than least squares).
"""

import ml_collections

import base  # The shared optimizer, training, mesh and precision settings.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base.get_config()

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

  # Shared settings (experiments/base.py) this experiment changes.
  c.opt.weight_decay = 1e-2  # Decoupled weight decay (kernels only, not biases or norms).
  c.opt.l2 = 0.3  # L2 penalty added to the gradient (kernels only): 310 examples, 0.6M weights.
  c.opt.warmup_steps = 20  # Linear warmup from 0 to lr.
  c.train.steps = 500  # Optimizer updates.
  c.train.loss = 'mse'  # xent (classification) | mse (regression).
  c.train.eval_every = 100  # Steps between validation evaluations (0: only at the end).
  c.train.ckpt_every = 0  # Steps between checkpoints (0: only at the end).
  c.train.keep_checkpoints = 2  # Newest checkpoints kept.

  if arg == 'smoke':  # Seconds, for tests and a first look.
    c.model.widths = (16, 8)
    c.train.steps, c.train.log_every, c.train.eval_every = 20, 5, 10
    c.opt.warmup_steps = 2
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  return c
