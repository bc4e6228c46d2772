"""Softmax attention as batched matmuls over (B, H): `kernels.attention='heads_major'`.

Reference: `jax.nn.dot_product_attention`'s XLA path (`attention='xla'` in
models/transformer.py), the same function: float32 logits and softmax, probabilities cast to
the value dtype; tests/test_transformer.py compares the two, forward and gradients. Buys on
CPUs: the small GPT's attention gradient in about 0.7x the time (XLA:CPU; docs/performance.md).

Queries, keys and values are moved heads-major first, so that both matmuls batch over their
leading axes.

Shape letters: B batch, L queries, S keys, H heads, D features per head.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp


def heads_major_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                          causal: bool,
                          rotate: Callable[[jax.Array], jax.Array] | None = None,
                          mask_Bx1xLxS: jax.Array | None = None) -> jax.Array:
  """out_BxLxHxD; `rotate` (RoPE, heads-major) is applied to queries and keys after the move;
  `mask_Bx1xLxS` (True = attend) applies beside the causal rule."""
  q_BxHxLxD, k_BxHxSxD, v_BxHxSxD = (t.transpose(0, 2, 1, 3)
                                     for t in (q_BxLxHxD, k_BxSxHxD, v_BxSxHxD))
  if rotate is not None:
    q_BxHxLxD, k_BxHxSxD = rotate(q_BxHxLxD), rotate(k_BxHxSxD)
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  logits_BxHxLxS = jnp.einsum('bhld,bhsd->bhls', q_BxHxLxD, k_BxHxSxD,
                              preferred_element_type=jnp.float32) * scale
  mask = mask_Bx1xLxS
  if causal:
    length, keys = q_BxLxHxD.shape[1], k_BxSxHxD.shape[1]
    mask_1x1xLxS = (jnp.arange(keys)[None, :] <= jnp.arange(length)[:, None])[None, None]
    mask = mask_1x1xLxS if mask is None else mask & mask_1x1xLxS
  if mask is not None:
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, jnp.finfo(jnp.float32).min)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(v_BxSxHxD.dtype)
  out_BxHxLxD = jnp.einsum('bhls,bhsd->bhld', probs_BxHxLxS, v_BxHxSxD)
  return out_BxHxLxD.transpose(0, 2, 1, 3)
