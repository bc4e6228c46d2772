"""Issue 7's CPU targets: jaxbig against eager PyTorch at the issue's shapes, timed together.

    pip install 'jaxbig[compare]'
    jaxbig bench benchmarks/suites/perf_cpu.py --out benchmarks/results/<device>/perf_cpu
    jaxbig report benchmarks/results/<device>/perf_cpu

Rows (fp32, AdamW, each with its eager PyTorch reference in alternating windows): the seed
CNN on digits at batch 64 and 256; the byte LSTM (batch 32 x 128 bytes, 256 units, Adam:
weight decay 0); the small byte GPT (batch 16 x 128 bytes, width 256, 4 blocks of 4 heads).
The target: jaxbig's step time at most 0.8x PyTorch's, and the GPT's MFU at least 60% of
the float32 matmul rate measured in the same run. Each row also runs jaxbig's training
loop (`loop` steps) for its host overhead.
"""

SETTINGS = {'rounds': 6}


def rows() -> list[dict]:
  gpt = ['model.width=256', 'model.depth=4', 'model.heads=4']
  models = [('cnn-b64', 'experiments/cnn_digits.py', 64, [], 300),
            ('cnn-b256', 'experiments/cnn_digits.py', 256, [], 100),
            ('lstm', 'experiments/lstm_stdlib.py', 32, [], 60),
            ('gpt', 'experiments/gpt_stdlib.py', 16, gpt, 40)]
  return [{'name': name, 'experiment': path, 'batch': batch, 'overrides': overrides,
           'precision': 'fp32', 'pytorch': True, 'loop': loop}
          for name, path, batch, overrides, loop in models]
