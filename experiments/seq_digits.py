"""Sequence classifiers on sklearn's digits read row by row: 8 steps of 8 pixels.

The encoder Transformer (default) or a bidirectional LSTM/GRU (`:lstm`, `:gru`) classifies
each 8x8 image as a sequence of its rows: the same blocks and cells as the language models
of gpt_stdlib.py and lstm_stdlib.py, with a pooled classifier head.

Command:   jaxbig train experiments/seq_digits.py[:transformer|:lstm|:gru] [key=value ...]
Smoke:     jaxbig train experiments/seq_digits.py:gru,smoke   (a few steps, for tests)
Hardware:  any CPU.
Wall time: 15 s (transformer), 26 s (gru), 27 s (lstm) on a 2-core Intel Xeon VM.
Expected:  eval.accuracy 0.989 (transformer), 0.994 (gru), 0.992 (lstm) on the test split.
"""

import ml_collections

import cnn_digits


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  name, _, size = arg.partition(',')
  if name == 'smoke':
    name, size = '', 'smoke'
  name = name or 'transformer'
  if size not in ('', 'smoke'):
    raise ValueError(f"unknown size '{size}'; the only one is 'smoke'")
  c = cnn_digits.get_config(size)  # The smoke variant shrinks batches and steps alike.
  c.data.augment_shift = 0  # Shifting rows would blur the sequence positions.
  c.model = ml_collections.ConfigDict()
  c.model.name = name  # transformer | lstm | gru.
  c.model.dropout = 0.1  # Dropout (residual for the Transformer, between RNN layers).
  c.model.depth = 2  # Blocks or stacked RNN layers.
  c.model.init_std = 0.02  # Standard deviation of normal initialisers.
  if name == 'transformer':
    c.model.width = 64  # Residual stream width.
    c.model.heads = 4  # Attention heads.
    c.model.mlp_ratio = 4  # Feed-forward width as a multiple of width.
    c.model.max_len = 8  # Rows per image.
    c.model.pos = 'learned'  # rope | learned.
    c.model.attention = 'auto'  # xla | cudnn | auto.
    c.model.remat = 'none'  # Block activations recomputed in the backward pass (docs/models.md).
    c.model.scan_layers = False  # One block scanned over depth.
    c.model.tie_embeddings = False  # Unused by classifiers.
  elif name in ('lstm', 'gru'):
    c.model.hidden = 128  # Units per layer and direction.
    c.model.embed_dim = 0  # Unused: rows of pixels are the inputs.
    c.model.bidirectional = True  # A second stack reads the rows bottom-up.
    c.model.pool = 'mean'  # last | mean over time.
    c.model.tie_embeddings = False  # Unused by classifiers.
    c.model.init = 'lecun'  # Kernel initialiser: normal | glorot | he | lecun.
  else:
    raise ValueError(f"unknown variant '{arg}'; choose from transformer, lstm, gru (+ ',smoke')")
  c.opt.lr = 2e-3
  if not size:
    c.train.steps = 1000
  return c
