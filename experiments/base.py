"""The settings every experiment shares: optimizer, training loop, mesh, precision, kernels.

Not an experiment itself: each experiment file calls `base.get_config()`, adds its `data`
and `model` sections and changes what it needs. Every field is declared here with its
default, so `key=value` overrides reach the same fields in every experiment.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameter init, dropout and the order of training examples derive from this.

  c.opt = ml_collections.ConfigDict()
  c.opt.name = 'adamw'  # sgd | momentum | nesterov | adagrad | rmsprop | adam | adamw | lion.
  c.opt.lr = 1e-3  # Peak learning rate.
  c.opt.momentum = 0.9  # Momentum (momentum, nesterov) or decay (rmsprop).
  c.opt.b1 = 0.9  # Adam/Lion first-moment decay.
  c.opt.b2 = 0.999  # Adam/Lion second-moment decay.
  c.opt.eps = 1e-8  # Adam epsilon.
  c.opt.weight_decay = 1e-4  # Decoupled weight decay (kernels and embeddings, not biases).
  c.opt.l1 = 0.0  # L1 penalty added to the gradient (kernels only).
  c.opt.l2 = 0.0  # L2 penalty added to the gradient (kernels only).
  c.opt.clip_norm = 1.0  # Global gradient-norm clipping (0: off).
  c.opt.schedule = 'cosine'  # constant | cosine | linear, after the warmup.
  c.opt.warmup_steps = 50  # Linear warmup from 0 to lr.
  c.opt.end_lr_factor = 0.0  # Final learning rate as a fraction of lr.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer updates.
  # A jaxbig workdir or a Hugging Face model folder whose parameters a fresh run starts from
  # (fine-tuning; the optimizer starts fresh). '' : the initialisers.
  c.train.init_from = ''
  c.train.accum_steps = 1  # Micro-batches per update (gradient accumulation).
  c.train.loss = 'xent'  # xent (classification, next token) | mse (regression).
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

  # LoRA (Transformers): rank > 0 trains low-rank adapters on the `targets` projections (q, k,
  # v, o: attention; mlp: the MLP's) with everything else frozen; alpha / rank scales them.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = 'q,k,v,o'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel devices (-1: all that remain).
  c.mesh.fsdp = 1  # Devices sharding parameters and batch (fully sharded data parallel).
  c.mesh.tensor = 1  # Devices sharding layer widths: heads, hidden units (tensor parallel).
  # Devices sharding a Transformer's sequence positions (context parallel, long sequences).
  c.mesh.context = 1
  c.mesh.slices = 1  # TPU slices the data axis spans (multi-slice: data parallel over DCN).
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
  return c
