"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3): `kernels.conv='winograd'`.

Reference: `lax.conv_general_dilated` (`conv='xla'`), matched up to float32 rounding, forward
and gradients (tests/test_winograd.py). Buys on CPUs: the seed CNN's second layer, forward
and gradients, 13.2 -> 9.1 ms on the 2-core Xeon VM, for about a second more compile per layer
(benchmarks/results/cpu-xeon/perf_cpu/README.md, "Winograd convolutions").

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (Flax's `nn.Conv` takes
it as its `conv_general_dilated` attribute). For a float32 3x3 kernel at stride 1 with one
pixel of zero padding, no dilation and no groups, on even heights and widths and at least
`MIN_CHANNELS` input channels, it computes the convolution as Lavin and Gray's F(2x2, 3x3):
each 2x2 block of outputs comes from a 4x4 tile of inputs, and the 9 taps become 16
independent (tiles, C) x (C, O) matmuls, 2.25x fewer multiplications. The transforms are
adds and halvings, so float32 results differ from XLA's convolution by rounding only. Every
other convolution goes to `lax.conv_general_dilated` unchanged, bfloat16 and float16 ones
included (so the bf16, fp16, fp8 and int8 policies keep XLA's convolution, which qwix
quantizes).

Shape letters: B batch, H height, W width, C input channels, O output channels, P the 16
transformed positions, T tiles (B H/2 W/2).
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

MIN_CHANNELS = 8  # Below this the 16 matmuls are too thin to beat XLA's convolution.
GROUPS = 2  # The 16 matmuls as 2 batched products: XLA:CPU runs each on one thread, both at once.


def _input_rows(d0, d1, d2, d3):
  """B^T of F(2, 3) applied to the four input rows of a tile."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _kernel_rows(g0, g1, g2):
  """G of F(2, 3) applied to the three taps of a kernel row."""
  return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2


def _output_rows(m0, m1, m2, m3):
  """A^T of F(2, 3): two outputs from four transformed ones."""
  return m0 + m1 + m2, m1 - m2 - m3


def _tiles(x, axis: int):
  """The four overlapping stride-2 rows (along `axis`) of every tile of a padded input."""
  n = x.shape[axis] - 2
  split = lambda y: [lax.index_in_dim(y, i, axis + 1, keepdims=False) for i in (0, 1)]
  pairs = lambda y: split(y.reshape(y.shape[:axis] + (n // 2, 2) + y.shape[axis + 1:]))
  return (*pairs(lax.slice_in_dim(x, 0, n, axis=axis)),
          *pairs(lax.slice_in_dim(x, 2, n + 2, axis=axis)))


def winograd_conv(x_BxHxWxC: jax.Array, kernel_3x3xCxO: jax.Array,
                  precision: Any = None) -> jax.Array:
  """`conv(x, kernel)` at stride 1 with SAME padding for even H and W, as F(2x2, 3x3)."""
  b, h, w, c = x_BxHxWxC.shape
  o = kernel_3x3xCxO.shape[-1]
  x = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  v = [v for rows in _input_rows(*_tiles(x, 1)) for v in _input_rows(*_tiles(rows, 2))]
  v_PxTxC = jnp.stack(v).reshape(16, b * (h // 2) * (w // 2), c)
  u = [u for row in _kernel_rows(*kernel_3x3xCxO) for u in _kernel_rows(*row)]
  u_PxCxO = jnp.stack(u)
  per = 16 // GROUPS
  m = [m for i in range(0, 16, per)
       for m in jnp.einsum('ptc,pco->pto', v_PxTxC[i:i + per], u_PxCxO[i:i + per],
                           precision=precision)]
  m = [mi.reshape(b, h // 2, w // 2, o) for mi in m]
  by_col = [_output_rows(*m[4 * k:4 * k + 4]) for k in range(4)]  # [row k][column a]
  y = [_output_rows(*(by_col[k][a] for k in range(4))) for a in range(2)]  # [column a][row r]
  # (B, H/2, row r in the tile, W/2, column a, O): the output's rows and columns, in order.
  y_tiles = jnp.stack([jnp.stack([y[a][r] for a in range(2)], axis=3) for r in range(2)],
                      axis=2)
  return y_tiles.reshape(b, h, w, o)


IMPLS = ('winograd', 'xla')  # The `conv` attribute of the CNN and the ResNet (kernels.conv).


def conv_fn(impl: str, owner: str):
  """Flax's `conv_general_dilated` for a model's `conv` attribute (None: lax's own)."""
  if impl not in IMPLS:
    raise ValueError(f"{owner}.conv: unknown '{impl}'; choose from {', '.join(IMPLS)}")
  return conv_general_dilated if impl == 'winograd' else None


def applies(x_shape, kernel_shape, dtype, strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count) -> bool:
  """Whether `conv_general_dilated` with these arguments takes the Winograd path."""
  if len(x_shape) != 4 or tuple(kernel_shape[:2]) != (3, 3) or dtype != jnp.float32:
    return False
  nhwc = lax.conv_dimension_numbers(x_shape, kernel_shape, ('NHWC', 'HWIO', 'NHWC'))
  if lax.conv_dimension_numbers(x_shape, kernel_shape, dimension_numbers) != nhwc:
    return False
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x_shape[1:3], (3, 3), (1, 1), padding)
  ones = (1, 1)
  return (tuple(strides) == ones and tuple(map(tuple, padding)) == (ones, ones)
          and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
          and feature_group_count == 1 and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0
          and x_shape[3] >= MIN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated`, through `winograd_conv` where that applies."""
  dtype = jnp.result_type(lhs, rhs)
  if not kwargs and applies(lhs.shape, rhs.shape, dtype, window_strides, padding,
                            lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count):
    return winograd_conv(lhs, rhs, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)
