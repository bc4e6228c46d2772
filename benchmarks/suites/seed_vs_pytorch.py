"""jaxbig against idiomatic PyTorch on the seed models, timed together.

    pip install 'jaxbig[compare]'
    jaxbig bench benchmarks/suites/seed_vs_pytorch.py --out benchmarks/results/<device>/vs_pytorch
    jaxbig report benchmarks/results/<device>/vs_pytorch

Each row trains the experiment's model with jaxbig and with the PyTorch reference of
`jaxbig/tools/bench/pytorch.py` (same shapes, loss, AdamW settings, clipping and schedule) on the
same batch, in alternating windows (SETTINGS rounds) so that drift of the machine hits both
alike. Rows: the seed CNN (digits, batch 64), the byte LSTM and GRU and the byte GPT
(stdlib, 32 windows of 128 bytes), in fp32 and bf16 against eager PyTorch, and in fp32
against `torch.compile` (its compile time is the row's PyTorch compile_s).
"""

SETTINGS = {'rounds': 4}


def rows() -> list[dict]:
  models = (('cnn', 'experiments/cnn_digits.py', []),
            ('lstm', 'experiments/lstm_stdlib.py', []),
            ('gru', 'experiments/lstm_stdlib.py', ['model.name=gru']),
            ('gpt', 'experiments/gpt_stdlib.py', []))
  out = []
  for model, path, overrides in models:
    row = {'experiment': path, 'overrides': overrides}
    out += [{**row, 'name': f'{model}-{p}', 'precision': p, 'pytorch': True}
            for p in ('fp32', 'bf16')]
    out.append({**row, 'name': f'{model}-fp32-compiled', 'precision': 'fp32',
                'pytorch': 'compile'})
  return out
