"""Precision as one config field, `precision`: the dtype models compute in, the matmul
precision the steps are traced with, low-precision matmuls, and loss scaling.

  fp32   float32 compute with matmul precision 'highest': honest float32 (on GPUs and TPUs
         JAX's default float32 matmul takes TF32 or bfloat16 passes).
  tf32   float32 compute with the default matmul precision (TF32 on Ampere and later
         GPUs, bfloat16 passes on TPUs; plain float32 on CPUs).
  bf16   bfloat16 compute with float32 parameters; the models keep logits, softmax,
         normalisation statistics and the loss in float32.
  fp16   as bf16 with float16, plus loss scaling (`loss_scale.*`; dynamic by default): a
         step whose gradients overflow is skipped and counted in the metrics.
  fp8    bf16 plus fp8 matmuls and convolutions (Qwix quantised training with current
         scaling: e4m3 operands in the forward pass, e5m2 gradients in the backward pass).
         Emulated where the hardware has no fp8 (CPUs, GPUs before Hopper).
  int8   bf16 plus int8 matmuls and convolutions in the forward pass (Qwix quantised
         training, QAT style: per-channel weight scales, per-example activation scales,
         straight-through gradients in bfloat16).

Parameters and optimizer state stay float32 in every policy. Qwix intercepts the model's
`dot_general`, `einsum` and `conv_general_dilated` calls, so the parameter tree is the
same in every policy: a run can be fine-tuned or evaluated in another precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxbig.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  compute_dtype: Any
  matmul_precision: str | None  # For `jax.default_matmul_precision`; None: JAX's default.
  loss_scaling: bool = False  # Needs loss scaling (float16's narrow exponent range).
  fwd_qtype: str | None = None  # Operand type of the forward matmuls (Qwix quantised training).
  bwd_qtype: str | None = None  # Operand type of the gradient matmuls.


POLICIES = {
    'fp32': Policy('fp32', jnp.float32, 'highest'),
    'tf32': Policy('tf32', jnp.float32, None),
    'bf16': Policy('bf16', jnp.bfloat16, None),
    'fp16': Policy('fp16', jnp.float16, None, loss_scaling=True),
    'fp8': Policy('fp8', jnp.bfloat16, None, fwd_qtype='float8_e4m3fn', bwd_qtype='float8_e5m2'),
    'int8': Policy('int8', jnp.bfloat16, None, fwd_qtype='int8'),
}
LOSS_SCALE_MODES = ('auto', 'dynamic', 'static', 'none')


def get(config) -> Policy:
  """The policy named by `config.precision` (fp32 for configs saved before the field)."""
  name = config.get('precision', 'fp32')
  if name not in POLICIES:
    raise ConfigError(f"precision: unknown precision '{name}'; choose from "
                      f"{', '.join(POLICIES)}")
  return POLICIES[name]


@contextlib.contextmanager
def tracing(policy: Policy):
  """The context to trace a step in: the policy's default matmul precision."""
  if policy.matmul_precision is None:
    yield
  else:
    with jax.default_matmul_precision(policy.matmul_precision):
      yield


def quantize(model: nn.Module, policy: Policy) -> nn.Module:
  """The model with the policy's low-precision matmuls (the model itself if it has none).
  Its convolutions must be XLA's (`kernels.select(..., quantized=True)`): Qwix quantizes
  `conv_general_dilated`, not the matmuls of a rewrite."""
  if policy.fwd_qtype is None:
    return model
  if getattr(model, 'conv', 'xla') != 'xla':
    raise ValueError(f'precision={policy.name} needs conv=xla, got {model.conv}')
  import qwix  # Only the fp8 and int8 policies need it.
  fwd = dict(weight_qtype=policy.fwd_qtype, act_qtype=policy.fwd_qtype)
  rules = [  # The first rule that matches an op applies.
      # XLA's convolution takes one operand type: e5m2 gradients cannot meet e4m3 operands.
      qwix.QtRule(op_names=('conv_general_dilated',), **fwd),
      qwix.QtRule(bwd_qtype=policy.bwd_qtype, **fwd),
  ]
  return qwix.quantize_model(model, qwix.QtProvider(rules))


