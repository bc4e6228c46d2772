"""jaxbig.kernels.threefry: the unrolled Threefry draws JAX's Threefry bits, and the train
step's result does not depend on which of the two draws them."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig import config as config_lib, train
from jaxbig.kernels import threefry

CNN = str(pathlib.Path(__file__).resolve().parent.parent / 'experiments' / 'cnn_digits.py')

UINTS = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def _with_bits(s: train.Setup, bits: str) -> train.Setup:
  """The setup with the policy's random bits set to `bits`, everything else kept."""
  return dataclasses.replace(s, kernels=dataclasses.replace(s.kernels, random_bits=bits))


def _pair(seed: int):
  """(reference key, unrolled key) from the same Threefry key data."""
  data = jax.random.key_data(jax.random.key(seed))
  return jax.random.wrap_key_data(data), threefry.wrap(data, True)


@pytest.mark.parametrize('shape', [(), (7,), (3, 5), (2, 3, 4), (64, 1000)])
@pytest.mark.parametrize('bits', [8, 16, 32])
def test_unrolled_bits_are_threefrys(shape, bits):
  ref, fast = _pair(shape[-1] if shape else 0)
  want = jax.random.bits(ref, shape, UINTS[bits])
  got = jax.jit(lambda k: jax.random.bits(k, shape, UINTS[bits]))(fast)
  np.testing.assert_array_equal(got, want)
  if shape and shape[-1] > 1:  # The counters and the key matter: not a constant.
    assert len(np.unique(np.asarray(got))) > 1


def test_batched_keys_and_empty_draws_are_threefrys():
  ref, fast = _pair(5)
  keys_ref, keys_fast = jax.random.split(ref, 3), jax.random.split(fast, 3)
  draw = jax.vmap(lambda k: jax.random.bits(k, (4, 6)))
  np.testing.assert_array_equal(jax.jit(draw)(keys_fast), draw(keys_ref))
  assert jax.random.bits(fast, (3, 0)).shape == (3, 0)


def test_unrolled_64_bit_draws_are_threefrys():
  with jax.enable_x64(True):
    ref, fast = _pair(3)
    np.testing.assert_array_equal(jax.random.bits(fast, (5, 6), jnp.uint64),
                                  jax.random.bits(ref, (5, 6), jnp.uint64))


def test_derived_keys_and_distributions_match():
  ref, fast = _pair(11)
  for op in (lambda k: jax.random.bernoulli(jax.random.fold_in(k, 7), 0.9, (33, 17)),
             lambda k: jax.random.normal(jax.random.split(k, 3)[2], (4, 50)),
             lambda k: jax.random.uniform(jax.random.fold_in(k, 2), (1000,))):
    np.testing.assert_array_equal(jax.jit(op)(fast), op(ref))
  assert jax.random.key_impl(fast) != jax.random.key_impl(ref)


def test_the_policy_picks_the_key_type():
  data = jax.random.key_data(jax.random.key(0))
  assert str(jax.random.key_impl(threefry.wrap(data, False))) == 'threefry2x32'
  assert str(jax.random.key_impl(threefry.wrap(data, True))) != 'threefry2x32'


@pytest.mark.slow(reason='compiles train steps with both key types')
def test_train_step_is_the_same_with_either_draw():
  """The seed CNN (dropout 0.1) after two steps: bit-identical parameters, and only the
  reference's program holds Threefry's rolled loop for the mask."""
  s = train.setup(config_lib.load(CNN + ':smoke', ['opt.warmup_steps=0']))
  assert s.config.model.dropout > 0
  batch = next(s.data.train_iter())
  results, loops = [], []
  for bits in ('unrolled', 'threefry'):
    s = _with_bits(s, bits)
    steps = train.compile_steps(s, train.init_state(s), with_eval=False)
    loops.append(train.lower_train_step(s).compile().as_text().count(' while('))
    state = train.init_state(s)
    for _ in range(2):
      state, _ = steps.train(state, batch)
    results.append(jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, *results)
  assert loops[0] < loops[1]


@pytest.mark.parametrize('spec', [CNN + ':smoke', 'experiments/seq_digits.py:gru,smoke'])
@pytest.mark.slow(reason='compiles train steps with both key types')
def test_init_state_is_the_same_with_either_draw(spec):
  """Every leaf of a fresh state (parameters, optimizer state, key) bit for bit; only the
  reference's init program holds Threefry's rolled loops for its random draws."""
  s = train.setup(config_lib.load(spec, []))
  states, loops = [], []
  for bits in ('unrolled', 'threefry'):
    s = _with_bits(s, bits)
    states.append(jax.device_get(train.init_state(s)))
    loops.append(jax.jit(s.init).lower(jax.random.key_data(jax.random.key(0))).as_text()
                 .count('stablehlo.while'))
  jax.tree.map(np.testing.assert_array_equal, *states)
  assert loops[0] < loops[1]
