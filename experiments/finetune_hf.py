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

Hardware:  the imported model's: GPT-2 small (124M) fine-tunes on one 24 GB GPU in bf16.
Expected:  not measured here (no GPU or TPU); the training loss starts near the published
           model's loss on the corpus rather than near ln(vocab).
"""

import ml_collections

import gpt_bpe_stdlib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown variant '{arg}'; there is none")
  c = gpt_bpe_stdlib.get_config()
  c.data.path = 'runs/corpus'
  c.data.seq_len = 512
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.opt.lr, c.opt.warmup_steps = 3e-5, 50  # A small step: the weights are trained already.
  c.opt.weight_decay = 0.0
  c.train.steps = 1000
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, 200, 200
  c.precision = 'bf16'
  return c
