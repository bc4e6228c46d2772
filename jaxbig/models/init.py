"""Weight initialisers by name (`model.init`); parameters get their logical axis names
from `axes.logical`."""

import jax

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
