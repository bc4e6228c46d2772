"""Pre-norm transformers: a decoder-only byte LM (with a KV cache) and an encoder classifier.

Both models share one `Block` (RMSNorm -> self-attention -> residual, RMSNorm -> GELU MLP ->
residual). Attention runs through `jax.nn.dot_product_attention` (cuDNN or XLA), whose XLA
path computes the attention logits and softmax in float32 even for bfloat16 inputs; with
`heads_major` (the CPU fast path) through jaxbig/kernels/attention.py, the same function laid
out for XLA:CPU's batched matmuls.
Norms run in float32 and model outputs are float32. Dense layers see tokens as the rows of
a (T, E) matrix, T = B L.

Shape letters: B batch, L sequence length (tokens in this call; in decode mode, the new
tokens of one chunk), S cache length (= max_len), E width (residual stream), H heads,
D features per head, M MLP hidden units, V vocabulary, T tokens (B L), F input features
per position, K outputs (classes).

Decode mode (`TransformerLM(decode=True)`) keeps a 'cache' collection:

  cache_index                     int32 scalar, the position of the next token
  block{i}/attn/cached_key        (B, S, H, D) in the compute dtype; cached_value likewise
  blocks/attn/cached_key          (depth, B, S, H, D) instead, with scan_layers=True

Parameters carry the logical names of `jaxbig.models.axes`; the learned position table
uses (None, 'embed') (positions never sharded) and the classifier's projection of float
inputs (None, 'embed') with bias ('embed',): the feature count F is data-dependent and
often not divisible by a mesh axis.
"""

import contextlib
import contextvars
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jaxbig.kernels import attention as attention_kernel
from jaxbig import matmul
from jaxbig.models import axes, init as inits

POS_TABLE = (None, 'embed')
INPUT_KERNEL = (None, 'embed')
INPUT_BIAS = ('embed',)
POSITIONS = ('rope', 'learned')
MLPS = ('gelu', 'swiglu')
NORMS = ('rms', 'layer')  # RMSNorm (scale), or LayerNorm (scale and bias) as in GPT-2.  # GELU(x W_in) W_out, or (SiLU(x W_gate) * x W_in) W_out.
# model.remat: what a block keeps from its forward pass for the backward pass; the rest is
# recomputed. Names from jax.checkpoint_policies; `save:NAME,...` keeps the block's named
# activations (REMAT_NAMES) and recomputes everything else.
REMAT_POLICIES = {
    'none': None,  # No remat: every activation is kept.
    'full': jax.checkpoint_policies.nothing_saveable,  # Only the block's input is kept.
    # Matmul outputs against weights (projections, MLP) kept; attention scores, softmax and
    # elementwise work recomputed: less recompute than `full`, far less memory than `none`.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul output kept, the attention scores too (batched matmuls).
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    # As `dots`, but the kept outputs go to host memory (TPUs and GPUs).
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
    # As `full`, but the blocks' inputs wait in host memory for the backward pass: under
    # scan_layers, depth x B x L x E off the device for a copy each way per block.
    'offload_input': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=['block_in'],
        offload_src='device', offload_dst='pinned_host'),
}
_IMPLEMENTATIONS = {'xla': 'xla', 'cudnn': 'cudnn', 'auto': None}
# 'flash': the Pallas splash (block-sparse flash) attention kernel for TPUs
# (jax.experimental.pallas.ops.tpu), which never materialises the score matrix; sequences
# (per context shard) in blocks of FLASH_BLOCK.
ATTENTIONS = (*_IMPLEMENTATIONS, 'flash')
FLASH_BLOCK = 128
ROPE_BASE = 10_000.0
# Activations a block names for `model.remat=save:...`: the q/k/v projections, the
# attention output (before its projection), the MLP's input (after its norm) and hidden
# layer (before the GELU).
REMAT_NAMES = ('qkv', 'attn_out', 'mlp_in', 'mlp_hidden')


def remat_name(value: str | bool) -> str:
  """The canonical `model.remat` value: `True`/`False` (the old boolean field, or its text)
  mean full and none; ValueError for a value that names no policy."""
  if isinstance(value, bool) or value in ('true', 'false'):
    return 'full' if value in (True, 'true') else 'none'
  if value in REMAT_POLICIES:
    return value
  if isinstance(value, str) and value.startswith('save:'):
    names = [n.strip() for n in value[len('save:'):].split(',') if n.strip()]
    unknown = [n for n in names if n not in REMAT_NAMES]
    if not names or unknown:
      raise ValueError(f"save: takes names from {', '.join(REMAT_NAMES)}; got "
                       f"'{','.join(unknown) or value}'")
    return 'save:' + ','.join(names)
  raise ValueError(f"unknown policy '{value}'; choose from {', '.join(REMAT_POLICIES)} or "
                   f"save:NAME,... ({', '.join(REMAT_NAMES)})")


