"""Weight initialisers by name (`model.init`); parameters get their logical axis names
from `axes.logical`."""

from typing import Any, Callable

import jax
import flax.linen as nn

_INITIALIZERS = {
    'normal': lambda std: jax.nn.initializers.normal(stddev=std),
    'glorot': lambda std: jax.nn.initializers.glorot_uniform(),
    'he': lambda std: jax.nn.initializers.he_normal(),
    'lecun': lambda std: jax.nn.initializers.lecun_normal(),
}
INITIALIZERS = tuple(_INITIALIZERS)


def initializer(name: str, std: float = 0.02) -> jax.nn.initializers.Initializer:
  """Returns the kernel initialiser called `name`; `std` is used only by 'normal'."""
  if name not in _INITIALIZERS:
    raise ValueError(
        f"model.init: unknown initializer '{name}'; choose from {', '.join(INITIALIZERS)}")
  return _INITIALIZERS[name](std)


class LogitsKernel(nn.Module):
  """An untied logits kernel (E, V) alone, named and initialised as an nn.Dense's would be:
  for a loss that makes the logits itself (model.logits_chunk)."""
  vocab_size: int
  param_dtype: Any
  init: Callable

  @nn.compact
  def __call__(self, width: int) -> jax.Array:
    return self.param('kernel', self.init, (width, self.vocab_size), self.param_dtype)