def emulated(policy: Policy, device: jax.Device) -> bool:
  """Whether the device runs the policy's low-precision matmuls by upcasting them."""
  if policy.fwd_qtype is None or not policy.fwd_qtype.startswith('float8'):
    return False
  if device.platform != 'gpu':
    return True  # XLA:CPU upcasts; on TPUs not measured, so not claimed.
  return float(getattr(device, 'compute_capability', '0')) < 8.9  # Ada and Hopper have fp8.


@struct.dataclass
class LossScale:
  """The loss scale of a run, checkpointed with the state."""
  scale: jax.Array  # float32: the loss is multiplied by it before differentiation.
  good_steps: jax.Array  # int32: finite steps since the scale last changed.
  skipped: jax.Array  # int32: steps skipped so far because their gradients were not finite.


@dataclasses.dataclass(frozen=True)
class LossScaling:
  """Dynamic (or static) loss scaling: scale the loss, unscale the gradients, skip on overflow.

  Dynamic: on a step whose gradients are not finite the scale is divided by `factor` (never
  below 1); after `growth_interval` finite steps in a row it is multiplied by `factor` (never
  above `max`). Static keeps `init`. Either way a non-finite step updates nothing.
  """
  dynamic: bool
  init: float
  growth_interval: int
  factor: float
  max: float

  def init_state(self) -> LossScale:
    return LossScale(scale=jnp.asarray(self.init, jnp.float32),
                     good_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))

  def update(self, ls: LossScale, finite: jax.Array) -> LossScale:
    if not self.dynamic:
      return ls.replace(skipped=ls.skipped + (~finite).astype(jnp.int32))
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = good >= self.growth_interval
    scale = jnp.where(finite, jnp.where(grow, jnp.minimum(ls.scale * self.factor, self.max),
                                        ls.scale),
                      jnp.maximum(ls.scale / self.factor, 1.0))
    return LossScale(scale=scale, good_steps=jnp.where(grow, 0, good),
                     skipped=ls.skipped + (~finite).astype(jnp.int32))


def loss_scaling(config, policy: Policy) -> LossScaling | None:
  """The run's loss scaling from `loss_scale.*` (None: none); raises ConfigError on bad values."""
  cfg = config.get('loss_scale')
  mode = cfg.mode if cfg is not None else 'auto'
  if mode not in LOSS_SCALE_MODES:
    raise ConfigError(f"loss_scale.mode: unknown mode '{mode}'; choose from "
                      f"{', '.join(LOSS_SCALE_MODES)}")
  if mode == 'none' and policy.loss_scaling:
    raise ConfigError(f'loss_scale.mode=none: precision={policy.name} needs loss scaling '
                      '(small float16 gradients flush to zero); use auto, dynamic or static')
  if mode == 'none' or (mode == 'auto' and not policy.loss_scaling):
    return None
  if not cfg.init >= 1:
    raise ConfigError(f'loss_scale.init={cfg.init}: must be at least 1')
  if not cfg.factor > 1:
    raise ConfigError(f'loss_scale.factor={cfg.factor}: must be above 1')
  if not cfg.max >= cfg.init:
    raise ConfigError(f'loss_scale.max={cfg.max}: must be at least loss_scale.init={cfg.init}')
  if cfg.growth_interval < 1:
    raise ConfigError(f'loss_scale.growth_interval={cfg.growth_interval}: must be at least 1')
  return LossScaling(dynamic=mode != 'static', init=float(cfg.init),
                     growth_interval=int(cfg.growth_interval), factor=float(cfg.factor),
                     max=float(cfg.max))


def all_finite(tree) -> jax.Array:
  """Whether every element of every leaf is finite (one boolean)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)
