"""Tests for jaxbig.models.vae: the loss terms, sampling, shapes, dtypes, names, training.

Shape letters: B batch, Z latent dimensions, S Monte Carlo samples.
"""

from functools import cache, partial

import jax
import jax.numpy as jnp
import flax.errors
import flax.linen as nn
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from jaxbig.models import axes
from jaxbig.models import vae
from jaxbig.models.vae import VAE, AutoEncoder

B = 4
IMAGE = (8, 8, 1)  # The digits data set.
TINY = dict(input_shape=IMAGE, widths=(16, 8), latent=3)
TRAIN = dict(input_shape=IMAGE, widths=(64, 32), latent=4)  # Enough to learn digits.

# XLA's CPU backend spends far longer optimising these tiny graphs than running them.
_jit = partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _images(n: int = B, seed: int = 0) -> np.ndarray:
  """Pixels in [0, 1], like the data pipeline gives."""
  return np.random.default_rng(seed).uniform(size=(n, *IMAGE)).astype(np.float32)


def _init_fn(model: nn.Module, x: jax.Array) -> dict:
  return model.init({'params': jax.random.key(0), 'sample': jax.random.key(1)}, x, train=False)


@cache
def _variables(model: nn.Module) -> dict:
  """Parameters for `model` on `_images()`, built once per model for the whole file."""
  return _jit(_init_fn, static_argnums=0)(model, _images())


@partial(_jit, static_argnums=0)
def _apply_jit(model: nn.Module, variables: dict, x: np.ndarray, rng: jax.Array) -> dict:
  return model.apply(variables, x, train=True, rngs={'sample': rng})


def _apply(model: nn.Module, variables: dict, x: np.ndarray, seed: int = 0) -> dict:
  """One compile per model: modules are hashable, so jit caches on them."""
  return _apply_jit(model, variables, x, jax.random.key(seed))


# The loss terms.

MEAN = np.array([[0.5, -1.0]], np.float32)
LOGVAR = np.array([[0.2, -0.3]], np.float32)


def test_kl_matches_closed_form_by_hand():
  want = 0.5 * np.sum(MEAN**2 + np.exp(LOGVAR) - 1 - LOGVAR, axis=-1)
  got = vae.kl_divergence(MEAN, LOGVAR)
  assert got.shape == (1,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_kl_matches_monte_carlo():
  """E_q[log q(z) - log p(z)] from 200k draws of z ~ q; its standard error is ~0.002."""
  mean, std = MEAN[0].astype(np.float64), np.exp(0.5 * LOGVAR[0].astype(np.float64))
  z_SxZ = mean + std * np.random.default_rng(0).standard_normal((200_000, 2))
  log_q = -0.5 * (((z_SxZ - mean) / std)**2 + np.log(2 * np.pi) + 2 * np.log(std))
  log_p = -0.5 * (z_SxZ**2 + np.log(2 * np.pi))
  estimate = np.mean(np.sum(log_q - log_p, axis=-1))
  np.testing.assert_allclose(vae.kl_divergence(MEAN, LOGVAR)[0], estimate, atol=0.01)


def test_kl_zero_only_at_prior():
  zeros = np.zeros((1, 3), np.float32)
  assert vae.kl_divergence(zeros, zeros)[0] == 0.0
  for mean, logvar in [([0.1, 0, 0], [0, 0, 0]), ([0, 0, 0], [0, -1e-3, 0]),
                       ([0, 0, 0], [0, 0, 2.0])]:
    kl = vae.kl_divergence(np.array([mean], np.float32), np.array([logvar], np.float32))
    assert kl[0] > 0, (mean, logvar)


def test_kl_casts_to_float32():
  kl = vae.kl_divergence(jnp.asarray(MEAN, jnp.bfloat16), jnp.asarray(LOGVAR, jnp.bfloat16))
  assert kl.dtype == jnp.float32


def test_bernoulli_nll_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, *IMAGE)).astype(np.float32) * 3
  x = rng.uniform(size=(3, *IMAGE)).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=(1, 2, 3))
  got = vae.bernoulli_nll(logits, x)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_recon_sq_err_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, *IMAGE)).astype(np.float32) * 3
  x = rng.uniform(size=(3, *IMAGE)).astype(np.float32)
  want = np.mean((1 / (1 + np.exp(-logits.astype(np.float64))) - x)**2, axis=(1, 2, 3))
  got = vae.recon_sq_err(logits, x)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)


# The models.

def test_vae_sample_rng_moves_z_only():
  model, x = VAE(**TINY), _images()
  variables = _variables(model)
  a, b, a2 = (_apply(model, variables, x, seed=s) for s in (0, 1, 0))
  assert not np.allclose(a['z'], b['z'])
  np.testing.assert_array_equal(a['z'], a2['z'])
  np.testing.assert_array_equal(a['mean'], b['mean'])
  np.testing.assert_array_equal(a['logvar'], b['logvar'])
  assert not np.allclose(a['recon_logits'], b['recon_logits'])


def test_vae_needs_sample_rng():
  model, x = VAE(**TINY), _images()
  variables = _variables(model)
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, x, train=False)


