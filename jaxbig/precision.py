"""Precision as one config field, `precision`: the dtype models compute in and the matmul
precision the steps are traced with.

  fp32   float32 compute with matmul precision 'highest': honest float32 (on GPUs and TPUs
         JAX's default float32 matmul takes TF32 or bfloat16 passes).
  tf32   float32 compute with the default matmul precision (TF32 on Ampere and later
         GPUs, bfloat16 passes on TPUs; plain float32 on CPUs).
  bf16   bfloat16 compute with float32 parameters; the models keep logits, softmax,
         normalisation statistics and the loss in float32.

Parameters and optimizer state stay float32 in every policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxbig.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  compute_dtype: Any
  matmul_precision: str | None  # For `jax.default_matmul_precision`; None: JAX's default.


POLICIES = {
    'fp32': Policy('fp32', jnp.float32, 'highest'),
    'tf32': Policy('tf32', jnp.float32, None),
    'bf16': Policy('bf16', jnp.bfloat16, None),
}


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
