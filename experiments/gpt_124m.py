"""A GPT-2-small-sized model (124M parameters at a 50k vocabulary) for your own prepared
corpus, on a GPU or TPU VM.

Prepare the corpus once, e.g. with GPT-2's tokenizer file or one you train:

  jaxbig tokenizer train CORPUS --vocab 50257 --out runs/corpus-bpe.json
  jaxbig prepare text CORPUS --tokenizer runs/corpus-bpe.json --out runs/corpus

Command:   jaxbig train experiments/gpt_124m.py data.path=runs/corpus [key=value ...]
Smoke:     jaxbig train experiments/gpt_124m.py:smoke data.path=DIR   (a tiny model, here)
Hardware:  one GPU with 40 GB or more (A100, H100), or a TPU v5e-8 with mesh.fsdp=-1;
           bf16, 0.5M tokens per step (16 x 1024 x train.accum_steps 32), blocks
           rematerialised, logits made 256 positions at a time.
Expected:  not measured here (no GPU or TPU measured yet); GPT-2 small reaches a
           validation loss near 3.3 nats per token on OpenWebText after about 10B tokens.
"""

import ml_collections

import gpt_bpe_stdlib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = gpt_bpe_stdlib.get_config(arg)
  c.data.path = 'runs/corpus'
  c.model.logits_chunk = 256  # Positions per logits chunk in the loss (0: whole logits).
  c.model.remat = 'full'
  c.model.scan_layers = True
  c.train.log_every = 10
  if arg == 'smoke':
    c.model.logits_chunk = 8  # Several chunks of the 32 positions.
    c.train.steps = 10
    return c
  c.data.seq_len = 1024
  c.data.batch_size = 512  # Sequences per update: 32 micro-batches of 16.
  c.data.eval_batch_size = 16
  c.data.eval_windows = 2048
  c.train.accum_steps = 32
  c.model.width, c.model.depth, c.model.heads, c.model.max_len = 768, 12, 12, 1024
  c.model.pos = 'learned'
  c.precision = 'bf16'
  c.opt.lr, c.opt.b2, c.opt.weight_decay = 6e-4, 0.95, 0.1
  c.opt.warmup_steps, c.opt.end_lr_factor = 700, 0.1
  c.train.steps = 19_000  # About 10B tokens.
  c.train.eval_every, c.train.ckpt_every, c.train.keep_checkpoints = 1000, 1000, 3
  return c
