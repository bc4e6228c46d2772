"""Stacked LSTM and GRU: byte language models and sequence classifiers.

Each layer projects its inputs for all time steps at once, outside the time loop (one
matmul, B x L x G x N), so the loop over time (jaxbig/kernels/rnn_scan.py, with `fused_grad`
its hand-written gradient) only does the recurrent matmul h @ W_h and the gate math,
`cell_gates`. `step` runs one time step of the same math on its own.

Cells (gate order along the G axis as in PyTorch, so weights map over one to one):

  LSTM  [i, f, g, o]:  z = x W_x + b + h W_h;  c' = sig(f) c + sig(i) tanh(g);
                       h' = sig(o) tanh(c').  Forget-gate bias starts at 1.0.
  GRU   [r, z, n]:     the PyTorch / cuDNN form (Cho et al. 2014, v3 of the paper), with the
                       reset gate applied after the recurrent matmul:
                       r = sig(x W_xr + b_r + h W_hr);  u = sig(x W_xz + b_z + h W_hz);
                       n = tanh(x W_xn + b_n + r (h W_hn + b_hn));  h' = (1 - u) n + u h.
                       PyTorch's recurrent biases b_hr, b_hz are folded into b_r, b_z; only
                       b_hn (`recurrent_bias`) is separate.

Parameters of one layer, stored per gate so that tensor parallelism splits the hidden units
of every gate alike and the gate math needs no communication:

  input_kernel      (E, G, N)  (INPUT_KERNEL)       'embed' as for any layer input
  recurrent_kernel  (N, G, N)  (RECURRENT_KERNEL)   input side None: h is gathered each step
  input_bias        (G, N)     (GATE_BIAS)
  recurrent_bias    (N,)       ('mlp',), GRU only

Initialisation: `init_name`/`init_std` (see `init.initializer`; default 'lecun') for the
input kernels and the output layer, with fans of the flat (E, G*N) matrix; recurrent kernels
orthogonal per gate (as flax's LSTMCell); embedding normal with std 1/sqrt(E) (flax's
nn.Embed default); biases zero, except the LSTM forget gate.

Precision: matmuls in `dtype`; the recurrent matmul accumulates in float32 and the gate math
and carries are float32; layer outputs are in `dtype`, logits float32.

Sequences have no padding mask: every example is read to its full length L.

Shape letters: B batch, L sequence length, T decode chunk length, E layer input features,
N hidden units, G gates (4 LSTM, 3 GRU), V vocabulary, K outputs, F float input features,
H height, W width, C channels.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxbig.kernels import rnn_scan
from jaxbig import matmul
from jaxbig.models import axes, init as inits

CELLS = ('lstm', 'gru')
POOLS = ('last', 'mean')
_GATES = {'lstm': 4, 'gru': 3}
# What a layer carries from step to step: LSTM cell state c and output h; GRU only h.
CARRY_KEYS = {'lstm': ('c', 'h'), 'gru': ('h',)}

INPUT_KERNEL = ('embed', None, 'mlp')
RECURRENT_KERNEL = (None, None, 'mlp')
GATE_BIAS = (None, 'mlp')
RECURRENT_BIAS = ('mlp',)
LM_LOGITS_KERNEL = axes.LOGITS_KERNEL


def _check_cell(cell: str) -> None:
  if cell not in CELLS:
    raise ValueError(f"model.cell: unknown cell '{cell}'; choose from {', '.join(CELLS)}")


def zero_carry(cell: str, batch: int, hidden: int) -> dict[str, jax.Array]:
  """The initial carry of one layer: float32 zeros_BxN under each of CARRY_KEYS[cell]."""
  _check_cell(cell)
  return {k: jnp.zeros((batch, hidden), jnp.float32) for k in CARRY_KEYS[cell]}


def project(params: dict, x_BxLxE: jax.Array, dtype: Any) -> jax.Array:
  """The input part of every gate for all time steps: zx_BxLxGxN = x W_x (`recur` adds b)."""
  return jnp.swapaxes(project_time_major(params, jnp.swapaxes(x_BxLxE, 0, 1), dtype), 0, 1)


def project_time_major(params: dict, x_LxBxE: jax.Array, dtype: Any) -> jax.Array:
  """`project` for time-major inputs: zx_LxBxGxN, one (L B, E) x (E, G N) matmul.

  Time-major, so the scan reads zx without a transpose of it (E is usually the smaller);
  on rows, as in the Transformer: XLA:CPU handles 4-d contractions' gradients slowly.
  """
  length, batch, features = x_LxBxE.shape
  w_ExGxN = params['input_kernel'].astype(dtype)
  zx_RxGN = jnp.dot(x_LxBxE.reshape(length * batch, features).astype(dtype),
                    w_ExGxN.reshape(features, -1))
  return zx_RxGN.reshape(length, batch, *w_ExGxN.shape[1:])


def recur(cell: str, params: dict, carry: dict, zx_BxGxN: jax.Array,
          dtype: Any) -> tuple[dict, jax.Array]:
  """One time step given the projected input x W_x: returns (new carry, float32 h_BxN).

  The input bias is added here, in the step's float32 gate math, not to all of zx at once:
  one pass less over the (L, B, G, N) projections.
  """
  _check_cell(cell)
  new, _ = cell_gates(cell, params, carry, zx_BxGxN, dtype)
  return new, new['h']


def cell_gates(cell: str, params: dict, carry: dict, zx_BxGxN: jax.Array, dtype: Any):
  """One step's new carry and what its gradient needs, float32 (B, N) arrays: the LSTM's
  gates i, f, g, o and its c; the GRU's r, u, n and hn (h W_hn + b_hn).

  Separate arrays, not one (B, G, N) block: XLA:CPU reads a gate's rows of one time step of
  an (L, B, G, N) residual several times slower than a whole (L, B, N) step, and the
  hand-written backward loop (kernels/rnn_scan.py) reads them all.
  """
  zh_BxGxN = matmul.einsum_f32('bn,ngm->bgm', carry['h'].astype(dtype),
                               params['recurrent_kernel'].astype(dtype))
  zx_BxGxN = zx_BxGxN.astype(jnp.float32) + params['input_bias'].astype(jnp.float32)
  if cell == 'lstm':
    acts_BxGxN = _lstm_acts(zx_BxGxN + zh_BxGxN)
    i, f, g, o = (acts_BxGxN[:, k] for k in range(4))
    c_BxN = f * carry['c'] + i * g
    h_BxN = o * jnp.tanh(c_BxN)
    return {'c': c_BxN, 'h': h_BxN}, (i, f, g, o, c_BxN)
  ru_Bx2xN = nn.sigmoid(zx_BxGxN[:, :2] + zh_BxGxN[:, :2])  # One pass, as _lstm_acts.
  r, u = ru_Bx2xN[:, 0], ru_Bx2xN[:, 1]
  hn_BxN = zh_BxGxN[:, 2] + params['recurrent_bias'].astype(jnp.float32)
  n = jnp.tanh(zx_BxGxN[:, 2] + r * hn_BxN)
  h_BxN = (1.0 - u) * n + u * carry['h']
  return {'h': h_BxN}, (r, u, n, hn_BxN)


# The LSTM's gate g is a tanh, the other three sigmoids: sig(z) = (1 + tanh(z / 2)) / 2.
_IS_G_Gx1 = (jnp.arange(4) == 2)[:, None]


def _lstm_acts(z_BxGxN: jax.Array) -> jax.Array:
  """[sig(i), sig(f), tanh(g), sig(o)] as one tanh over all four gates.

  One pass over the whole (B, G, N) block: XLA:CPU is several times slower on the four
  strided gate slices (tests/test_rnn.py checks the values against sigmoid and tanh).
  """
  t_BxGxN = jnp.tanh(jnp.where(_IS_G_Gx1, z_BxGxN, 0.5 * z_BxGxN))
  return jnp.where(_IS_G_Gx1, t_BxGxN, 0.5 * t_BxGxN + 0.5)


def step(cell: str, params: dict, carry: dict, x_BxE: jax.Array,
         dtype: Any = jnp.float32) -> tuple[dict, jax.Array]:
  """One time step of a layer with its `params` (unboxed): returns (new carry, h_BxN)."""
  zx_BxGxN = project(params, x_BxE[:, None], dtype)[:, 0]
  return recur(cell, params, carry, zx_BxGxN, dtype)


def _gate_kernel_init(base: jax.nn.initializers.Initializer) -> jax.nn.initializers.Initializer:
  """`base` applied to the flat (in, G*N) matrix, so fans are those of one dense layer."""

  def init(key, shape, dtype=jnp.float32):
    return base(key, (shape[0], shape[1] * shape[2]), dtype).reshape(shape)

  return init


def _orthogonal_per_gate(key, shape, dtype=jnp.float32):
  """An independent orthogonal N x N matrix for every gate of a (N, G, N) kernel."""
  n, gates, m = shape
  orth = lambda k: jax.nn.initializers.orthogonal()(k, (n, m), dtype)
  # One QR in a loop over the gates (vmap's bits): jaxlib's batched CPU QR waits on the
  # intra-op thread pool, so two at once (a deep or bidirectional net) can hang the init.
  return jnp.swapaxes(jax.lax.map(orth, jax.random.split(key, gates)), 0, 1)


def _gate_bias_init(cell: str):
  """Zeros, except 1.0 for the LSTM forget gate (so early training remembers)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    bias = jnp.zeros(shape, dtype)
    return bias.at[1].set(1.0) if cell == 'lstm' else bias

  return init


