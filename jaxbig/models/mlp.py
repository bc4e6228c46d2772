"""A multilayer perceptron on flattened inputs (the seed regression model).

Shape letters: B batch, F flattened input features, N hidden units, K outputs.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxbig.models import axes, init as inits

_ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called `name`."""
  if name not in _ACTIVATIONS:
    raise ValueError(
        f"model.activation: unknown activation '{name}'; choose from {', '.join(ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class MLP(nn.Module):
  """Flatten -> (dense -> activation -> dropout) per entry of `widths` -> dense."""

  num_outputs: int
  widths: tuple[int, ...] = (1000, 500, 100)
  activation: str = 'relu'
  dropout: float = 0.0
  # Not `init`: that would shadow nn.Module.init.
  init_name: str = 'he'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 outputs_BxK for inputs of any per-example shape."""
    act = get_activation(self.activation)
    kernel_init = inits.initializer(self.init_name, self.init_std)
    zeros = nn.initializers.zeros_init()
    x_BxN = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.widths):
      x_BxN = nn.Dense(
          width, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=axes.logical(kernel_init, axes.DENSE_KERNEL),
          bias_init=axes.logical(zeros, axes.DENSE_BIAS), name=f'dense{i}')(x_BxN)
      x_BxN = axes.constrain(act(x_BxN), axes.ACT_BxN)
      x_BxN = nn.Dropout(self.dropout, deterministic=not train)(x_BxN)
    out_BxK = nn.Dense(
        self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(kernel_init, axes.OUT_KERNEL),
        bias_init=axes.logical(zeros, axes.OUT_BIAS), name='out')(x_BxN)
    return out_BxK.astype(jnp.float32)
