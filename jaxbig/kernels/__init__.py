"""The kernel policy: which implementation each fast path uses, chosen once per run.

`kernels=reference` is plain XLA and autodiff on every platform. `kernels=auto` takes the
paths measured faster on the platform the step is compiled for, and the reference
elsewhere. Setup picks the policy from the config and the mesh's devices and hands each
choice to the models as attributes; nothing reads the platform while tracing to decide
what to compute. Every fast path has a test against its reference:

| choice | fast path (auto) | where | what it bought, where measured | its test |
|---|---|---|---|---|
| conv | Winograd F(2, 3) for 3x3 convolutions (kernels/winograd.py) | CPU | the seed CNN's second layer, forward and gradients, 13.2 -> 9.1 ms (2-core Xeon; perf_cpu README) | tests/test_winograd.py |
| attention | heads-major attention (kernels/attention.py) | CPU | the small GPT's attention gradient in about 0.7x the time (docs/performance.md) | tests/test_transformer.py |
| rnn_grad | hand-written LSTM/GRU backward loop (kernels/rnn_scan.py `fused_scan`) | CPU | LSTM step -4%, GRU step -16% (2-core Xeon; benchmarks/results/cpu-xeon/perf_cpu/README.md) | tests/test_rnn.py |
| random_bits | Threefry's bits as straight-line code (kernels/threefry.py), bit-identical | CPU | CNN batch-256 step 15.99 -> 15.33 ms median (perf_cpu README) | tests/test_threefry.py |
| guard | non-finite guard as a branch (`lax.cond`) instead of a select | CPU | GPT step -2.5% (perf_cpu README) | tests/faults/test_fault_nonfinite.py |

On GPUs and TPUs `auto` is the reference for all of these today (none was measured there);
cuDNN attention is chosen by `model.attention`. The implementations live in this package's
modules, which the models import; this module imports none of them (the models import it).
"""

from __future__ import annotations

import dataclasses

from jaxbig.config import ConfigError

NAMES = ('auto', 'reference')


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One choice per fast path; each field's first value is the fast path."""
  name: str  # 'auto' or 'reference'.
  conv: str = 'xla'  # 'winograd' | 'xla'.
  attention: str = 'xla'  # 'heads_major' | 'xla'.
  rnn_grad: str = 'autodiff'  # 'fused' | 'autodiff'.
  random_bits: str = 'threefry'  # 'unrolled' | 'threefry' (the same bits).
  guard: str = 'select'  # 'branch' | 'select'.


REFERENCE = Kernels('reference')
# The fast paths measured on each platform (the others take the reference).
_AUTO = {
    'cpu': Kernels('auto', conv='winograd', attention='heads_major', rnn_grad='fused',
                   random_bits='unrolled', guard='branch'),
}


def select(name: str, platform: str, quantized: bool = False) -> Kernels:
  """The policy `name` for steps compiled for `platform` ('cpu', 'gpu', 'tpu'). Under
  `quantized` matmuls (Qwix: precision fp8/int8, `jaxbig quantize`) convolutions stay XLA's:
  Qwix quantizes `conv_general_dilated`, not the matmuls of a rewrite."""
  if name not in NAMES:
    raise ConfigError(f"kernels: unknown policy '{name}'; choose from {', '.join(NAMES)}")
  if name == 'reference':
    return REFERENCE
  chosen = _AUTO.get(platform, Kernels('auto'))
  return dataclasses.replace(chosen, conv='xla') if quantized else chosen
