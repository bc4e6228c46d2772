"""Weight initialisers by name, and logical axis names for every parameter.

Every parameter is created through `logical(init, names)`, so `model.init` returns
`nn.Partitioned` boxes whose names a sharding rule maps to mesh axes. The names:

  'embed'      input features of a hidden dense layer
  'mlp'        hidden units (output of a hidden dense layer, input of the output layer;
               for a ResNet head, its pooled channels)
  'classes'    outputs of the final dense layer
  'conv_in'    input channels of a conv kernel
  'conv_out'   output channels of a conv kernel, its bias, and BatchNorm scale/bias
  None         spatial axes of a conv kernel (never sharded)

Sequence models add:

  'vocab'      the byte/token vocabulary (embedding rows, LM logits)
  'heads'      attention heads
  'kv'         features per attention head (never sharded)
  'layers'     the stacked-layer axis that `nn.scan` over layers adds (never sharded)

and use 'embed' for the model width (residual stream, RNN inputs), 'mlp' for hidden units
(feed-forward inner width, RNN gates).

So: hidden dense kernel ('embed', 'mlp'), bias ('mlp',); output kernel ('mlp', 'classes'),
bias ('classes',); conv kernel (None, None, 'conv_in', 'conv_out'), bias ('conv_out',);
BatchNorm scale and bias ('conv_out',). BatchNorm running statistics ('batch_stats') are
created by Flax without names and stay unboxed (replicated).
"""

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

# Logical names shared by the model files, so one sharding rule covers them all.
DENSE_KERNEL = ('embed', 'mlp')
DENSE_BIAS = ('mlp',)
OUT_KERNEL = ('mlp', 'classes')
OUT_BIAS = ('classes',)
CONV_KERNEL = (None, None, 'conv_in', 'conv_out')
CONV_BIAS = ('conv_out',)
NORM = ('conv_out',)
EMBED_TABLE = ('vocab', 'embed')
LOGITS_KERNEL = ('embed', 'vocab')
QKV_KERNEL = ('embed', 'heads', 'kv')  # DenseGeneral: width -> (heads, head features).
ATTN_OUT_KERNEL = ('heads', 'kv', 'embed')
MLP_IN_KERNEL = ('embed', 'mlp')
MLP_OUT_KERNEL = ('mlp', 'embed')
EMBED_NORM = ('embed',)  # Norm scale/bias over the model width.


def initializer(name: str, std: float = 0.02) -> jax.nn.initializers.Initializer:
  """Returns the kernel initialiser called `name`; `std` is used only by 'normal'."""
  if name not in _INITIALIZERS:
    raise ValueError(
        f"model.init: unknown initializer '{name}'; choose from {', '.join(INITIALIZERS)}")
  return _INITIALIZERS[name](std)


def logical(init: jax.nn.initializers.Initializer, names: tuple) -> Callable[..., Any]:
  """Wraps `init` so the parameter it creates carries the logical axis `names`."""
  return nn.with_logical_partitioning(init, names)