def remat_policy(value: str | bool):
  """The jax.checkpoint policy of a `model.remat` value (None: no remat)."""
  name = remat_name(value)
  if name.startswith('save:'):
    return jax.checkpoint_policies.save_only_these_names(*name[len('save:'):].split(','))
  return REMAT_POLICIES[name]


def reference_attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Plain softmax attention in float32; `mask` (True = attend) broadcasts to (B, H, L, S)."""
  q, k, v = (t.astype(jnp.float32) for t in (q_BxLxHxD, k_BxSxHxD, v_BxSxHxD))
  logits_BxHxLxS = jnp.einsum('blhd,bshd->bhls', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, jnp.finfo(jnp.float32).min)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  return jnp.einsum('bhls,bshd->blhd', probs_BxHxLxS, v).astype(q_BxLxHxD.dtype)


def _repeat_kv(x_BxLxKxD: jax.Array, heads: int) -> jax.Array:
  """Grouped keys or values repeated to one per query head: head h reads group h // (H/K)."""
  return jnp.repeat(x_BxLxKxD, heads // x_BxLxKxD.shape[2], axis=2)


# True: the kernels run in Pallas's interpreter (tests of them on a CPU; see `interpret`).
_INTERPRET = contextvars.ContextVar('interpret_kernels', default=False)


@contextlib.contextmanager
def interpret():
  """Within this context the Pallas TPU kernels (model.attention=flash) are traced for
  Pallas's interpreter, so that a CPU can run them: for tests against the reference."""
  token = _INTERPRET.set(True)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def interpreting() -> bool:
  """Whether this is inside `interpret()`."""
  return _INTERPRET.get()


def flash_attention(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                    causal: bool, segments_BxL: jax.Array | None = None) -> jax.Array:
  """out_BxLxHxD by the Pallas TPU splash-attention kernel (block-sparse flash attention,
  forward and backward kernels; never the score matrix), with packed documents as its
  segment ids. A custom call cannot be split by XLA, so under a mesh it runs in shard_map:
  each device on its own rows and heads, and, where the context axis splits the sequence,
  on its own query positions against all keys and values (gathered over context; the
  kernel's causal mask knows each shard's offset)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # pylint: disable=g-import-not-at-top
  batch, length, heads, head_dim = q_BxLxHxD.shape
  spec = axes.mesh_axes(axes.ACT_BxLxHxD)
  mesh = jax.sharding.get_abstract_mesh()
  split = lambda i: 1 if spec is None or mesh.empty else math.prod(
      mesh.shape[a] for a in _names(spec[i]))
  if spec is not None and not mesh.empty and spec[3] is not None:
    raise ValueError('model.attention=flash: the head-feature axis must not be split')
  context, local_heads = split(1), heads // split(2)
  block = min(FLASH_BLOCK, length // context)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  shape = (length, length)
  mask = masks.MultiHeadMask(
      [masks.CausalMask(shape) if causal else masks.FullMask(shape)] * local_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=context,
                                  interpret=_INTERPRET.get())
  if segments_BxL is None:
    segments_BxL = jnp.zeros((batch, length), jnp.int32)
  scale = 1.0 / math.sqrt(head_dim)

  def attend(kernel, q, k, v, q_segments, kv_segments):
    t = lambda x: x.transpose(0, 2, 1, 3)  # The kernel's layout per example: H L D.
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    return t(jax.vmap(one)(t(q), t(k), t(v), q_segments, kv_segments))

  if spec is None or mesh.empty:
    return attend(kernel, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segments_BxL, segments_BxL)
  P = jax.sharding.PartitionSpec
  kv_spec = P(spec[0], None, spec[2], None)  # Keys and values whole along the sequence.
  kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, spec[1])))
  return jax.shard_map(
      attend, mesh=mesh,
      in_specs=(kernel_spec, spec, kv_spec, kv_spec, P(spec[0], spec[1]), P(spec[0], None)),
      out_specs=spec, check_vma=False)(kernel, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                       segments_BxL, segments_BxL)


def _names(entry) -> tuple:
  """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def causal_mask(q_positions_L: jax.Array, num_keys: int) -> jax.Array:
  """Boolean mask_1x1xLxS: key position <= query position."""
  mask_LxS = jnp.arange(num_keys)[None, :] <= q_positions_L[:, None]
  return mask_LxS[None, None]


def rope(x_BxLxHxD: jax.Array, positions_L: jax.Array, heads_major: bool = False,
         theta: float = ROPE_BASE) -> jax.Array:
  """Rotates feature pairs (i, i + D/2) by position-dependent angles, in float32; pair i
  turns by position x theta^(-2i/D).

  `positions_L` may also be positions_BxL (packed documents). `heads_major`: x is x_BxHxLxD.
  """
  half = x_BxLxHxD.shape[-1] // 2
  # Positions known when tracing (numpy: training, evaluation) give constant tables: cos and
  # sin computed in the program are fused into their users, again for every batch row and
  # head. Traced positions (decoding) are computed in the program.
  xnp = np if isinstance(positions_L, np.ndarray) else jnp
  inv_freq = np.float32(theta) ** (-xnp.arange(half, dtype=np.float32) / np.float32(half))
  angles_LxD2 = positions_L.astype(np.float32)[..., None] * inv_freq  # Or angles_BxLxD2.
  cos, sin = xnp.cos(angles_LxD2), xnp.sin(angles_LxD2)
  if not heads_major:  # A heads axis before the features.
    cos, sin = cos[..., None, :], sin[..., None, :]
  elif positions_L.ndim == 2:  # A heads axis after the batch.
    cos, sin = cos[:, None], sin[:, None]
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


def documents(tokens_BxL: jax.Array, eos: int) -> tuple[jax.Array, jax.Array]:
  """Packed rows: (positions_BxL within each document, segments_BxL numbering the documents).

  A document begins at the row's start and at every `eos` token (which opens the next one,
  as a BOS would), so a row that starts mid-document treats its part as a document.
  """
  length = tokens_BxL.shape[1]
  index_L = jnp.arange(length, dtype=jnp.int32)
  starts_BxL = (tokens_BxL == eos) | (index_L == 0)
  segment_BxL = jnp.cumsum(starts_BxL, axis=1)
  first_BxL = lax.cummax(jnp.where(starts_BxL, index_L, 0), axis=1)
  return index_L - first_BxL, segment_BxL


def same_document(segments_BxL: jax.Array | None) -> jax.Array | None:
  """mask_Bx1xLxL, True where query and key are in the same document (None: one each)."""
  if segments_BxL is None:
    return None
  return (segments_BxL[:, :, None] == segments_BxL[:, None, :])[:, None]


def _rms_norm(x: jax.Array, *, dtype: Any, param_dtype: Any, name: str,
              eps: float = 1e-6, kind: str = 'rms') -> jax.Array:
  """RMSNorm (or with kind='layer' LayerNorm, with a bias) in float32, cast back to the
  compute dtype (call inside a compact method)."""
  scale = axes.logical(nn.initializers.ones_init(), axes.EMBED_NORM)
  if kind == 'layer':
    norm = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, scale_init=scale,
                        bias_init=axes.logical(nn.initializers.zeros_init(), axes.EMBED_NORM),
                        name=name)
  else:
    norm = nn.RMSNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                      scale_init=scale, name=name)
  return norm(x.astype(jnp.float32)).astype(dtype)


