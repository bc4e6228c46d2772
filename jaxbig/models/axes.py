"""Logical axis names for every parameter and activation, and the rules that apply them.

Every parameter is created through `logical(init, names)`, so `model.init` returns
`nn.Partitioned` boxes whose names a sharding rule maps to mesh axes. The names:

  'embed'      input features of a hidden dense layer
  'mlp'        hidden units (output of a hidden dense layer, input of the output layer;
               for a ResNet head, its pooled channels)
  'classes'    outputs of the final dense layer
  'conv_in'    input channels of a conv kernel (not of the first: image channels are
               never split)
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

Activations take logical constraints (`constrain`) at the points where a layout matters:
'batch' for examples, 'length' for positions (split over the context axis, for long
sequences), 'tokens' for the rows of a Transformer's B x L token matrices (split like batch
and length together), 'act_embed' for the residual stream (kept
whole: fsdp devices split the batch, not the width), and the parameter names 'mlp', 'heads',
'kv', 'vocab', 'conv_out' for the outputs of the layers whose kernels those names split.
They apply inside `activation_rules(rules)` (with a mesh set), and do nothing elsewhere
(init, decoding). Flax's own `nn.logical_axis_rules` context is not used: under it Flax also
constrains parameters as modules read them, which breaks on DenseGeneral's reshaped kernels.
"""

import contextlib
import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

# Logical names shared by the model files, so one sharding rule covers them all.
DENSE_KERNEL = ('embed', 'mlp')
DENSE_BIAS = ('mlp',)
OUT_KERNEL = ('mlp', 'classes')
OUT_BIAS = ('classes',)
CONV_KERNEL = (None, None, 'conv_in', 'conv_out')
STEM_KERNEL = (None, None, None, 'conv_out')  # First conv: 1 or 3 image channels, never split.
CONV_BIAS = ('conv_out',)
NORM = ('conv_out',)
EMBED_TABLE = ('vocab', 'embed')
LOGITS_KERNEL = ('embed', 'vocab')
QKV_KERNEL = ('embed', 'heads', 'kv')  # DenseGeneral: width -> (heads, head features).
QKV_BIAS = ('heads', 'kv')
ATTN_OUT_KERNEL = ('heads', 'kv', 'embed')
MLP_IN_KERNEL = ('embed', 'mlp')
MLP_OUT_KERNEL = ('mlp', 'embed')
EMBED_NORM = ('embed',)  # Norm scale/bias over the model width.

# Activations.
ACT_BxN = ('batch', 'mlp')  # Hidden units of a dense layer.
ACT_TxM = ('tokens', 'mlp')  # Hidden units of a Transformer's MLP, tokens as rows (T = B L).
ACT_BxHxWxC = ('batch', None, None, 'conv_out')  # Conv feature maps.
ACT_BxLxE = ('batch', 'length', 'act_embed')  # Residual stream.
ACT_BxLxM = ('batch', 'length', 'mlp')  # Feed-forward or recurrent hidden units.
ACT_BxLxHxD = ('batch', 'length', 'heads', 'kv')  # Queries, keys, values.
ACT_BxLxV = ('batch', 'length', 'vocab')  # Logits over the vocabulary.


def logical(init: jax.nn.initializers.Initializer, names: tuple) -> Callable[..., Any]:
  """Wraps `init` so the parameter it creates carries the logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


_RULES: contextvars.ContextVar = contextvars.ContextVar('activation_rules', default=None)


@contextlib.contextmanager
def activation_rules(rules):
  """Within this context `constrain` maps logical names to mesh axes by `rules`."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def mesh_axes(names: tuple):
  """The PartitionSpec of logical `names` under the current activation rules (None outside
  of them: nothing is split)."""
  rules = _RULES.get()
  return None if rules is None else nn.logical_to_mesh_axes(names, rules)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """Asks the compiler for the layout of activation `x` given by logical axis `names`."""
  rules = _RULES.get()
  return x if rules is None else nn.with_logical_constraint(x, names, rules=rules)


def lookup(embed: nn.Embed, tokens: jax.Array) -> jax.Array:
  """`embed(tokens)`, with the table's width gathered whole first.

  FSDP splits the table's width; left to itself the compiler carries that split into the
  activations and must then undo it against the batch split (a full rematerialisation).
  """
  table = constrain(embed.embedding, ('vocab', 'act_embed'))
  return jnp.take(table, tokens, axis=0).astype(embed.dtype)
