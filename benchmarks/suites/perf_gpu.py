"""Issue 7's GPU targets, for one NVIDIA H100/H200, in one command (not yet run on a GPU).

    jaxbig bench benchmarks/suites/perf_gpu.py --out benchmarks/results/<device>/perf_gpu
    jaxbig report benchmarks/results/<device>/perf_gpu

Rows and the target each one measures:
- gpt350m-bf16: a byte-level decoder of 352M parameters (width 1024, 28 blocks of 16 heads,
  MLP 4x) at sequence 2048, batch 8, bf16, cuDNN attention. Target: MFU >= 0.55 of the
  dense bf16 peak. With `loop`: the training loop's host overhead, target < 2% of the step.
- gpt-d2048-bf16, gpt-d2048-fp8: width 2048, 8 blocks (403M parameters), sequence 2048,
  batch 8. Target: fp8 tokens/s >= 1.3x bf16's. The fp8 row is skipped where fp8 matmuls
  would be emulated (before compute capability 8.9).
- gpt350m-bf16-auto: the first row with `model.attention=auto` (issue 27): it should take
  cuDNN's attention by itself and be as fast as the row that names it.
- resnet50-bf16: ResNet-50 on synthetic 224 x 224 x 3 images, 1000 classes, batch 256, bf16:
  images/s (samples_per_s), reported, no target.

The GPT rows read the Python standard library's source as bytes (data.name=stdlib), so
the machine needs nothing but this checkout and the packages. Windows are 3 s (the NVML
energy counter needs seconds).
"""

SETTINGS = {'min_seconds': 3.0, 'min_steps': 10, 'warmup_max': 30}

_GPT = ['data.seq_len=2048', 'model.max_len=2048', 'model.attention=cudnn', 'model.heads=16']


def rows() -> list[dict]:
  gpt350m = _GPT + ['model.width=1024', 'model.depth=28']
  d2048 = _GPT + ['model.width=2048', 'model.depth=8']
  resnet50 = ['model.name=resnet50', 'model.small_input=False', 'model.width=64',
              'data.name=synthetic', 'data.shape=(224, 224, 3)', 'data.num_classes=1000',
              'data.size=1024', 'data.augment_shift=0', 'data.eval_batch_size=256']
  return [
      {'name': 'gpt350m-bf16', 'experiment': 'experiments/gpt_stdlib.py', 'batch': 8,
       'overrides': gpt350m, 'precision': 'bf16', 'loop': 60},
      {'name': 'gpt350m-bf16-auto', 'experiment': 'experiments/gpt_stdlib.py', 'batch': 8,
       'overrides': gpt350m + ['model.attention=auto'], 'precision': 'bf16'},
      {'name': 'gpt-d2048-bf16', 'experiment': 'experiments/gpt_stdlib.py', 'batch': 8,
       'overrides': d2048, 'precision': 'bf16'},
      {'name': 'gpt-d2048-fp8', 'experiment': 'experiments/gpt_stdlib.py', 'batch': 8,
       'overrides': d2048, 'precision': 'fp8', 'native_only': True},
      {'name': 'resnet50-bf16', 'experiment': 'experiments/resnet_digits.py', 'batch': 256,
       'overrides': resnet50, 'precision': 'bf16'},
  ]