def _check_attributes(m: nn.Module) -> None:
  """Raises a ValueError for attribute values the shared blocks cannot build."""
  if m.pos not in POSITIONS:
    raise ValueError(f"model.pos: unknown '{m.pos}'; choose from {', '.join(POSITIONS)}")
  if m.attention not in ATTENTIONS:
    raise ValueError(
        f"model.attention: unknown '{m.attention}'; choose from {', '.join(ATTENTIONS)}")
  if m.width % m.heads:
    raise ValueError(f'model.width ({m.width}) must be divisible by model.heads ({m.heads})')
  if m.pos == 'rope' and (m.width // m.heads) % 2:
    raise ValueError(f'model.pos=rope needs an even head size, got {m.width // m.heads}')
  if m.kv_heads < 0 or (m.kv_heads and m.heads % m.kv_heads):
    raise ValueError(f'model.kv_heads ({m.kv_heads}) must divide model.heads ({m.heads}); 0 '
                     'means as many as heads')
  if m.mlp not in MLPS:
    raise ValueError(f"model.mlp: unknown '{m.mlp}'; choose from {', '.join(MLPS)}")
  if m.norm not in NORMS:
    raise ValueError(f"model.norm: unknown '{m.norm}'; choose from {', '.join(NORMS)}")
  if not m.rope_theta > 0 or not m.norm_eps > 0:
    raise ValueError('model.rope_theta and model.norm_eps must be > 0')


# lora.targets -> the projections they adapt (Attention's q/k/v/out, Block's MLP denses).
LORA_TARGETS = {'q': ('query',), 'k': ('key',), 'v': ('value',), 'o': ('out',),
                'mlp': ('mlp_in', 'mlp_gate', 'mlp_out')}
LORA = '_lora_'  # In the names of adapter parameters: `<projection>_lora_a`, `..._lora_b`.


def lora_delta(m: nn.Module, name: str, x_TxI: jax.Array, in_names: tuple, out_shape: tuple,
               out_names: tuple) -> jax.Array | None:
  """The LoRA update of projection `name` for inputs x_TxI... (T, then the kernel's input
  dims): (x A) B * alpha / rank, shaped (T, *out_shape); None where `name` is not adapted.
  A starts normal (std 1/sqrt(inputs)), B at zero, so the adapted model starts as the base
  (call inside a compact method of `m`, which has lora_rank, lora_alpha, lora_targets)."""
  if not m.lora_rank or name not in m.lora_targets:
    return None
  rank, in_shape = m.lora_rank, x_TxI.shape[1:]
  fan_in = math.prod(in_shape)
  a = m.param(f'{name}{LORA}a', axes.logical(nn.initializers.normal(fan_in**-0.5),
                                              (*in_names, None)), (*in_shape, rank),
              m.param_dtype)
  b = m.param(f'{name}{LORA}b', axes.logical(nn.initializers.zeros_init(), (None, *out_names)),
              (rank, *out_shape), m.param_dtype)
  x_TxI = x_TxI.reshape(x_TxI.shape[0], fan_in).astype(m.dtype)
  h_TxR = x_TxI @ a.reshape(fan_in, rank).astype(m.dtype)
  out = (h_TxR @ b.reshape(rank, -1).astype(m.dtype)) * (m.lora_alpha / rank)
  return out.reshape(x_TxI.shape[0], *out_shape)


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
  return y if delta is None else y + delta.astype(y.dtype)


def mlp_width(width: int, ratio: float, dim: int = 0) -> int:
  """The MLP's hidden units: `dim` where set (model.mlp_dim), else width x ratio."""
  return dim or int(round(width * ratio))


def _check_length(length: int, max_len: int) -> None:
  if length > max_len:
    raise ValueError(f'data.seq_len ({length}) exceeds model.max_len ({max_len})')


class Attention(nn.Module):
  """Multi-head self-attention; in decode mode, over a KV cache of max_len positions."""

  heads: int
  max_len: int
  pos: str = 'rope'
  causal: bool = True
  attention: str = 'xla'
  heads_major: bool = False  # Heads-major attention (kernels.attention, the CPU fast path).
  decode: bool = False
  kv_heads: int = 0  # Key/value heads (grouped-query attention); 0: one per query head.
  use_bias: bool = False
  rope_theta: float = ROPE_BASE
  init_std: float = 0.02
  out_std: float = 0.02
  lora_rank: int = 0  # > 0: low-rank adapters on the projections in lora_targets.
  lora_alpha: float = 16.0
  lora_targets: tuple = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE: jax.Array, positions_L: jax.Array,
               segments_BxL: jax.Array | None = None) -> jax.Array:
    """Returns out_BxLxE; `positions_L` are the positions of the L inputs (positions_BxL for
    packed documents, with `segments_BxL` numbering the documents: a query sees only keys
    of its own)."""
    width = x_BxLxE.shape[-1]
    head_dim = width // self.heads
    kv_heads = self.kv_heads or self.heads
    qkv = dict(
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(nn.initializers.normal(self.init_std), axes.QKV_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.QKV_BIAS))
    # Projections over tokens as matrix rows (T = B L), as in Block's MLP: faster on XLA:CPU.
    batch, length = x_BxLxE.shape[:2]
    x_TxE = x_BxLxE.reshape(batch * length, width)
    to_BxLxHxD = lambda name, heads: _plus(
        nn.DenseGeneral(features=(heads, head_dim), **qkv, name=name)(x_TxE),
        lora_delta(self, name, x_TxE, ('embed',), (heads, head_dim), ('heads', 'kv'))
    ).reshape(batch, length, heads, head_dim)
    # With kv_heads < heads (grouped-query attention), K is short for key/value heads.
    q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = (
        checkpoint_name(axes.constrain(to_BxLxHxD(n, h), axes.ACT_BxLxHxD), 'qkv')
        for n, h in (('query', self.heads), ('key', kv_heads), ('value', kv_heads)))
    mask_Bx1xLxL = None if self.attention == 'flash' else same_document(segments_BxL)
    # Heads-major, RoPE is applied after the move (faster on CPUs).
    if not self.decode and self.attention not in ('cudnn', 'flash') and self.heads_major:
      k_BxLxHxD, v_BxLxHxD = (_repeat_kv(t, self.heads) for t in (k_BxLxKxD, v_BxLxKxD))
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = matmul.upcast_f16_on_cpu(
          q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
      rotate = (partial(rope, positions_L=positions_L, heads_major=True, theta=self.rope_theta)
                if self.pos == 'rope' else None)
      out_BxLxHxD = attention_kernel.heads_major_attention(
          q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, self.causal, rotate, mask_Bx1xLxL)
      return self._out(out_BxLxHxD)
    if self.pos == 'rope':
      q_BxLxHxD = rope(q_BxLxHxD, positions_L, theta=self.rope_theta)
      k_BxLxKxD = rope(k_BxLxKxD, positions_L, theta=self.rope_theta)

    if self.attention == 'flash' and not self.decode:
      out_BxLxHxD = flash_attention(q_BxLxHxD, _repeat_kv(k_BxLxKxD, self.heads),
                                    _repeat_kv(v_BxLxKxD, self.heads), self.causal,
                                    segments_BxL)
      return self._out(out_BxLxHxD)

    # Decode mode creates the cache on `init` (and then attends like the plain path); later
    # calls write this chunk into it and attend over all cached positions.
    use_cache = self.decode and self.has_variable('cache', 'cached_key')
    if self.decode:  # The cache holds the kv_heads, not repeated.
      shape = (x_BxLxE.shape[0], self.max_len, kv_heads, head_dim)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, shape, k_BxLxKxD.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, shape, v_BxLxKxD.dtype)
    if use_cache:
      start = (0, positions_L[0], 0, 0)
      cached_key.value = lax.dynamic_update_slice(cached_key.value, k_BxLxKxD, start)
      cached_value.value = lax.dynamic_update_slice(cached_value.value, v_BxLxKxD, start)
      # Keys past the chunk are zeros and masked; XLA takes any mask (cuDNN may not).
      out_BxLxHxD = jax.nn.dot_product_attention(
          *matmul.upcast_f16_on_cpu(q_BxLxHxD, cached_key.value, cached_value.value),
          mask=causal_mask(positions_L, self.max_len), implementation='xla')  # Also for flash.
    else:  # jax.nn.dot_product_attention takes grouped keys and values as they are.
      q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = matmul.upcast_f16_on_cpu(
          q_BxLxHxD, k_BxLxKxD, v_BxLxKxD)
      out_BxLxHxD = jax.nn.dot_product_attention(
          q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask=mask_Bx1xLxL, is_causal=self.causal,
          implementation=_IMPLEMENTATIONS.get(self.attention, 'xla'))
    return self._out(out_BxLxHxD)

  def _out(self, out_BxLxHxD: jax.Array) -> jax.Array:
    """The output projection, over token rows: out_BxLxE."""
    batch, length, heads, head_dim = out_BxLxHxD.shape
    out_BxLxHxD = checkpoint_name(out_BxLxHxD, 'attn_out')
    out_TxHxD = out_BxLxHxD.reshape(batch * length, heads, head_dim)
    out_TxE = nn.DenseGeneral(
        heads * head_dim, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=axes.logical(nn.initializers.normal(self.out_std), axes.ATTN_OUT_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.EMBED_NORM),
        name='out')(out_TxHxD)
    out_TxE = _plus(out_TxE, lora_delta(self, 'out', out_TxHxD, ('heads', 'kv'),
                                        (heads * head_dim,), ('embed',)))
    return out_TxE.reshape(batch, length, heads * head_dim)


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); returns (x, None) so nn.scan can carry x."""

  heads: int
  mlp_dim: int
  max_len: int
  pos: str = 'rope'
  causal: bool = True
  attention: str = 'xla'
  heads_major: bool = False  # Heads-major attention (kernels.attention, the CPU fast path).
  dropout: float = 0.0
  deterministic: bool = True
  decode: bool = False
  kv_heads: int = 0
  mlp: str = 'gelu'
  use_bias: bool = False
  rope_theta: float = ROPE_BASE
  norm_eps: float = 1e-6
  norm: str = 'rms'
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ()
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE: jax.Array, positions_L: jax.Array,
               segments_BxL: jax.Array | None = None) -> tuple[jax.Array, None]:
    width = x_BxLxE.shape[-1]
    x_BxLxE = checkpoint_name(x_BxLxE, 'block_in')  # For model.remat=offload_input.
    norm = dict(dtype=self.dtype, param_dtype=self.param_dtype, eps=self.norm_eps,
                kind=self.norm)
    dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h_BxLxE = _rms_norm(x_BxLxE, **norm, name='attn_norm')
    h_BxLxE = Attention(
        heads=self.heads, max_len=self.max_len, pos=self.pos, causal=self.causal,
        attention=self.attention, heads_major=self.heads_major, decode=self.decode,
        kv_heads=self.kv_heads, use_bias=self.use_bias, rope_theta=self.rope_theta,
        init_std=self.init_std, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
        lora_targets=self.lora_targets,
        out_std=self.out_std, dtype=self.dtype, param_dtype=self.param_dtype, name='attn')(
            h_BxLxE, positions_L, segments_BxL)
    x_BxLxE = x_BxLxE + nn.Dropout(self.dropout, deterministic=self.deterministic)(h_BxLxE)
    # The MLP sees tokens as rows of a matrix (T = B L): with the (B, L) pair kept, XLA:CPU
    # fuses the GELU gradient into a slow transposing copy for the weight gradient. Free
    # reshapes; the same math.
    batch, length = x_BxLxE.shape[:2]
    h_TxE = _rms_norm(x_BxLxE, **norm, name='mlp_norm').reshape(batch * length, width)
    h_TxE = checkpoint_name(h_TxE, 'mlp_in')
    to_hidden = lambda name: _plus(nn.Dense(
        self.mlp_dim, **dense, name=name,
        kernel_init=axes.logical(nn.initializers.normal(self.init_std), axes.MLP_IN_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.DENSE_BIAS))(h_TxE),
        lora_delta(self, name, h_TxE, ('embed',), (self.mlp_dim,), ('mlp',)))
    h_TxM = checkpoint_name(axes.constrain(to_hidden('mlp_in'), axes.ACT_TxM), 'mlp_hidden')
    if self.mlp == 'swiglu':  # (SiLU(x W_gate) * x W_in) W_out, as in Llama.
      gate_TxM = axes.constrain(to_hidden('mlp_gate'), axes.ACT_TxM)
      h_TxM = nn.silu(gate_TxM) * h_TxM
    else:
      h_TxM = nn.gelu(h_TxM)
    h_TxE = _plus(nn.Dense(
        width, **dense, name='mlp_out',
        kernel_init=axes.logical(nn.initializers.normal(self.out_std), axes.MLP_OUT_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.EMBED_NORM))(h_TxM),
        lora_delta(self, 'mlp_out', h_TxM, ('mlp',), (width,), ('embed',)))
    h_BxLxE = h_TxE.reshape(batch, length, width)
    x_BxLxE = x_BxLxE + nn.Dropout(self.dropout, deterministic=self.deterministic)(h_BxLxE)
    return axes.constrain(x_BxLxE, axes.ACT_BxLxE), None


def _blocks(m: nn.Module, x_BxLxE: jax.Array, positions_L: jax.Array, *, causal: bool,
            decode: bool, train: bool, segments_BxL: jax.Array | None = None) -> jax.Array:
  """Runs `m.depth` blocks configured from `m`'s attributes (call inside a compact method)."""
  block_cls = Block
  if remat_name(m.remat) != 'none':
    # CSE prevention is unnecessary (and costly) inside a scan.
    block_cls = nn.remat(Block, prevent_cse=not m.scan_layers, policy=remat_policy(m.remat))
  block = dict(
      heads=m.heads, mlp_dim=mlp_width(m.width, m.mlp_ratio, m.mlp_dim), max_len=m.max_len,
      pos=m.pos,
      causal=causal, attention=m.attention, heads_major=m.heads_major, dropout=m.dropout,
      deterministic=not train, kv_heads=m.kv_heads, mlp=m.mlp, use_bias=m.use_bias,
      rope_theta=m.rope_theta, norm_eps=m.norm_eps, norm=m.norm,
      lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_targets=m.lora_targets,
      decode=decode, init_std=m.init_std,
      # GPT-2: residual-output projections scaled by 1/sqrt(number of residual additions).
      out_std=m.init_std / math.sqrt(2 * m.depth), dtype=m.dtype, param_dtype=m.param_dtype)
  if m.scan_layers:
    stack = nn.scan(
        block_cls, variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast, nn.broadcast),
        length=m.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BxLxE, _ = stack(**block, name='blocks')(x_BxLxE, positions_L, segments_BxL)
    return x_BxLxE
  for i in range(m.depth):
    x_BxLxE, _ = block_cls(**block, name=f'block{i}')(x_BxLxE, positions_L, segments_BxL)
  return x_BxLxE


