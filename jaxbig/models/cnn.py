"""The seed CNN: conv stages with ReLU and max-pool, then a two-layer dense head.

Shape letters: B batch, H height, W width, C channels, F flattened features,
N hidden units, K outputs (classes).
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxbig.kernels import winograd
from jaxbig.models import axes, init as inits


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2, SAME padding: odd sizes keep their last row (7 -> 4).

  `nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')` as a reshape and element-wise
  maxima: its gradient is then selects instead of XLA's select-and-scatter, which XLA:CPU
  runs slowly. Ties share the gradient where select-and-scatter gives it to one element;
  after a ReLU the only likely ties are zeros, whose gradient the ReLU stops anyway.
  """
  _, h, w, _ = x_BxHxWxC.shape
  if h % 2 or w % 2:
    x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)),
                        constant_values=-jnp.inf)
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)
  # Pairwise maxima: a max-reduction's gradient would count the ties with a costly sum.
  return jnp.maximum(jnp.maximum(x[:, :, 0, :, 0], x[:, :, 0, :, 1]),
                     jnp.maximum(x[:, :, 1, :, 0], x[:, :, 1, :, 1]))


class CNN(nn.Module):
  """conv 3x3 -> ReLU -> max-pool 2x2 (computed as pool, then ReLU), per entry of `features`;
  dense -> ReLU -> dense."""

  num_outputs: int
  features: tuple[int, ...] = (64, 128)
  hidden: int = 1024
  dropout: float = 0.0
  # 'winograd': float32 3x3 convolutions as Winograd F(2x2, 3x3) where that applies
  # (kernels.conv, the CPU fast path); 'xla': always lax.conv_general_dilated.
  conv: str = 'xla'
  # Not `init`: that would shadow nn.Module.init.
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 logits_BxK."""
    kernel_init = inits.initializer(self.init_name, self.init_std)
    zeros = nn.initializers.zeros_init()
    x = x_BxHxWxC.astype(self.dtype)
    conv_fn = winograd.conv_fn(self.conv, 'CNN')
    for i, width in enumerate(self.features):
      names = axes.STEM_KERNEL if i == 0 else axes.CONV_KERNEL
      x = nn.Conv(
          width, (3, 3), padding='SAME', dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=axes.logical(kernel_init, names),
          bias_init=axes.logical(zeros, axes.CONV_BIAS), conv_general_dilated=conv_fn,
          name=f'conv{i}')(x)
      # Pool, then ReLU: the same function as ReLU then pool (both are monotone), on a
      # quarter of the elements.
      x = axes.constrain(nn.relu(max_pool_2x2(x)), axes.ACT_BxHxWxC)
    x_BxF = axes.constrain(x.reshape(x.shape[0], -1), ('batch', None))
    x_BxN = nn.Dense(
        self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(kernel_init, axes.DENSE_KERNEL),
        bias_init=axes.logical(zeros, axes.DENSE_BIAS), name='hidden')(x_BxF)
    x_BxN = axes.constrain(nn.relu(x_BxN), axes.ACT_BxN)
    x_BxN = nn.Dropout(self.dropout, deterministic=not train)(x_BxN)
    logits_BxK = nn.Dense(
        self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(kernel_init, axes.OUT_KERNEL),
        bias_init=axes.logical(zeros, axes.OUT_BIAS), name='out')(x_BxN)
    return logits_BxK.astype(jnp.float32)
