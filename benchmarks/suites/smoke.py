"""A tiny suite: one row per model family and per precision, in under a minute on a CPU.

    jaxbig bench benchmarks/suites/smoke.py --out runs/bench/smoke

For checking the harness (the CI test runs it), not for numbers worth keeping: the models
are the experiments' smoke sizes and the windows are half a second.
"""

SETTINGS = {'min_steps': 5, 'min_seconds': 0.5, 'warmup_max': 8}


def rows() -> list[dict]:
  out = [
      {'name': 'cnn-fp32', 'experiment': 'experiments/cnn_digits.py:smoke'},
      {'name': 'mlp-fp32', 'experiment': 'experiments/mlp_diabetes.py:smoke'},
      {'name': 'gpt-fp32', 'experiment': 'experiments/gpt_stdlib.py:smoke'},
      {'name': 'lstm-fp32', 'experiment': 'experiments/lstm_stdlib.py:smoke'},
  ]
  for p in ('bf16', 'fp16', 'fp8', 'int8'):
    out.append({'name': f'cnn-{p}', 'experiment': 'experiments/cnn_digits.py:smoke',
                'precision': p})
  return out
