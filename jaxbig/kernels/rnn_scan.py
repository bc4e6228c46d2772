"""The LSTM/GRU time loop: `scan`, and `fused_scan` with a hand-written backward loop
(`kernels.rnn_grad='fused'`).

Reference: autodiff of `scan`; tests/test_rnn.py compares outputs and every gradient, both
cells and directions, float32 and bfloat16. Buys on CPUs: the LSTM's train step -4%, the
GRU's -16% on the 2-core Xeon VM (benchmarks/results/cpu-xeon/perf_cpu/README.md).

Both loops step a layer with the cell's math, `gates(cell, params, carry, zx_BxGxN, dtype)
-> (new carry, saved)` (models/rnn.py `cell_gates`), where `saved` holds float32 (B, N)
arrays: the LSTM's gates i, f, g, o and its c; the GRU's r, u, n and hn (h W_hn + b_hn).
`_fused_bwd` differentiates exactly that math.

Autodiff of the scan computes and accumulates the recurrent kernel's gradient inside the
backward loop: two small matmuls per step plus an (N, G, N) accumulator that XLA:CPU copies
every step. `fused_scan`'s backward loop computes only the gate gradients dz_t and the
carried dh (one matmul per step); the kernel's gradient is then one large matmul over all
steps, sum_t h_{t-1}^T dz_t, as fused RNN kernels (cuDNN, oneDNN) do it.

Shape letters: L time steps, B batch, G gates (4 LSTM, 3 GRU), N hidden units.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxbig import matmul

UNROLL = 4  # Time steps per iteration of the forward loops (the backward loop: one).

Gates = Callable[..., tuple[dict, tuple]]


def scan(gates: Gates, cell: str, dtype: Any, reverse: bool, params: dict, carry: dict,
         zx_LxBxGxN: jax.Array) -> tuple[dict, jax.Array]:
  """The layer's steps over time: (final carry, float32 h_LxBxN)."""
  def body(c, zx_BxGxN):
    new, _ = gates(cell, params, c, zx_BxGxN, dtype)
    return new, new['h']

  return jax.lax.scan(body, carry, zx_LxBxGxN, reverse=reverse, unroll=UNROLL)


