"""Threefry-2x32's random bits as straight-line code: `kernels.random_bits='unrolled'`.

Reference: JAX's `threefry2x32` keys, matched bit for bit (tests/test_threefry.py), so dropout
masks, samples and results do not depend on which of the two a platform uses. Buys on CPUs:
the seed CNN's batch-256 train step 15.99 -> 15.33 ms median, and its init compiles in a
third of the time (1.8 -> 0.6 s), on the 2-core Xeon VM
(benchmarks/results/cpu-xeon/perf_cpu/README.md).

`jax.random`'s Threefry lowers its hash on XLA:CPU as a rolled loop of five iterations, each
run as its own pass over the whole array. `UNROLLED` is the same generator as a JAX PRNG
implementation (`jax.extend.random`) whose `random_bits` computes the 20 rounds as
straight-line elementwise code, which XLA fuses into the consumer. Keys, `split` and
`fold_in` are Threefry's own (unrolled, their larger fusions compile more slowly).
"""

import math

import jax
import jax.extend.random as jex_random
import numpy as np
from jax import lax

_THREEFRY = jex_random.threefry_prng_impl
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's, alternating per 4 rounds.
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant.


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(x, np.uint32(32 - bits))


def threefry_2x32_hash(k1: jax.Array, k2: jax.Array, x1: jax.Array,
                       x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of the counter words (x1, x2) under the key (k1, k2)."""
  schedule = (k1, k2, k1 ^ k2 ^ _PARITY)
  x1, x2 = x1 + schedule[0], x2 + schedule[1]
  for i in range(5):  # Five groups of four rounds, each followed by a key injection.
    for rotation in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, rotation) ^ x1
    x1 = x1 + schedule[(i + 1) % 3]
    x2 = x2 + schedule[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  """Threefry's `random_bits` in its partitionable form: element i hashes the 64-bit counter
  i (row-major), high word first; 32-bit outputs xor the two words."""
  size = math.prod(shape)
  if size >= 2 ** 32 or not getattr(jax.config, 'jax_threefry_partitionable', True):
    return _THREEFRY.random_bits(key, bit_width, shape)  # Counters past one word: JAX's own.
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  counter = np.zeros(shape, np.uint32)
  for d, stride in enumerate(strides):
    counter = counter + lax.broadcasted_iota(np.uint32, shape, d) * np.uint32(stride)
  bits1, bits2 = threefry_2x32_hash(key[0], key[1], np.zeros(shape, np.uint32), counter)
  if bit_width == 64:
    hi, lo = (lax.convert_element_type(b, np.uint64) for b in (bits1, bits2))
    return lax.shift_left(hi, np.uint64(32)) | lo
  return lax.convert_element_type(bits1 ^ bits2, {8: np.uint8, 16: np.uint16,
                                                  32: np.uint32}[bit_width])


UNROLLED = jex_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    random_bits=_random_bits, fold_in=_THREEFRY.fold_in, name='threefry2x32_unrolled',
    tag='fry_u')


def wrap(key_data: jax.Array, unrolled: bool) -> jax.Array:
  """A typed key from Threefry key data, drawing its bits unrolled if `unrolled`
  (kernels.random_bits, the CPU fast path; the same bits either way)."""
  return jax.random.wrap_key_data(key_data, impl=UNROLLED if unrolled
                                  else 'threefry2x32')
