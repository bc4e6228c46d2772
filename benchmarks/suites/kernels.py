"""Each model's train step under both kernel policies (jaxbig/kernels): `auto`, the fast
paths measured on this platform, against `reference`, plain XLA and autodiff.

    jaxbig bench benchmarks/suites/kernels.py --out benchmarks/results/<device>/kernels
    jaxbig report benchmarks/results/<device>/kernels

Rows: the seed CNN on digits at batch 64 and 256 (Winograd convolutions, the guard's
branch, unrolled dropout bits), the byte LSTM and GRU (the fused backward loop), the small
byte GPT (heads-major attention), at perf_cpu.py's shapes, fp32. On a GPU or TPU the two
rows of a model compile the same program (no fast path is measured there, so auto is the
reference).
"""

SETTINGS = {'rounds': 1}


def rows() -> list[dict]:
  gpt = ['model.width=256', 'model.depth=4', 'model.heads=4']
  models = [('cnn-b64', 'experiments/cnn_digits.py', 64, []),
            ('cnn-b256', 'experiments/cnn_digits.py', 256, []),
            ('lstm', 'experiments/lstm_stdlib.py', 32, []),
            ('gru', 'experiments/lstm_stdlib.py', 32, ['model.name=gru']),
            ('gpt', 'experiments/gpt_stdlib.py', 16, gpt)]
  return [{'name': f'{name}-{policy}', 'experiment': path, 'batch': batch,
           'overrides': overrides + [f'kernels={policy}'], 'precision': 'fp32'}
          for name, path, batch, overrides in models for policy in ('auto', 'reference')]
