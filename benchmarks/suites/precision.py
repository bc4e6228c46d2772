"""The seed models at their experiment sizes in every precision: what each one costs here.

    jaxbig bench benchmarks/suites/precision.py --out benchmarks/results/<device>-precision
    jaxbig report benchmarks/results/<device>-precision

Rows: the seed CNN (digits, batch 64), the byte LSTM and the byte GPT (stdlib, 32 windows
of 128 bytes) in fp32, bf16, fp16 and int8, and fp8 where the device has fp8 matmuls (it
is skipped where it would be emulated: CPUs, GPUs before compute capability 8.9). tf32 is
fp32 on a CPU; on GPUs it gets rows too. The default window (10 s on GPUs) applies.
"""

MODELS = (('cnn', 'experiments/cnn_digits.py'), ('lstm', 'experiments/lstm_stdlib.py'),
          ('gpt', 'experiments/gpt_stdlib.py'))


def rows() -> list[dict]:
  import jax  # tf32 rows only where tf32 differs from fp32.
  gpu = jax.devices()[0].platform == 'gpu'
  precisions = ['fp32'] + ['tf32'] * gpu + ['bf16', 'fp16', 'int8', 'fp8']
  return [{'name': f'{model}-{p}', 'experiment': path, 'precision': p,
           'native_only': p == 'fp8'}
          for model, path in MODELS for p in precisions]
