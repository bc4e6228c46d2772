"""jaxbig against idiomatic PyTorch on the seed models, timed together.

    pip install 'jaxbig[compare]'
    jaxbig bench benchmarks/suites/seed_vs_pytorch.py --out benchmarks/results/<device>-vs-pytorch
    jaxbig report benchmarks/results/<device>-vs-pytorch

Each row trains the experiment's model with jaxbig and with the PyTorch reference of
`jaxbig/bench/pytorch.py` (same shapes, loss, AdamW settings, clipping and schedule; eager
mode) on the same batch, in alternating windows (SETTINGS rounds) so that drift of the
machine hits both alike. Rows: the seed CNN (digits, batch 64), the byte LSTM and GRU and
the byte GPT (stdlib, 32 windows of 128 bytes), in fp32 and bf16.
"""

SETTINGS = {'rounds': 4}


def rows() -> list[dict]:
  models = (('cnn', 'experiments/cnn_digits.py', []),
            ('lstm', 'experiments/lstm_stdlib.py', []),
            ('gru', 'experiments/lstm_stdlib.py', ['model.name=gru']),
            ('gpt', 'experiments/gpt_stdlib.py', []))
  return [{'name': f'{model}-{p}', 'experiment': path, 'overrides': overrides, 'precision': p,
           'pytorch': True}
          for model, path, overrides in models for p in ('fp32', 'bf16')]
