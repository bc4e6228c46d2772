"""Fine-tune a published Hugging Face model (GPT-2 or Llama family) on your own corpus.

Import the model once (a local folder with config.json, *.safetensors and tokenizer.json),
prepare the corpus with the model's own tokenizer, then train from the imported workdir:

  jaxbig import-hf path/to/hf-model --workdir runs/base
  jaxbig prepare text CORPUS --tokenizer runs/base/tokenizer.json --out runs/corpus
  jaxbig train experiments/finetune_hf.py train.init_from=runs/base data.path=runs/corpus \
      $(jaxbig import-hf --print-overrides path/to/hf-model)

(`train.init_from` may also name the Hugging Face folder itself.) The model fields must
match the imported architecture; a mismatch is a one-line error naming the field.
`jaxbig generate runs/base --prompt ...` samples from the imported model as it is, and
`jaxbig export-hf WORKDIR --out DIR` writes a folder that `transformers` loads.

Smoke:     jaxbig train experiments/finetune_hf.py:smoke   (a tiny GPT-2-shaped model on
           random tokens, no download; `jaxbig export-hf` turns it into a GPT-2 folder)
Hardware:  the imported model's: GPT-2 small (124M) fine-tunes on one 24 GB GPU in bf16.
Expected:  not measured here (no GPU or TPU); the training loss starts near the published
           model's loss on the corpus rather than near ln(vocab).
"""

import ml_collections

import gpt_bpe_stdlib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = gpt_bpe_stdlib.get_config(arg)
  c.data.path = 'runs/corpus'
  c.data.seq_len = 512
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.opt.lr, c.opt.warmup_steps = 3e-5, 50  # A small step: the weights are trained already.
  c.opt.weight_decay = 0.0
  c.train.steps = 1000
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 200, 200
  c.precision = 'bf16'
  if arg == 'smoke':  # GPT-2's architecture at a tiny size, trained from scratch.
    c.data.name, c.data.vocab_size = 'random_tokens', 300
    c.data.seq_len, c.data.batch_size, c.data.eval_batch_size = 32, 8, 8
    c.model.width, c.model.depth, c.model.heads, c.model.max_len = 32, 2, 4, 64
    c.model.pos, c.model.norm, c.model.bias, c.model.norm_eps = 'learned', 'layer', True, 1e-5
    c.model.vocab_size = 300
    c.opt.lr, c.opt.warmup_steps = 1e-3, 1
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = 5, 1, 5, 5
    c.precision = 'fp32'
  return c
