"""gpt_stdlib's model on BPE tokens: the standard library tokenized once into shards.

Same files, splits (by a hash of each path) and metric (test bits per byte) as
gpt_stdlib.py, so the two compare on one scale; a 4096-token byte-level BPE learnt from the
training split only. Prepare once (STDLIB is this Python's standard library folder,
`python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"`):

  jaxbig tokenizer train STDLIB --pattern '*.py' --vocab 4096 --out runs/stdlib-bpe.json
  jaxbig prepare text STDLIB --pattern '*.py' --tokenizer runs/stdlib-bpe.json \\
      --out runs/stdlib-bpe

Command:   jaxbig train experiments/gpt_bpe_stdlib.py data.path=runs/stdlib-bpe [key=value ...]
           jaxbig generate WORKDIR --prompt "def " --tokens 100
Smoke:     jaxbig train experiments/gpt_bpe_stdlib.py:smoke data.path=DIR (any prepared DIR)
Hardware:  any CPU; sized like gpt_stdlib for 2 cores and 10 minutes.
Wall time: about 3.5 minutes on a 2-core CPU (204 s measured on an AMD EPYC VM, 3.9 s of
           it compile; preparing: 8 s for the tokenizer, 14 s for the shards).
Expected:  summary.json eval.bits_per_byte 1.73 on the held-out test files (val 1.81), below
           gpt_stdlib's 2.03 in less time (gpt_stdlib: 368 s on the same VM).
"""

import ml_collections

import gpt_stdlib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = gpt_stdlib.get_config(arg)  # The smoke variant shrinks the model and steps alike.
  c.data = ml_collections.ConfigDict()
  c.data.name = 'tokens'  # Shards made by `jaxbig prepare text`.
  c.data.path = 'runs/stdlib-bpe'  # The prepared folder.
  c.data.tokenizer = ''  # '' : the tokenizer copied into data.path; a path must be the same.
  c.data.verify_shards = False  # Check every shard's SHA-256 at the start (reads them all).
  c.data.vocab_size = 0  # data.name=random_tokens (plans, benchmarks): its vocabulary.
  c.data.pack = False  # True: attention stops at end-of-document tokens; positions restart.
  c.data.seq_len = 32 if arg == 'smoke' else 64  # Tokens per window (~2.5 bytes each).
  c.data.batch_size = 8 if arg == 'smoke' else 32  # Windows per step.
  c.data.eval_batch_size = 16 if arg == 'smoke' else 64  # Windows per evaluation batch.
  c.data.eval_windows = 32 if arg == 'smoke' else 512  # Windows per evaluation, spread evenly.
  c.model.max_len = 64 if arg == 'smoke' else 128  # Positions (and the KV cache).
  c.model.logits_chunk = 0  # Positions per logits chunk in the loss (0: whole logits).
  return c