@pytest.mark.parametrize('cls, keys', [
    (AutoEncoder, {'recon_logits', 'z'}),
    (VAE, {'recon_logits', 'mean', 'logvar', 'z'}),
])
def test_shapes_and_float32(cls, keys):
  model, x = cls(**TINY), _images()
  out = _apply(model, _variables(model), x)
  assert set(out) == keys
  assert out['recon_logits'].shape == (B, *IMAGE)
  for key in keys - {'recon_logits'}:
    assert out[key].shape == (B, TINY['latent']), key
  assert all(v.dtype == jnp.float32 for v in out.values())


@pytest.mark.parametrize('cls', [AutoEncoder, VAE])
def test_bf16_compute_keeps_float32_params_and_outputs(cls):
  x, bf16 = _images(), cls(**TINY, dtype=jnp.bfloat16)
  variables = _variables(cls(**TINY))
  boxed = jax.eval_shape(partial(_init_fn, bf16), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(boxed)))
  out32, out16 = _apply(cls(**TINY), variables, x), _apply(bf16, variables, x)
  assert all(v.dtype == jnp.float32 for v in out16.values())
  # Same parameters: bf16 rounding shows that the dtype reached the matmuls, but no more.
  diff = np.abs(out16['recon_logits'] - out32['recon_logits'])
  assert 0 < diff.max() < 0.1


@pytest.mark.parametrize('cls, heads', [(AutoEncoder, ('latent',)), (VAE, ('mean', 'logvar'))])
def test_every_param_has_logical_names(cls, heads):
  model = cls(**TINY)
  rngs = {'params': jax.random.key(0), 'sample': jax.random.key(1)}
  boxed = jax.eval_shape(partial(model.init, train=False), rngs, _images())['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  assert all(len(v.names) == v.value.ndim for v in leaves)
  assert set(boxed['encoder']) == {'dense0', 'dense1', *heads}
  assert set(boxed['decoder']) == {'dense0', 'dense1', 'out'}
  assert boxed['encoder']['dense0']['kernel'].names == axes.DENSE_KERNEL
  assert boxed['encoder']['dense1']['bias'].names == axes.DENSE_BIAS
  for head in heads:
    assert boxed['encoder'][head]['kernel'].names == axes.OUT_KERNEL
    assert boxed['encoder'][head]['bias'].names == axes.OUT_BIAS
  assert boxed['decoder']['dense0']['kernel'].names == axes.DENSE_KERNEL
  assert boxed['decoder']['out']['kernel'].names == axes.OUT_KERNEL
  # Decoder widths run in reverse: latent -> 8 -> 16 -> pixels.
  assert boxed['decoder']['dense0']['kernel'].value.shape == (3, 8)
  assert boxed['decoder']['out']['kernel'].value.shape == (16, 64)


def test_decode_samples_from_prior():
  model, x = VAE(**TINY), _images()
  variables = _variables(model)
  z_BxZ = jax.random.normal(jax.random.key(2), (5, TINY['latent']))
  logits = model.apply(variables, z_BxZ, method=VAE.decode)
  assert logits.shape == (5, *IMAGE) and logits.dtype == jnp.float32
  mean, logvar = model.apply(variables, x, method=VAE.encode)
  assert mean.shape == logvar.shape == (B, TINY['latent'])


# Training.

def _digits(n: int = 128) -> np.ndarray:
  images = load_digits().images[:n, :, :, None] / 16.0  # Pixels 0..16 scaled to [0, 1].
  return images.astype(np.float32)


def _losses(out: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(negative ELBO, reconstruction error), both means over the batch."""
  nelbo = vae.bernoulli_nll(out['recon_logits'], x)
  if 'mean' in out:
    nelbo += vae.kl_divergence(out['mean'], out['logvar'])
  return jnp.mean(nelbo), jnp.mean(vae.recon_sq_err(out['recon_logits'], x))


def _train(model: nn.Module, x: np.ndarray, steps: int = 200) -> tuple[tuple, tuple]:
  """Full-batch Adam on `x`; returns the losses before and after, on fixed 'sample' draws."""
  tx = optax.adam(3e-3)

  def losses(params, x, rng):
    return _losses(model.apply({'params': params}, x, train=True, rngs={'sample': rng}), x)

  def step(carry, rng):
    params, opt_state = carry
    grads = jax.grad(lambda p: losses(p, x, rng)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @_jit
  def run(x):
    params = nn.unbox(_init_fn(model, x))['params']
    before = losses(params, x, jax.random.key(99))
    rngs = jax.random.split(jax.random.key(0), steps)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), rngs)
    return before, losses(params, x, jax.random.key(99))

  return run(x)


@pytest.mark.slow(reason='trains a VAE')
def test_vae_training_lowers_negative_elbo():
  (nelbo0, _), (nelbo1, _) = _train(VAE(**TRAIN), _digits())
  assert nelbo1 < 0.75 * nelbo0, (nelbo0, nelbo1)


def test_autoencoder_training_lowers_reconstruction_error():
  (_, err0), (_, err1) = _train(AutoEncoder(**TRAIN), _digits())
  assert err1 < 0.5 * err0, (err0, err1)