def _add_positions(m: nn.Module, x_BxLxE: jax.Array, positions_L: jax.Array) -> jax.Array:
  """Adds learned position embeddings when `m.pos == 'learned'` (RoPE acts in attention)."""
  if m.pos != 'learned':
    return x_BxLxE
  table = nn.Embed(
      m.max_len, m.width, dtype=m.dtype, param_dtype=m.param_dtype, name='pos_embed',
      embedding_init=axes.logical(nn.initializers.normal(m.init_std), POS_TABLE))
  table_LxE = table(positions_L)
  return x_BxLxE + (table_LxE if table_LxE.ndim == 3 else table_LxE[None])


class TransformerLM(nn.Module):
  """Decoder-only LM: token (+ learned position) embedding, causal blocks, norm, logits."""

  vocab_size: int = 256
  width: int = 512
  depth: int = 8
  heads: int = 8
  mlp_ratio: int | float = 4
  mlp_dim: int = 0  # > 0: the MLP's hidden units, whatever mlp_ratio says.
  max_len: int = 1024
  pos: str = 'rope'
  dropout: float = 0.0
  attention: str = 'xla'  # 'xla', 'cudnn' or 'auto' (cuDNN where it applies).
  heads_major: bool = False  # Heads-major attention (kernels.attention, the CPU fast path).
  remat: str = 'none'  # What a block keeps for the backward pass: REMAT_POLICIES.
  scan_layers: bool = False  # nn.scan over blocks; params gain a leading 'layers' axis.
  kv_heads: int = 0  # Key/value heads (grouped-query attention); 0: one per query head.
  mlp: str = 'gelu'  # MLPS.
  use_bias: bool = False  # Biases in the attention and MLP projections.
  rope_theta: float = ROPE_BASE  # RoPE's base wavelength.
  norm_eps: float = 1e-6  # The norms' epsilon.
  norm: str = 'rms'  # NORMS.
  lora_rank: int = 0  # LoRA adapters (lora.*): rank, scale alpha / rank, LORA_TARGETS.
  lora_alpha: float = 16.0
  lora_targets: tuple = ()
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False  # Use and advance the KV cache; see the module docstring.
  # > 0: return the final hidden states and the logits table instead of logits, for a loss
  # that computes them this many positions at a time (losses.chunked_cross_entropy).
  logits_chunk: int = 0
  # >= 0: rows are packed documents, each ended by this token (data.pack). A position
  # attends only to its own document and positions restart at each; the end token begins
  # the next document, as a BOS would. Not in decode mode: `generate` samples one document.
  doc_eos: int = -1

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, train: bool) -> jax.Array | dict:
    """Returns float32 logits_BxLxV for int tokens_BxL (in decode mode, the next chunk), or
    with `logits_chunk` {'hidden': x_BxLxE, 'table': VxE} for the loss.

    In decode mode the positions are cache_index + arange(L) and cache_index advances by L;
    a chunk that would run past max_len yields NaN logits (the index is traced, so this
    cannot raise).
    """
    _check_attributes(self)
    length = tokens_BxL.shape[1]
    _check_length(length, self.max_len)
    positions_L = np.arange(length, dtype=np.int32)  # numpy: constant RoPE tables.
    in_range = True
    if self.decode:
      # On `init` the index is created at 0 and left there.
      use_cache = self.has_variable('cache', 'cache_index')
      index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      if use_cache:
        start = index.value
        positions_L = start + positions_L
        index.value = start + length
        in_range = start + length <= self.max_len
    segments_BxL = None
    if self.doc_eos >= 0 and not self.decode:
      positions_L, segments_BxL = documents(tokens_BxL, self.doc_eos)

    embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=axes.logical(nn.initializers.normal(self.init_std), axes.EMBED_TABLE),
        name='embed')
    x_BxLxE = _add_positions(self, axes.lookup(embed, tokens_BxL), positions_L)
    x_BxLxE = axes.constrain(x_BxLxE, axes.ACT_BxLxE)
    x_BxLxE = nn.Dropout(self.dropout, deterministic=not train)(x_BxLxE)
    x_BxLxE = _blocks(self, x_BxLxE, positions_L, causal=True, decode=self.decode, train=train,
                      segments_BxL=segments_BxL)
    x_BxLxE = _rms_norm(x_BxLxE, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='final_norm', eps=self.norm_eps, kind=self.norm)
    if self.logits_chunk and not self.decode:  # The loss makes the logits chunk by chunk.
      table_VxE = (embed.embedding if self.tie_embeddings else
                   inits.LogitsKernel(
                       self.vocab_size, self.param_dtype, name='logits',
                       init=axes.logical(nn.initializers.normal(self.init_std),
                                         axes.LOGITS_KERNEL))(self.width).T)
      return {'hidden': x_BxLxE, 'table': table_VxE.astype(self.dtype)}
    # Compute-dtype inputs, float32 accumulation and output: bf16-rounded logits would cost
    # the loss about two significant digits.
    if self.tie_embeddings:
      table_VxE = embed.embedding.astype(self.dtype)
      logits_BxLxV = matmul.einsum_f32('ble,ve->blv', x_BxLxE, table_VxE)
    else:
      logits_BxLxV = nn.Dense(
          self.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          dot_general=matmul.dot_general_f32, name='logits',
          kernel_init=axes.logical(nn.initializers.normal(self.init_std),
                                   axes.LOGITS_KERNEL))(x_BxLxE)
    logits_BxLxV = axes.constrain(logits_BxLxV.astype(jnp.float32), axes.ACT_BxLxV)
    if self.decode:
      logits_BxLxV = jnp.where(in_range, logits_BxLxV, jnp.nan)
    return logits_BxLxV


