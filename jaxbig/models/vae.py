"""An MLP autoencoder and a variational autoencoder (Kingma & Welling, 2014) for small images.

Both decode to logits of an independent Bernoulli per pixel, so inputs should lie in [0, 1]
(the data pipeline scales pixels) and `jax.nn.sigmoid(recon_logits)` is the reconstruction.
The VAE's encoder gives the mean and log-variance of a diagonal Gaussian q(z|x); z is drawn
with the reparameterisation trick from the 'sample' rng stream, which every `apply` of the
VAE needs (training and evaluation alike: the ELBO is a sampled estimate). To draw new
images, decode z ~ N(0, I):

  logits = model.apply(variables, z_BxZ, method=VAE.decode)

Parameter names (see `axes.py`): hidden layers of encoder and decoder are DENSE_KERNEL /
DENSE_BIAS; the layers that end a stack (the encoder's latent, mean and logvar heads and
the decoder's pixel layer) are OUT_KERNEL / OUT_BIAS, so their small or odd-sized output
axis ('classes') stays replicated.

Shape letters: B batch, H height, W width, C channels, P pixels (H * W * C), N hidden units,
Z latent dimensions.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from jaxbig.models import axes, init as inits
from jaxbig.models.mlp import get_activation


def kl_divergence(mean_BxZ: jax.Array, logvar_BxZ: jax.Array) -> jax.Array:
  """Returns float32 KL(N(mean, exp(logvar)) || N(0, I))_B, summed over latent dims."""
  mean_BxZ = mean_BxZ.astype(jnp.float32)
  logvar_BxZ = logvar_BxZ.astype(jnp.float32)
  # expm1 keeps exp(lv) - 1 - lv accurate (and > 0) for small lv, where exp(lv) rounds to 1.
  return 0.5 * jnp.sum(jnp.square(mean_BxZ) + jnp.expm1(logvar_BxZ) - logvar_BxZ, axis=-1)


def bernoulli_nll(recon_logits: jax.Array, x: jax.Array) -> jax.Array:
  """Returns float32 -log p(x | logits)_B, summed over pixels; targets x lie in [0, 1]."""
  xent = optax.sigmoid_binary_cross_entropy(
      recon_logits.astype(jnp.float32), x.astype(jnp.float32))
  return jnp.sum(xent.reshape(xent.shape[0], -1), axis=-1)


def recon_sq_err(recon_logits: jax.Array, x: jax.Array) -> jax.Array:
  """Returns float32 mean over pixels of (sigmoid(logits) - x)^2, per example: B."""
  err = jax.nn.sigmoid(recon_logits.astype(jnp.float32)) - x.astype(jnp.float32)
  return jnp.mean(jnp.square(err.reshape(err.shape[0], -1)), axis=-1)


class Encoder(nn.Module):
  """Flatten -> (dense -> activation) per entry of `widths` -> one dense head per name."""

  heads: tuple[str, ...]
  widths: tuple[int, ...]
  latent: int
  activation: str = 'relu'
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, ...]:
    """Returns one float32 array_BxZ per entry of `heads`."""
    act = get_activation(self.activation)
    kernel_init = inits.initializer(self.init_name, self.init_std)
    zeros = nn.initializers.zeros_init()
    x_BxN = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.widths):
      x_BxN = act(nn.Dense(
          width, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=axes.logical(kernel_init, axes.DENSE_KERNEL),
          bias_init=axes.logical(zeros, axes.DENSE_BIAS), name=f'dense{i}')(x_BxN))
    return tuple(
        nn.Dense(
            self.latent, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=axes.logical(kernel_init, axes.OUT_KERNEL),
            bias_init=axes.logical(zeros, axes.OUT_BIAS), name=head)(x_BxN).astype(jnp.float32)
        for head in self.heads)


class Decoder(nn.Module):
  """(dense -> activation) per entry of `widths` -> dense to H * W * C logits -> reshape."""

  output_shape: tuple[int, ...]
  widths: tuple[int, ...]
  activation: str = 'relu'
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BxZ: jax.Array) -> jax.Array:
    """Returns float32 recon_logits_BxHxWxC."""
    act = get_activation(self.activation)
    kernel_init = inits.initializer(self.init_name, self.init_std)
    zeros = nn.initializers.zeros_init()
    x_BxN = z_BxZ.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x_BxN = act(nn.Dense(
          width, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=axes.logical(kernel_init, axes.DENSE_KERNEL),
          bias_init=axes.logical(zeros, axes.DENSE_BIAS), name=f'dense{i}')(x_BxN))
    logits_BxP = nn.Dense(
        math.prod(self.output_shape), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(kernel_init, axes.OUT_KERNEL),
        bias_init=axes.logical(zeros, axes.OUT_BIAS), name='out')(x_BxN)
    return logits_BxP.reshape(-1, *self.output_shape).astype(jnp.float32)


class AutoEncoder(nn.Module):
  """Deterministic MLP autoencoder: x -> z -> Bernoulli logits per pixel.

  Attributes:
    input_shape: per-example image shape (H, W, C).
    widths: hidden widths of the encoder; the decoder uses them reversed.
    latent: Z, the size of the code z.
    activation: hidden activation, a name from `mlp.ACTIVATIONS`.
    init_name: kernel initialiser, a name from `init.INITIALIZERS` (not `init`: that
      would shadow nn.Module.init).
    init_std: standard deviation for the 'normal' initialiser.
    dtype: compute dtype; outputs are float32 whatever it is.
    param_dtype: parameter dtype.
  """

  input_shape: tuple[int, ...]
  widths: tuple[int, ...] = (256, 128)
  latent: int = 16
  activation: str = 'relu'
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  _heads = ('latent',)

  def setup(self):
    common = dict(activation=self.activation, init_name=self.init_name,
                  init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self._heads, tuple(self.widths), self.latent, **common)
    self.decoder = Decoder(tuple(self.input_shape), tuple(reversed(self.widths)), **common)

  def encode(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the float32 code z_BxZ."""
    (z_BxZ,) = self.encoder(x_BxHxWxC)
    return z_BxZ

  def decode(self, z_BxZ: jax.Array) -> jax.Array:
    """Returns float32 recon_logits_BxHxWxC."""
    return self.decoder(z_BxZ)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Returns dict(recon_logits=BxHxWxC, z=BxZ), float32; `train` changes nothing."""
    del train  # No dropout or BatchNorm; kept for the models' common signature.
    z_BxZ = self.encode(x_BxHxWxC)
    return dict(recon_logits=self.decode(z_BxZ), z=z_BxZ)


class VAE(AutoEncoder):
  """Variational autoencoder: q(z|x) = N(mean, exp(logvar)), p(z) = N(0, I), Bernoulli p(x|z).

  Same attributes as `AutoEncoder`. Needs the 'sample' rng stream in `apply`.
  """

  _heads = ('mean', 'logvar')

  def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns float32 (mean_BxZ, logvar_BxZ) of q(z|x)."""
    mean_BxZ, logvar_BxZ = self.encoder(x_BxHxWxC)
    return mean_BxZ, logvar_BxZ

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Returns float32 dict(recon_logits=BxHxWxC, mean=BxZ, logvar=BxZ, z=BxZ).

    z is sampled in training and evaluation alike, so `train` changes nothing.
    """
    del train
    mean_BxZ, logvar_BxZ = self.encode(x_BxHxWxC)
    eps_BxZ = jax.random.normal(self.make_rng('sample'), mean_BxZ.shape, jnp.float32)
    z_BxZ = mean_BxZ + jnp.exp(0.5 * logvar_BxZ) * eps_BxZ
    return dict(recon_logits=self.decode(z_BxZ), mean=mean_BxZ, logvar=logvar_BxZ, z=z_BxZ)
