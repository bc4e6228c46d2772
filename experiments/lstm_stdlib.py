"""A byte-level LSTM language model on the Python standard library's source code.

Same data and metric as gpt_stdlib.py; `model.name=gru` swaps the cell.

Command:   jaxbig train experiments/lstm_stdlib.py [key=value ...]
           jaxbig generate WORKDIR --prompt "def " --tokens 200
Smoke:     jaxbig train experiments/lstm_stdlib.py:smoke   (a few steps, for tests)
Hardware:  any CPU; sized for 2 cores and 10 minutes.
Wall time: about 8 minutes on a 2-core CPU (491 s measured, 3 s of it compile).
Expected:  summary.json eval.bits_per_byte 2.08 on the held-out test files (val 2.20);
           predicting bytes by their training frequency gives 4.68.
"""

import ml_collections

import gpt_stdlib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'smoke'):
    raise ValueError(f"unknown variant '{arg}'; the only one is 'smoke'")
  c = gpt_stdlib.get_config(arg)  # The smoke variant shrinks data and steps alike.
  c.model = ml_collections.ConfigDict()
  c.model.name = 'lstm'  # lstm | gru.
  c.model.hidden = 256  # Units per layer.
  c.model.depth = 1  # Stacked layers.
  c.model.embed_dim = 64  # Byte embedding width (0: hidden).
  c.model.dropout = 0.0  # Dropout between layers and before the logits.
  c.model.bidirectional = False  # Must stay False for a language model.
  c.model.pool = 'last'  # Classifiers only: last | mean over time.
  c.model.tie_embeddings = False  # Logits from the embedding table (needs embed_dim = hidden).
  c.model.logits_chunk = 0  # Positions per logits chunk in the loss (0: whole logits).
  c.model.init = 'lecun'  # Kernel initialiser: normal | glorot | he | lecun.
  c.model.init_std = 0.02  # Standard deviation when init=normal.
  c.opt.lr = 3e-3
  c.opt.weight_decay = 0.0
  if arg == 'smoke':
    c.model.hidden, c.model.embed_dim = 32, 16
  else:
    c.train.steps = 2000  # Sized for 10 minutes on 2 cores.
  return c
