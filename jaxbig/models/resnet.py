"""ResNet v1.5 family in the style of the Flax ImageNet example.

Shape letters: B batch, H height, W width, C channels, K outputs (classes).
BatchNorm running statistics live in the 'batch_stats' collection: apply with
`mutable=['batch_stats']` when train=True.
"""

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxbig.kernels import winograd
from jaxbig.models import axes, init as inits

ModuleDef = Any


class ResNetBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the block output; H and W shrink by `strides`."""
    y = self.conv(self.filters, (3, 3), self.strides)(x_BxHxWxC)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero scale makes each block start as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=axes.logical(nn.initializers.zeros_init(), axes.NORM))(y)
    residual = x_BxHxWxC
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (4x) with a residual connection (ResNet-50 and up)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the block output with 4 * filters channels; H and W shrink by `strides`."""
    y = self.conv(self.filters, (1, 1))(x_BxHxWxC)
    y = nn.relu(self.norm()(y))
    # v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=axes.logical(nn.initializers.zeros_init(), axes.NORM))(y)
    residual = x_BxHxWxC
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    'basic': ResNetBlock,
    'bottleneck': BottleneckResNetBlock,
}


class ResNet(nn.Module):
  """Stem -> stages of residual blocks (stride 2 from the second stage) -> mean pool -> dense."""

  stage_sizes: Sequence[int]
  num_outputs: int
  block: str = 'basic'
  width: int = 64
  # True: 3x3 stride-1 stem and no max-pool, for 8x8 or 32x32 images.
  small_input: bool = False
  # 'winograd': float32 3x3 stride-1 convolutions as Winograd F(2x2, 3x3) where that applies
  # (kernels.conv, the CPU fast path); 'xla': always lax.conv_general_dilated.
  conv: str = 'xla'
  # Not `init`: that would shadow nn.Module.init.
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Under pmap: the axis over which BatchNorm averages its statistics (None under jit, where
  # the batch is one global array already).
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 logits_BxK."""
    if self.block not in _BLOCKS:
      raise ValueError(
          f"ResNet.block: unknown block '{self.block}'; choose from {', '.join(_BLOCKS)}")
    block_cls = _BLOCKS[self.block]
    conv = partial(
        nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        conv_general_dilated=winograd.conv_fn(self.conv, 'ResNet'),
        kernel_init=axes.logical(
            inits.initializer(self.init_name, self.init_std), axes.CONV_KERNEL))
    # dtype is only the output dtype: Flax computes the mean, variance and the
    # normalisation in float32 and keeps batch_stats in float32 (force_float32_reductions).
    norm = partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        axis_name=self.axis_name if train else None, dtype=self.dtype, param_dtype=self.param_dtype,
        scale_init=axes.logical(nn.initializers.ones_init(), axes.NORM),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.NORM))

    x = x_BxHxWxC.astype(self.dtype)
    stem = partial(conv, kernel_init=axes.logical(
        inits.initializer(self.init_name, self.init_std), axes.STEM_KERNEL))
    if self.small_input:
      x = stem(self.width, (3, 3), name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      x = stem(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = block_cls(self.width * 2**i, conv=conv, norm=norm, strides=strides)(x)
    x_BxC = jnp.mean(x, axis=(1, 2))
    logits_BxK = nn.Dense(
        self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(
            inits.initializer(self.init_name, self.init_std), axes.OUT_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.OUT_BIAS),
        name='head')(x_BxC)
    return logits_BxK.astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block='basic')
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block='basic')
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck')
# For tests and CPU smoke runs on 8x8 images.
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), block='basic', width=8, small_input=True)
