"""Tests for jaxbig.kernels.winograd: F(2x2, 3x3) against XLA's convolution, and when it applies.

Shape letters: B batch, H height, W width, C input channels, O output channels.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxbig.kernels import winograd
from jaxbig.models import cnn
from jaxbig.models.resnet import ResNetTiny

NHWC = ('NHWC', 'HWIO', 'NHWC')
# The model tests compile small graphs whose LLVM optimisation takes longer than running them.
_jit_fast = partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _normal(seed: int, shape) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _xla_conv(x, kernel, strides=(1, 1), padding='SAME', **kw):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC, **kw)


def _value_and_grads(conv, x, kernel, g):
  return _jit_fast(jax.value_and_grad(lambda x, k: (conv(x, k) * g).sum(), argnums=(0, 1)))(
      x, kernel)


@pytest.mark.parametrize('b,h,w,c,o', [(2, 4, 4, 8, 16), (3, 6, 8, 16, 5), (1, 2, 2, 9, 3)])
@pytest.mark.slow(reason='compiles convolutions and their gradients both ways')
def test_winograd_conv_matches_xla_convolution_with_gradients(b, h, w, c, o):
  x, kernel, g = _normal(0, (b, h, w, c)), _normal(1, (3, 3, c, o)), _normal(2, (b, h, w, o))
  np.testing.assert_allclose(winograd.winograd_conv(x, kernel), _xla_conv(x, kernel),
                             atol=2e-5 * np.sqrt(9 * c))
  value, (dx, dk) = _value_and_grads(winograd.winograd_conv, x, kernel, g)
  ref_value, (ref_dx, ref_dk) = _value_and_grads(_xla_conv, x, kernel, g)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, atol=2e-5 * np.sqrt(9 * o))
  np.testing.assert_allclose(dk, ref_dk, atol=2e-5 * np.sqrt(b * h * w))


def _convs(fn, *args) -> int:
  """How many XLA convolutions `fn(*args)` traces to."""
  return str(jax.make_jaxpr(fn)(*args)).count('conv_general_dilated')


CASES = {  # name: (x shape, kernel shape, conv_general_dilated keywords), none of them F(2, 3).
    'odd height': ((2, 5, 4, 8), (3, 3, 8, 4), {}),
    'stride 2': ((2, 4, 4, 8), (3, 3, 8, 4), {'window_strides': (2, 2)}),
    'VALID': ((2, 4, 4, 8), (3, 3, 8, 4), {'padding': 'VALID'}),
    'few channels': ((2, 4, 4, winograd.MIN_CHANNELS - 1), (3, 3, winograd.MIN_CHANNELS - 1, 4),
                     {}),
    '5x5 kernel': ((2, 4, 4, 8), (5, 5, 8, 4), {}),
    'dilated': ((2, 8, 8, 8), (3, 3, 8, 4), {'rhs_dilation': (2, 2), 'padding': ((2, 2),) * 2}),
    'NCHW': ((2, 8, 4, 4), (3, 3, 8, 4), {'dimension_numbers': ('NCHW', 'HWIO', 'NCHW')}),
}


@pytest.mark.parametrize('case', CASES)
def test_other_convolutions_go_to_xla_unchanged(case):
  x_shape, kernel_shape, kw = CASES[case]
  kw = {'window_strides': (1, 1), 'padding': 'SAME', 'dimension_numbers': NHWC, **kw}
  x, kernel = _normal(0, x_shape), _normal(1, kernel_shape)
  fast = partial(winograd.conv_general_dilated, **kw)
  assert _convs(fast, x, kernel) == 1
  np.testing.assert_array_equal(fast(x, kernel), lax.conv_general_dilated(x, kernel, **kw))


def test_float32_3x3_same_convolutions_take_winograd_and_bfloat16_ones_do_not():
  x, kernel = _normal(0, (2, 4, 6, 8)), _normal(1, (3, 3, 8, 4))
  fast = partial(winograd.conv_general_dilated, window_strides=(1, 1), dimension_numbers=NHWC)
  assert _convs(partial(fast, padding='SAME'), x, kernel) == 0
  assert _convs(partial(fast, padding=((1, 1), (1, 1))), x, kernel) == 0
  assert _convs(partial(fast, padding='SAME'), x.astype(jnp.bfloat16),
                kernel.astype(jnp.bfloat16)) == 1


@pytest.mark.slow(reason='compiles convolutions and their gradients both ways')
def test_seed_cnn_with_winograd_equals_xla_convolutions():
  """The seed CNN on digits-shaped inputs: conv='winograd' (its 64 -> 128 layer by
  F(2, 3)) against conv='xla', with the same parameters: logits and gradients."""
  x = _normal(0, (4, 8, 8, 1))
  auto, xla = cnn.CNN(10, conv='winograd'), cnn.CNN(10, conv='xla')
  params = _jit_fast(xla.init, static_argnames='train')(jax.random.key(0), x, train=False)
  loss = lambda model: _jit_fast(jax.value_and_grad(
      lambda p: (model.apply(p, x, train=False) ** 2).sum()))
  assert _convs(partial(auto.apply, train=False), params, x) == 1  # conv0 has one channel.
  assert _convs(partial(xla.apply, train=False), params, x) == 2
  value, grads = loss(auto)(params)
  ref_value, ref_grads = loss(xla)(params)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * abs(b).max()),
               grads, ref_grads)


@pytest.mark.slow(reason='compiles convolutions and their gradients both ways')
def test_resnet_with_winograd_equals_xla_convolutions():
  """ResNetTiny (width 8 at 8x8, then 16 at 4x4): its 3x3 stride-1 convolutions by F(2, 3)
  against XLA's, with the same parameters: logits and gradients (BatchNorm in eval mode)."""
  x = _normal(0, (4, 8, 8, 1))
  auto, xla = (ResNetTiny(num_outputs=10, conv='winograd'),
               ResNetTiny(num_outputs=10, conv='xla'))
  variables = _jit_fast(xla.init, static_argnames='train')(jax.random.key(0), x, train=False)
  apply = lambda model: partial(model.apply, train=False)
  # The stem (one channel) and the stride-2 and 1x1 convolutions stay XLA's.
  assert _convs(apply(auto), variables, x) == 3 < _convs(apply(xla), variables, x) == 6
  loss = lambda model: _jit_fast(jax.value_and_grad(
      lambda p: (apply(model)({**variables, 'params': p}, x) ** 2).sum()))
  value, grads = loss(auto)(variables['params'])
  ref_value, ref_grads = loss(xla)(variables['params'])
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * abs(b).max()),
               grads, ref_grads)


@pytest.mark.parametrize('model', [cnn.CNN(10, conv='fast'),
                                   ResNetTiny(num_outputs=10, conv='fast')])
def test_unknown_conv_implementation_is_named(model):
  with pytest.raises(ValueError,
                     match=r"(CNN|ResNet)\.conv: unknown 'fast'; choose from winograd, xla"):
    model.init(jax.random.key(0), _normal(0, (1, 8, 8, 1)), train=False)