def _shift(first_BxN: jax.Array, seq_LxBxN: jax.Array, reverse: bool) -> jax.Array:
  """The value before each step: first_BxN, then seq_LxBxN less its last (reverse: first)."""
  if reverse:
    return jnp.concatenate([seq_LxBxN[1:], first_BxN[None]], axis=0)
  return jnp.concatenate([first_BxN[None], seq_LxBxN[:-1]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def fused_scan(gates: Gates, cell: str, dtype: Any, reverse: bool, params: dict, carry: dict,
               zx_LxBxGxN: jax.Array) -> tuple[dict, jax.Array]:
  """`scan` with the hand-written gradient `_fused_bwd`."""
  return scan(gates, cell, dtype, reverse, params, carry, zx_LxBxGxN)


def _fused_fwd(gates, cell, dtype, reverse, params, carry, zx_LxBxGxN):
  def body(c, zx_BxGxN):
    new, saved = gates(cell, params, c, zx_BxGxN, dtype)
    return new, (new['h'], saved)

  final, (h_LxBxN, saved_LxBxN) = jax.lax.scan(body, carry, zx_LxBxGxN, reverse=reverse,
                                               unroll=UNROLL)
  # An empty array carries zx's dtype (residuals must be arrays).
  residuals = (params, carry, jnp.zeros((0,), zx_LxBxGxN.dtype), h_LxBxN, saved_LxBxN)
  return (final, h_LxBxN), residuals


def _fused_bwd(gates, cell, dtype, reverse, residuals, cotangents):
  """The backward loop: per step only the gate gradients dz_t and dh_{t-1} = dz_t W^T.

  Each gate's dz is its own (B, N) array until one concatenation gives the (B, G N) matmul
  input: XLA:CPU reads slices of a (B, G, N) block, and writes a stacked one, slowly. Not
  unrolled: unrolled copies recompute the carried dc.
  """
  del gates  # Its derivative is written out below, per cell.
  params, carry, zx_0, h_LxBxN, saved_LxBxN = residuals
  d_final, dy_LxBxN = cotangents
  n = h_LxBxN.shape[-1]
  # Transposed once, outside the loop: dh_{t-1} = dz_t W^T is then a plain matmul.
  w_GNxN = params['recurrent_kernel'].astype(dtype).reshape(n, -1).T
  back = lambda dz_BxGN: jnp.dot(dz_BxGN.astype(dtype), w_GNxN,
                                 preferred_element_type=jnp.float32)
  h_prev_LxBxN = _shift(carry['h'], h_LxBxN, reverse)
  if cell == 'lstm':
    c_LxBxN = saved_LxBxN[4]
    c_prev_LxBxN = _shift(carry['c'], c_LxBxN, reverse)

    def body(d, inputs):
      dy, (i, f, g, o, c), c_prev = inputs
      dh = dy + d['h']
      tanh_c = jnp.tanh(c)
      dc = d['c'] + dh * o * (1.0 - tanh_c * tanh_c)
      # d act / dz: a (1 - a) for the sigmoids, 1 - a^2 for the tanh.
      dz_BxGN = jnp.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                                 dc * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o)], axis=1)
      return {'c': dc * f, 'h': back(dz_BxGN)}, dz_BxGN

    inputs = (dy_LxBxN, saved_LxBxN, c_prev_LxBxN)
  else:
    def body(d, inputs):
      dy, (r, u, cand, hn), h_prev = inputs  # cand: the candidate n.
      dh = dy + d['h']
      da = dh * (1.0 - u) * (1.0 - cand * cand)  # Through n's tanh.
      dzr = da * hn * r * (1.0 - r)
      dzu = dh * (h_prev - cand) * u * (1.0 - u)
      dzh_BxGN = jnp.concatenate([dzr, dzu, da * r], axis=1)
      return {'h': dh * u + back(dzh_BxGN)}, (dzh_BxGN, jnp.concatenate([dzr, dzu, da], axis=1))

    inputs = (dy_LxBxN, saved_LxBxN, h_prev_LxBxN)
  d_carry = jax.tree.map(lambda a: a.astype(jnp.float32), d_final)
  d_carry, dz = jax.lax.scan(body, d_carry, inputs, reverse=not reverse)
  # LSTM: the gates' gradient is that of zx and of zh alike; GRU: they differ at n.
  gate_shape = lambda dz_LxBxGN: dz_LxBxGN.reshape(*dz_LxBxGN.shape[:2],
                                                   dz_LxBxGN.shape[-1] // n, n)
  dzh_LxBxGxN, dzx_LxBxGxN = map(gate_shape, dz if cell == 'gru' else (dz, dz))
  # Over (L B) rows as one matrix dimension: XLA:CPU contracts two dimensions more slowly.
  rows = h_prev_LxBxN.shape[0] * h_prev_LxBxN.shape[1]
  num_gates = dzh_LxBxGxN.shape[2]  # Explicit sizes: reshapes with -1 fail on 0 rows.
  dw_NxGxN = matmul.einsum_f32('tn,tm->nm', h_prev_LxBxN.reshape(rows, n).astype(dtype),
                               dzh_LxBxGxN.reshape(rows, num_gates * n).astype(dtype))
  dw_NxGxN = dw_NxGxN.reshape(n, num_gates, n)
  d_params = {'recurrent_kernel': dw_NxGxN.astype(params['recurrent_kernel'].dtype),
              'input_bias': dzx_LxBxGxN.sum((0, 1)).astype(params['input_bias'].dtype)}
  if cell == 'gru':
    d_params['recurrent_bias'] = dzh_LxBxGxN[:, :, 2].sum((0, 1)).astype(
        params['recurrent_bias'].dtype)
  d_carry = jax.tree.map(lambda d, c: d.astype(c.dtype), d_carry, carry)
  return d_params, d_carry, dzx_LxBxGxN.astype(zx_0.dtype)


fused_scan.defvjp(_fused_fwd, _fused_bwd)
