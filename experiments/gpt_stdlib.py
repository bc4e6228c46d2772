"""A byte-level GPT (decoder-only Transformer) on the Python standard library's source code.

Command:   jaxbig train experiments/gpt_stdlib.py [key=value ...]
           jaxbig generate WORKDIR --prompt "def " --tokens 200
Smoke:     jaxbig train experiments/gpt_stdlib.py:smoke   (a few steps, for tests)
Hardware:  any CPU; sized for 2 cores and 10 minutes.
Wall time: about 9 minutes on a 2-core CPU (527 s measured, 4 s of it compile).
Expected:  summary.json eval.bits_per_byte 2.03 on the held-out test files (val 2.15);
           predicting bytes by their training frequency gives 4.68. Measured on
           Python 3.11's standard library (other versions have other files).
           `generate --prompt "def "` then writes Python-looking text: indented
           `def test_...(self, ...):` methods, `self.assert...` calls.
"""

import ml_collections

import base  # The shared optimizer, training, mesh and precision settings.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base.get_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = 'stdlib'  # stdlib (this Python's standard library) | text (data.path).
  c.data.path = ''  # A UTF-8 text file or a folder of them when name=text.
  c.data.pattern = ''  # File-name pattern in folders ('' : *.py for stdlib, * for text).
  c.data.split_seed = 0  # Unused by text (files are split by a hash of their path).
  c.data.val_fraction = 0.05  # Share of files held out for validation.
  c.data.test_fraction = 0.05  # Share of files held out for the final test.
  c.data.seq_len = 128  # Bytes per training window (the model sees up to this much context).
  c.data.batch_size = 32  # Windows per step.
  c.data.eval_batch_size = 64  # Windows per evaluation batch.
  c.data.eval_windows = 512  # Windows per evaluation, spread evenly over the split.
  c.data.max_file_mb = 256  # Refuse a file larger than this (MiB); raise it for larger ones.
  c.data.max_total_mb = 4096  # Refuse more text than this in all (MiB), e.g. a wrong data.path.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer'  # transformer | lstm | gru (an LM on text data).
  c.model.width = 192  # Residual stream width.
  c.model.depth = 3  # Transformer blocks.
  c.model.heads = 3  # Attention heads (width / heads features each).
  c.model.mlp_ratio = 4  # Feed-forward width as a multiple of width.
  c.model.max_len = 256  # Longest sequence (positions, and the KV cache for generation).
  c.model.pos = 'rope'  # rope (rotary) | learned (a table of max_len positions).
  c.model.dropout = 0.0  # Residual dropout.
  # auto: cuDNN's fused attention on NVIDIA GPUs in bf16/fp16, XLA's elsewhere | xla | cudnn.
  c.model.attention = 'auto'
  # What a block keeps for the backward pass, the rest recomputed: none | full | dots |
  # dots_saveable | offload | save:qkv,attn_out,mlp_in,mlp_hidden (docs/models.md).
  c.model.remat = 'none'
  c.model.scan_layers = False  # One compiled block scanned over depth (faster compiles).
  c.model.tie_embeddings = True  # Logits from the byte embedding table.
  # Decoder options (Llama-style models set them): key/value heads for grouped-query
  # attention (0: one per query head), the MLP (gelu | swiglu), biases in the projections,
  # RoPE's base wavelength, RMSNorm's epsilon.
  c.model.kv_heads = 0
  c.model.mlp = 'gelu'
  c.model.bias = False
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.norm = 'rms'  # rms (RMSNorm) | layer (LayerNorm with a bias, as in GPT-2).
  c.model.mlp_dim = 0  # The MLP's hidden units where > 0 (else width x mlp_ratio).
  c.model.vocab_size = 0  # Embedding rows where > 0 (an imported model's), else the data's.
  c.model.init_std = 0.02  # Standard deviation of the normal weight initialiser.

  # Shared settings (experiments/base.py) this experiment changes.
  c.opt.lr = 4e-3  # Peak learning rate.
  c.opt.b2 = 0.95  # Adam/Lion second-moment decay.
  c.opt.weight_decay = 0.1  # Decoupled weight decay (kernels and embeddings, not norms).
  c.opt.end_lr_factor = 0.1  # Final learning rate as a fraction of lr.
  c.train.steps = 650  # Optimizer updates (sized for 10 minutes on 2 cores).
  c.train.eval_every = 325  # Steps between validation evaluations (0: only at the end).
  c.train.ckpt_every = 325  # Steps between checkpoints (0: only at the end).
  c.train.keep_checkpoints = 2  # Newest checkpoints kept.

  if arg == 'smoke':  # Seconds, for tests and a first look.
    c.model.width, c.model.depth, c.model.heads, c.model.max_len = 32, 2, 4, 64
    c.data.seq_len, c.data.batch_size, c.data.eval_batch_size = 32, 8, 16
    c.data.eval_windows = 32
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 20, 5, 10, 10
    c.opt.warmup_steps = 2
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  return c