class RNNLayer(nn.Module):
  """One recurrent layer (LSTM or GRU) scanned over time.

  Attributes:
    cell: 'lstm' or 'gru'.
    hidden: hidden units N.
    reverse: read the sequence from the end; output t then summarises x_t .. x_L.
    decode: keep the carry in the 'cache' collection (see RNNLM).
  """

  cell: str
  hidden: int
  reverse: bool = False
  decode: bool = False
  fused_grad: bool = False  # The hand-written backward loop (kernels.rnn_grad, CPU fast path).
  init_name: str = 'lecun'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE: jax.Array, carry: dict | None = None, *,
               table_VxE: jax.Array | None = None) -> tuple[dict, jax.Array]:
    """Returns (final float32 carry, y_BxLxN in `dtype`); `carry` defaults to zeros.

    With an embedding `table_VxE`, x is int tokens_BxL: the layer's input is then
    table[tokens], and the embedding is folded into the input projection, whose rows
    (table W_x, V x G x N) are gathered by token. The same values, several times faster on
    XLA:CPU with gradients.
    """
    _check_cell(self.cell)
    if table_VxE is None:
      batch, _, features = x_BxLxE.shape
    else:
      batch, features = x_BxLxE.shape[0], table_VxE.shape[1]
    gates, n = _GATES[self.cell], self.hidden
    kernel_init = _gate_kernel_init(inits.initializer(self.init_name, self.init_std))
    params = {
        'input_kernel': self.param(
            'input_kernel', axes.logical(kernel_init, INPUT_KERNEL), (features, gates, n),
            self.param_dtype),
        'recurrent_kernel': self.param(
            'recurrent_kernel', axes.logical(_orthogonal_per_gate, RECURRENT_KERNEL),
            (n, gates, n), self.param_dtype),
        'input_bias': self.param(
            'input_bias', axes.logical(_gate_bias_init(self.cell), GATE_BIAS), (gates, n),
            self.param_dtype),
    }
    if self.cell == 'gru':
      params['recurrent_bias'] = self.param(
          'recurrent_bias', axes.logical(nn.initializers.zeros_init(), RECURRENT_BIAS), (n,),
          self.param_dtype)

    cache = None
    if self.decode:
      if carry is not None or self.reverse:
        raise ValueError('RNNLayer: decode keeps its own carry and reads forwards only')
      cache = {k: self.variable('cache', k, jnp.zeros, (batch, n), jnp.float32)
               for k in CARRY_KEYS[self.cell]}
      carry = {k: v.value for k, v in cache.items()}
      if carry['h'].shape[0] != batch:
        raise ValueError(f"RNNLayer: the cache holds batch {carry['h'].shape[0]}, the input "
                         f'has {batch}; init the cache with the decoding batch size')
    elif carry is None:
      carry = zero_carry(self.cell, batch, n)

    if table_VxE is None:
      zx_LxBxGxN = project_time_major(params, jnp.swapaxes(x_BxLxE, 0, 1), self.dtype)
    else:
      rows_VxGxN = project_time_major(params, table_VxE[None], self.dtype)[0]
      zx_LxBxGxN = jnp.take(rows_VxGxN, x_BxLxE.T, axis=0)
    zx_LxBxGxN = axes.constrain(zx_LxBxGxN, ('length', 'batch', None, 'mlp'))
    recurrent = {k: v for k, v in params.items() if k != 'input_kernel'}
    scan = rnn_scan.fused_scan if self.fused_grad else rnn_scan.scan
    carry, h_LxBxN = scan(cell_gates, self.cell, self.dtype, self.reverse, recurrent, carry,
                          zx_LxBxGxN)
    # init builds an empty cache: the carry after the dummy init input must not leak into it.
    if cache is not None and not self.is_initializing():
      for k, v in cache.items():
        v.value = carry[k]
    y_BxLxN = jnp.swapaxes(h_LxBxN, 0, 1).astype(self.dtype)
    return carry, axes.constrain(y_BxLxN, axes.ACT_BxLxM)