class TransformerClassifier(nn.Module):
  """Encoder (non-causal blocks) over tokens or float rows; mean-pool, norm, dense head.

  With vocab_size > 0 the input is int tokens_BxL; with vocab_size == 0 it is float x_BxLxF,
  or images x_BxHxWxC read as a sequence of H rows of W*C features.
  """

  num_outputs: int
  vocab_size: int = 0
  width: int = 256
  depth: int = 4
  heads: int = 4
  mlp_ratio: int | float = 4
  mlp_dim: int = 0  # > 0: the MLP's hidden units, whatever mlp_ratio says.
  max_len: int = 256
  pos: str = 'learned'
  dropout: float = 0.0
  attention: str = 'xla'
  heads_major: bool = False  # Heads-major attention (kernels.attention, the CPU fast path).
  remat: str = 'none'
  scan_layers: bool = False
  kv_heads: int = 0
  mlp: str = 'gelu'
  use_bias: bool = False
  rope_theta: float = ROPE_BASE
  norm_eps: float = 1e-6
  norm: str = 'rms'
  lora_rank: int = 0  # LoRA adapters (lora.*): rank, scale alpha / rank, LORA_TARGETS.
  lora_alpha: float = 16.0
  lora_targets: tuple = ()
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 logits_BxK."""
    _check_attributes(self)
    if self.vocab_size:
      if x.ndim != 2:
        raise ValueError(f'TransformerClassifier with vocab_size > 0 takes int tokens (B, L), '
                         f'got shape {x.shape}')
      embed = nn.Embed(
          self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
          embedding_init=axes.logical(nn.initializers.normal(self.init_std),
                                      axes.EMBED_TABLE), name='embed')
      x_BxLxE = axes.lookup(embed, x)
    else:
      if x.ndim == 4:
        x = x.reshape(*x.shape[:2], -1)
      if x.ndim != 3:
        raise ValueError(f'TransformerClassifier with vocab_size 0 takes float (B, L, F) or '
                         f'(B, H, W, C) inputs, got shape {x.shape}')
      # std init_std / sqrt(F): unit-variance features get embeddings of std init_std, as
      # tokens do.
      x_BxLxE = nn.Dense(
          self.width, dtype=self.dtype, param_dtype=self.param_dtype, name='embed_in',
          kernel_init=axes.logical(
              nn.initializers.normal(self.init_std / math.sqrt(x.shape[-1])), INPUT_KERNEL),
          bias_init=axes.logical(nn.initializers.zeros_init(), INPUT_BIAS))(
              x.astype(self.dtype))
    length = x_BxLxE.shape[1]
    _check_length(length, self.max_len)
    positions_L = np.arange(length, dtype=np.int32)
    x_BxLxE = _add_positions(self, x_BxLxE, positions_L)
    x_BxLxE = nn.Dropout(self.dropout, deterministic=not train)(x_BxLxE)
    x_BxLxE = _blocks(self, x_BxLxE, positions_L, causal=False, decode=False, train=train)
    x_BxE = x_BxLxE.astype(jnp.float32).mean(axis=1)
    x_BxE = _rms_norm(x_BxE, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='final_norm', eps=self.norm_eps, kind=self.norm)
    logits_BxK = nn.Dense(
        self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype, name='out',
        kernel_init=axes.logical(nn.initializers.normal(self.init_std), axes.OUT_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.OUT_BIAS))(x_BxE)
    return logits_BxK.astype(jnp.float32)


# Named sizes; the tiny ones are for tests and CPU smoke runs.
TransformerLMTiny = partial(TransformerLM, width=32, depth=2, heads=4, max_len=64)
TransformerClassifierTiny = partial(TransformerClassifier, width=32, depth=2, heads=4, max_len=64)