def _embed(vocab_size: int, features: int, dtype: Any, param_dtype: Any) -> nn.Embed:
  """Token embedding with std 1/sqrt(features) (flax's nn.Embed default) and EMBED_TABLE names."""
  table_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)
  return nn.Embed(vocab_size, features, dtype=dtype, param_dtype=param_dtype,
                  embedding_init=axes.logical(table_init, axes.EMBED_TABLE), name='embed')


class RNNLM(nn.Module):
  """Byte/token language model: embed -> `depth` recurrent layers -> dense to the vocabulary.

  Dropout (rate `dropout`, train only) acts on the output of every layer, so between layers
  and before the logits (the non-recurrent connections, Zaremba et al. 2014).

  Decoding (`decode=True`): the carry of layer i lives in the 'cache' collection as
  cache['layer_i'] = {'c': float32_BxN, 'h': float32_BxN} (LSTM) or {'h': ...} (GRU).
  `init` with tokens_BxL of the decoding batch size B creates zero carries (whatever the
  tokens); `apply(..., mutable=['cache'])` on a chunk_BxT continues from the cached carries
  and stores the carries after the chunk's last token. Generate by feeding the prompt as one
  chunk, then one token at a time.

  Attributes:
    vocab_size: V (256 for bytes).
    cell: 'lstm' or 'gru'.
    hidden: hidden units N of every layer.
    depth: number of stacked layers.
    embed_dim: embedding width; 0 means `hidden`.
    tie_embeddings: logits from the embedding table (needs embed_dim == hidden), else from
      a separate (N, V) kernel 'logits' (LOGITS_KERNEL). Neither has a bias.
  """

  vocab_size: int
  cell: str = 'lstm'
  hidden: int = 512
  depth: int = 1
  embed_dim: int = 0
  dropout: float = 0.0
  fused_grad: bool = False  # The hand-written backward loop (kernels.rnn_grad, CPU fast path).
  # Not `init`: that would shadow nn.Module.init.
  init_name: str = 'lecun'
  init_std: float = 0.02
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False
  # > 0: return the last layer's outputs and the logits table instead of logits, for a
  # loss that makes them this many positions at a time (losses.chunked_cross_entropy).
  logits_chunk: int = 0

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, train: bool) -> jax.Array | dict:
    """Returns float32 logits_BxLxV (logits t predict token t + 1), or with `logits_chunk`
    {'hidden': x_BxLxN, 'table': VxN} for the loss."""
    _check_cell(self.cell)
    embed_dim = self.embed_dim or self.hidden
    if self.tie_embeddings and embed_dim != self.hidden:
      raise ValueError(f'model.tie_embeddings needs embed_dim == hidden, got {embed_dim} and '
                       f'{self.hidden}')
    embed = _embed(self.vocab_size, embed_dim, self.dtype, self.param_dtype)
    # The first layer reads the tokens and the table: it folds the lookup into its input
    # projection (see RNNLayer).
    x, table_VxE = tokens_BxL, axes.constrain(embed.embedding, ('vocab', 'act_embed'))
    for i in range(self.depth):
      _, x = RNNLayer(
          self.cell, self.hidden, decode=self.decode, fused_grad=self.fused_grad,
          init_name=self.init_name,
          init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
          name=f'layer_{i}')(x, table_VxE=table_VxE if i == 0 else None)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.logits_chunk and not self.decode:
      table_VxN = (embed.embedding if self.tie_embeddings else inits.LogitsKernel(
          self.vocab_size, self.param_dtype, name='logits',
          init=axes.logical(inits.initializer(self.init_name, self.init_std),
                            LM_LOGITS_KERNEL))(self.hidden).T)
      return {'hidden': x, 'table': table_VxN.astype(self.dtype)}
    if self.tie_embeddings:
      logits_BxLxV = embed.attend(x)
    else:
      logits_BxLxV = nn.Dense(
          self.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=axes.logical(inits.initializer(self.init_name, self.init_std),
                                   LM_LOGITS_KERNEL), name='logits')(x)
    return logits_BxLxV.astype(jnp.float32)


class RNNClassifier(nn.Module):
  """Sequence classifier: `depth` recurrent layers, pooled over time, dense to K outputs.

  Inputs: int tokens_BxL when vocab_size > 0 (embedded); else float x_BxLxF, used as they
  are, or images x_BxHxWxC read row by row as a sequence of H steps of W*C features.

  Bidirectional: every layer i also runs a second layer 'layer_i_reverse' over the reversed
  sequence; its outputs, aligned to positions, are concatenated to the forward ones
  (2N features), which are the input of the next layer and of the pooling.

  Pooling: 'last' takes the final state of each direction (forward at position L, reverse at
  position 1); 'mean' averages all outputs over time. Dropout (train only) acts on every
  layer's output, so between layers and before the head.

  Attributes:
    num_outputs: K.
    vocab_size: V for token inputs; 0 for float inputs.
    cell: 'lstm' or 'gru'.
    hidden: hidden units N per direction.
    depth: number of stacked layers.
    bidirectional: add the reverse direction.
    pool: 'last' or 'mean'.
    embed_dim: embedding width for token inputs; 0 means `hidden`.
  """

  num_outputs: int
  vocab_size: int = 0
  cell: str = 'lstm'
  hidden: int = 128
  depth: int = 1
  bidirectional: bool = False
  pool: str = 'last'
  embed_dim: int = 0
  dropout: float = 0.0
  fused_grad: bool = False  # The hand-written backward loop (kernels.rnn_grad, CPU fast path).
  init_name: str = 'lecun'
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _inputs(self, x: jax.Array) -> jax.Array:
    """x_BxLxE in `dtype` from tokens, float sequences or images."""
    if self.vocab_size:
      if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f'RNNClassifier: vocab_size={self.vocab_size} needs int tokens (B, L), '
                         f'got {x.dtype} {x.shape}')
      return axes.lookup(_embed(self.vocab_size, self.embed_dim or self.hidden, self.dtype,
                                self.param_dtype), x)
    if x.ndim == 4:
      x = x.reshape(x.shape[0], x.shape[1], -1)
    if x.ndim != 3:
      raise ValueError('RNNClassifier: float inputs must be sequences (B, L, F) or images '
                       f'(B, H, W, C), got {x.shape}; for tokens set vocab_size')
    return x.astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns float32 logits_BxK for tokens_BxL, x_BxLxF or x_BxHxWxC."""
    _check_cell(self.cell)
    if self.pool not in POOLS:
      raise ValueError(f"model.pool: unknown pool '{self.pool}'; choose from {', '.join(POOLS)}")
    layer = lambda reverse, name: RNNLayer(
        self.cell, self.hidden, reverse=reverse, fused_grad=self.fused_grad,
        init_name=self.init_name,
        init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = self._inputs(x)
    for i in range(self.depth):
      _, fwd_BxLxN = layer(False, f'layer_{i}')(x)
      if self.bidirectional:
        _, back_BxLxN = layer(True, f'layer_{i}_reverse')(x)
        fwd_BxLxN = jnp.concatenate([fwd_BxLxN, back_BxLxN], axis=-1)
      x = fwd_BxLxN
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.pool == 'mean':
      pooled = x.astype(jnp.float32).mean(axis=1)
    elif self.bidirectional:
      pooled = jnp.concatenate([x[:, -1, :self.hidden], x[:, 0, self.hidden:]], axis=-1)
    else:
      pooled = x[:, -1]
    logits_BxK = nn.Dense(
        self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=axes.logical(inits.initializer(self.init_name, self.init_std),
                                 axes.OUT_KERNEL),
        bias_init=axes.logical(nn.initializers.zeros_init(), axes.OUT_BIAS),
        name='out')(pooled)
    return logits_BxK.astype(jnp.float32)
