"""Tests for jaxbig.models.rnn: the scanned cells, LM causality and decoding, classifiers.

Shape letters: B batch, L sequence length, E input features, N hidden units, V vocabulary,
K outputs.
"""

from functools import partial
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from jaxbig import sharding
from jaxbig.kernels import rnn_scan
from jaxbig.models import rnn

B, L, E, N, V, K = 3, 7, 5, 8, 16, 4
CELLS = rnn.CELLS

# XLA's CPU backend spends longer optimising these tiny graphs than running them.
_FAST = {'xla_backend_optimization_level': 0}
_jit_fn = partial(jax.jit, compiler_options=_FAST)


@partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST)
def _init_jit(model: nn.Module, static: tuple, *args):
  return model.init(jax.random.key(0), *args, **dict(static))


@partial(jax.jit, static_argnums=(0, 1), compiler_options=_FAST)
def _apply_jit(model: nn.Module, static: tuple, variables: dict, *args, rngs=None):
  return model.apply(variables, *args, rngs=rngs, **dict(static))


def _init(model: nn.Module, *args, **static) -> dict:
  """model.init, jitted once per (model, static keywords, shapes)."""
  return _init_jit(model, tuple(sorted(static.items())), *args)


def _apply(model: nn.Module, variables: dict, *args, rngs=None, **static):
  """model.apply, jitted once per (model, static keywords, shapes)."""
  return _apply_jit(model, tuple(sorted(static.items())), variables, *args, rngs=rngs)


def _tokens(shape=(B, L), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _floats(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


# --- One layer -------------------------------------------------------------------------


@pytest.mark.parametrize('cell', CELLS)
def test_scanned_layer_equals_python_loop_over_step(cell):
  layer = rnn.RNNLayer(cell, N)
  x_BxLxE = _floats((B, L, E))
  # A non-zero initial carry, so the carry path is tested too.
  carry0 = {k: _floats((B, N), seed=i + 1) for i, k in enumerate(rnn.CARRY_KEYS[cell])}
  variables = _init(layer, x_BxLxE, carry0)
  params = nn.unbox(variables)['params']
  carry, y_BxLxN = _apply(layer, variables, x_BxLxE, carry0)

  loop = jax.jit(partial(rnn.step, cell), compiler_options=_FAST)
  loop_carry, hs = carry0, []
  for t in range(L):
    loop_carry, h_BxN = loop(params, loop_carry, x_BxLxE[:, t])
    hs.append(h_BxN)
  np.testing.assert_allclose(y_BxLxN, np.stack(hs, axis=1), atol=1e-5)
  for k in rnn.CARRY_KEYS[cell]:
    np.testing.assert_allclose(carry[k], loop_carry[k], atol=1e-5)

  # Control: the comparison sees a small change of the recurrent weights.
  bumped = jax.tree.map(lambda p: p, variables)
  bumped['params']['recurrent_kernel'] = bumped['params']['recurrent_kernel'].replace_boxed(
      params['recurrent_kernel'] + 0.05)
  _, y_bumped = _apply(layer, bumped, x_BxLxE, carry0)
  assert not np.allclose(y_bumped, np.stack(hs, axis=1), atol=1e-3)


@pytest.mark.parametrize('cell', CELLS)
def test_step_follows_the_documented_equations(cell):
  """LSTM gates [i, f, g, o]; GRU [r, z, n] in the PyTorch form (reset after W_hn)."""
  layer = rnn.RNNLayer(cell, N)
  x_BxE = _floats((B, E))
  carry = {k: _floats((B, N), seed=i + 1) for i, k in enumerate(rnn.CARRY_KEYS[cell])}
  p = jax.tree.map(np.asarray, nn.unbox(_init(layer, x_BxE[:, None]))['params'])
  # Random biases: the zero/one initial values would hide a mixed-up gate order.
  p['input_bias'] = _floats(p['input_bias'].shape, seed=5)
  new, h_BxN = rnn.step(cell, p, carry, x_BxE)

  zx = np.einsum('be,egn->bgn', x_BxE, p['input_kernel']) + p['input_bias']
  zh = np.einsum('bn,ngm->bgm', carry['h'], p['recurrent_kernel'])
  if cell == 'lstm':
    i, f, g, o = (zx[:, k] + zh[:, k] for k in range(4))
    c = _sigmoid(f) * carry['c'] + _sigmoid(i) * np.tanh(g)
    want = _sigmoid(o) * np.tanh(c)
    np.testing.assert_allclose(new['c'], c, atol=1e-5)
  else:
    p['recurrent_bias'] = _floats((N,), seed=6)
    new, h_BxN = rnn.step(cell, p, carry, x_BxE)
    r = _sigmoid(zx[:, 0] + zh[:, 0])
    z = _sigmoid(zx[:, 1] + zh[:, 1])
    n = np.tanh(zx[:, 2] + r * (zh[:, 2] + p['recurrent_bias']))
    want = (1 - z) * n + z * carry['h']
  np.testing.assert_allclose(h_BxN, want, atol=1e-5)
  np.testing.assert_allclose(new['h'], want, atol=1e-5)


def test_lstm_forget_bias_starts_at_one_and_recurrent_kernels_are_orthogonal():
  p = nn.unbox(_init(rnn.RNNLayer('lstm', N), _floats((B, L, E))))['params']
  np.testing.assert_array_equal(p['input_bias'], np.stack([0., 1., 0., 0.])[:, None] * np.ones(N))
  for g in range(4):
    w = np.asarray(p['recurrent_kernel'][:, g])
    np.testing.assert_allclose(w.T @ w, np.eye(N), atol=1e-5)
  gru = nn.unbox(_init(rnn.RNNLayer('gru', N), _floats((B, L, E))))['params']
  np.testing.assert_array_equal(gru['input_bias'], np.zeros((3, N)))


def test_recurrent_init_runs_no_batched_qr():
  # jaxlib's CPU QR (0.10.2) runs a batch of matrices on the intra-op pool and waits there:
  # two batched QRs at once (a bidirectional depth-2 LSTM's init) hung 2-core machines.
  x_BxLxE = _floats((B, L, E))
  hlo = jax.jit(lambda x: rnn.RNNLayer('lstm', N).init(jax.random.key(0), x)).lower(
      x_BxLxE).as_text()
  batch_dims = re.findall(r'geqrf.*?num_batch_dims = "(\d+)"', hlo)
  assert batch_dims and set(batch_dims) == {'0'}, batch_dims
  w = nn.unbox(_init(rnn.RNNLayer('lstm', N), x_BxLxE))['params']['recurrent_kernel']
  assert not np.allclose(w[:, 0], w[:, 1], atol=1e-3)  # Each gate its own matrix.


def test_reverse_layer_reads_the_sequence_backwards():
  x_BxLxE = _floats((B, L, E))
  variables = _init(rnn.RNNLayer('lstm', N), x_BxLxE)
  _, fwd = _apply(rnn.RNNLayer('lstm', N), variables, x_BxLxE)
  _, back = _apply(rnn.RNNLayer('lstm', N, reverse=True), variables, x_BxLxE)
  _, fwd_of_flipped = _apply(rnn.RNNLayer('lstm', N), variables, x_BxLxE[:, ::-1])
  np.testing.assert_allclose(back, fwd_of_flipped[:, ::-1], atol=1e-6)
  assert not np.allclose(back, fwd, atol=1e-3)


# --- Language model --------------------------------------------------------------------


@pytest.mark.parametrize('cell', CELLS)
def test_lm_is_causal(cell):
  model = rnn.RNNLM(V, cell=cell, hidden=N, depth=2)
  tokens = _tokens()
  t = 3
  changed = tokens.copy()
  changed[:, t + 1:] = (tokens[:, t + 1:] + 1 + _tokens((B, L - t - 1), seed=1) % (V - 1)) % V
  variables = _init(model, tokens, train=False)
  logits = _apply(model, variables, tokens, train=False)
  logits_changed = _apply(model, variables, changed, train=False)
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits[:, :t + 1], logits_changed[:, :t + 1])
  for s in range(t + 1, L):
    assert not np.allclose(logits[:, s], logits_changed[:, s], atol=1e-4), s


@pytest.mark.parametrize('cell', CELLS)
def test_decode_prompt_then_one_token_at_a_time_equals_full_forward(cell):
  kw = dict(vocab_size=V, cell=cell, hidden=N, depth=2)
  tokens = _tokens()
  model = rnn.RNNLM(**kw, decode=True)
  # Non-zero init tokens: the cache must still start at zero.
  variables = _init(model, tokens, train=False)
  params, cache = variables['params'], variables['cache']
  full = _apply(rnn.RNNLM(**kw), {'params': params}, tokens, train=False)
  assert set(cache) == {'layer_0', 'layer_1'}
  for layer in cache.values():
    assert set(layer) == set(rnn.CARRY_KEYS[cell])
    for carry in layer.values():
      assert carry.shape == (B, N) and carry.dtype == jnp.float32
      np.testing.assert_array_equal(carry, 0)

  run = lambda c, chunk: _apply(model, {'params': params, 'cache': c}, chunk, train=False,
                                mutable=('cache',))
  prompt = 3
  logits, state = run(cache, tokens[:, :prompt])
  pieces = [logits]
  for t in range(prompt, L):
    logits, state = run(state['cache'], tokens[:, t:t + 1])
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)

  # Control: without the prompt's carries the next token's logits differ.
  fresh, _ = run(cache, tokens[:, prompt:prompt + 1])
  assert not np.allclose(fresh, full[:, prompt:prompt + 1], atol=1e-3)


def test_lm_tied_embeddings_have_no_logits_kernel():
  tokens = _tokens()
  shapes = lambda m: nn.unbox(jax.eval_shape(
      lambda x: m.init(jax.random.key(0), x, train=False), tokens))['params']
  untied = shapes(rnn.RNNLM(V, hidden=N))
  tied = shapes(rnn.RNNLM(V, hidden=N, tie_embeddings=True))
  assert untied['logits']['kernel'].shape == (N, V)
  assert 'logits' not in tied and tied['embed']['embedding'].shape == (V, N)
  with pytest.raises(ValueError, match='tie_embeddings'):
    shapes(rnn.RNNLM(V, hidden=N, embed_dim=4, tie_embeddings=True))


def test_lm_dropout_acts_only_in_training():
  model = rnn.RNNLM(V, hidden=N, depth=2, dropout=0.5)
  tokens = _tokens()
  variables = _init(model, tokens, train=False)
  rngs = {'dropout': jax.random.key(1)}
  eval_ = _apply(model, variables, tokens, train=False)
  train = _apply(model, variables, tokens, train=True, rngs=rngs)
  no_drop = _apply(rnn.RNNLM(V, hidden=N, depth=2), variables, tokens, train=True, rngs=rngs)
  assert not np.allclose(train, eval_, atol=1e-3)
  np.testing.assert_array_equal(no_drop, eval_)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  tokens = _tokens()
  f32 = rnn.RNNLM(V, cell='lstm', hidden=N, depth=2)
  bf16 = rnn.RNNLM(V, cell='lstm', hidden=N, depth=2, dtype=jnp.bfloat16)
  variables = _init(bf16, tokens, train=False)
  for p in jax.tree.leaves(nn.unbox(variables)):
    assert p.dtype == jnp.float32
  low = _apply(bf16, variables, tokens, train=False)
  high = _apply(f32, variables, tokens, train=False)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.05 * float(np.abs(high).max()))
  assert not np.array_equal(low, high)  # bf16 really computed something.


@pytest.mark.slow(reason='compiles recurrent scans and their gradients')
def test_lstm_lm_learns_a_repeating_byte_pattern():
  pattern = np.frombuffer(b'hello, world! ', np.uint8).astype(np.int32)
  stream = np.tile(pattern, 64)
  length, batch = 24, 8
  model = rnn.RNNLM(256, cell='lstm', hidden=32, embed_dim=16)
  params = _init(model, stream[None, :length], train=False)['params']
  opt = optax.adam(1e-2)

  def loss_fn(params, tokens_BxL):
    logits = model.apply({'params': params}, tokens_BxL[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt_state, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxL)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  opt_state, losses = opt.init(params), []
  for _ in range(100):
    starts = rng.integers(0, len(stream) - length, batch)
    batch_BxL = np.stack([stream[s:s + length] for s in starts])
    params, opt_state, loss = train_step(params, opt_state, batch_BxL)
    losses.append(loss)
  losses = np.asarray(losses)
  assert losses[0] > 0.9 * np.log(256)  # It started from chance.
  assert losses[-5:].mean() < 0.5, losses[-5:]


# --- Classifier ------------------------------------------------------------------------


@pytest.mark.slow(reason='compiles recurrent scans and their gradients')
def test_bidirectional_classifier_reads_both_ends_and_examples_independently():
  kw = dict(num_outputs=K, vocab_size=V, hidden=N, pool='last')
  bi = rnn.RNNClassifier(**kw, bidirectional=True)
  tokens = _tokens()
  variables = _init(bi, tokens, train=False)
  params = nn.unbox(variables)['params']
  assert set(params) == {'embed', 'layer_0', 'layer_0_reverse', 'out'}
  assert params['out']['kernel'].shape == (2 * N, K)
  uni = nn.unbox(_init(rnn.RNNClassifier(**kw), tokens, train=False))['params']
  assert set(uni) == {'embed', 'layer_0', 'out'}
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(params['layer_0_reverse']) == count(params['layer_0']) == count(uni['layer_0'])

  # Only the reverse half feeds the head: it holds the reverse state at position 1, which a
  # forward layer there could not have, as it would have read only the first token.
  kernel = variables['params']['out']['kernel']
  variables['params']['out']['kernel'] = kernel.replace_boxed(kernel.value.at[:N].set(0.0))
  run = lambda x: _apply(bi, variables, x, train=False)
  base = run(tokens)
  for pos in (0, L - 1):
    changed = tokens.copy()
    changed[:, pos] = (changed[:, pos] + 1) % V
    assert not np.allclose(run(changed), base, atol=1e-4), pos

  # Per example: new neighbours leave example 0 as it was, and do change themselves.
  neighbours = tokens.copy()
  neighbours[1:] = _tokens(seed=3)[1:]
  other = run(neighbours)
  np.testing.assert_allclose(other[0], base[0], atol=1e-6)
  assert not np.allclose(other[1:], base[1:], atol=1e-4)


@pytest.mark.parametrize('x,vocab,features,pool', [
    (_tokens(), V, N, 'last'),                 # Embedded to `hidden` features.
    (_floats((B, L, 6)), 0, 6, 'mean'),        # Float sequences as they are.
    (_floats((B, L, 5, 1)), 0, 5, 'last'),     # Images: rows as steps of W * C features.
    (_floats((B, L, 5, 2)), 0, 10, 'mean'),
])
def test_classifier_inputs_give_float32_logits(x, vocab, features, pool):
  model = rnn.RNNClassifier(K, vocab_size=vocab, cell='gru', hidden=N, depth=2,
                            bidirectional=True, pool=pool)
  variables = _init(model, x, train=False)
  params = nn.unbox(variables)['params']
  assert params['layer_0']['input_kernel'].shape == (features, 3, N)
  assert params['layer_1']['input_kernel'].shape == (2 * N, 3, N)
  assert ('embed' in params) == bool(vocab)
  logits_BxK = _apply(model, variables, x, train=False)
  assert logits_BxK.shape == (B, K) and logits_BxK.dtype == jnp.float32
  assert np.isfinite(logits_BxK).all()


def test_classifier_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match='int tokens'):
    rnn.RNNClassifier(K, vocab_size=V, hidden=N).init(
        jax.random.key(0), _floats((B, L, 3)), train=False)
  with pytest.raises(ValueError, match='float inputs'):
    rnn.RNNClassifier(K, hidden=N).init(jax.random.key(0), _floats((B, L)), train=False)
  with pytest.raises(ValueError, match="unknown cell 'rnn'"):
    rnn.RNNClassifier(K, cell='rnn', hidden=N).init(
        jax.random.key(0), _floats((B, L, 3)), train=False)


# --- Logical names ---------------------------------------------------------------------


def _boxes(model: nn.Module, x, **kw) -> list:
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kw), x)
  return jax.tree.leaves(variables['params'], is_leaf=lambda l: isinstance(l, nn.Partitioned))


def _check_names(boxes: list) -> None:
  rules = dict(sharding.RULES)
  for box in boxes:
    assert isinstance(box, nn.Partitioned), f'unboxed parameter {box}'
    assert len(box.names) == box.value.ndim, f'{box.names} for {box.value.shape}'
    assert all(n is None or n in rules for n in box.names), box.names


@pytest.mark.parametrize('model,x', [
    (rnn.RNNLM(V, cell='lstm', hidden=N, depth=2), _tokens()),
    (rnn.RNNLM(V, cell='gru', hidden=N, tie_embeddings=True, decode=True), _tokens()),
    (rnn.RNNClassifier(K, vocab_size=V, cell='gru', hidden=N, bidirectional=True), _tokens()),
    (rnn.RNNClassifier(K, cell='lstm', hidden=N, depth=2), _floats((B, L, 5, 1))),
])
def test_every_parameter_carries_logical_names(model, x):
  boxes = _boxes(model, x, train=False)
  assert len(boxes) >= 4
  _check_names(boxes)


def test_name_check_catches_an_unboxed_parameter():
  with pytest.raises(AssertionError, match='unboxed'):
    _check_names(_boxes(nn.Dense(3), _floats((B, 2))))


# --- The hand-written gradient of the recurrence ----------------------------------------


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.slow(reason='compiles recurrent scans and their gradients')
def test_fused_scan_matches_autodiff_of_the_plain_scan(cell, dtype):
  """fused_scan (custom gradient) against autodiff of `scan`: outputs and every gradient,
  both directions, on random inputs; the cotangents reach the final carry too."""
  gates = rnn._GATES[cell]
  rng = np.random.default_rng(1)
  params = {'recurrent_kernel': jnp.asarray(0.5 * rng.standard_normal((N, gates, N)),
                                            jnp.float32),
            'input_bias': jnp.asarray(rng.standard_normal((gates, N)), jnp.float32)}
  if cell == 'gru':
    params['recurrent_bias'] = jnp.asarray(rng.standard_normal(N), jnp.float32)
  carry = {k: jnp.asarray(rng.standard_normal((B, N)), jnp.float32)
           for k in rnn.CARRY_KEYS[cell]}
  zx_LxBxGxN = jnp.asarray(rng.standard_normal((L, B, gates, N)), dtype)
  dy_LxBxN = jnp.asarray(rng.standard_normal((L, B, N)), jnp.float32)

  @_jit_fn
  def run(params, carry, zx):
    out = {}
    for name, fn in (('plain', rnn_scan.scan), ('fused', rnn_scan.fused_scan)):
      for reverse in (False, True):
        def loss(p, c, z):
          final, h = fn(rnn.cell_gates, cell, dtype, reverse, p, c, z)
          return (h * dy_LxBxN).sum() + sum((v * (k + 2.0)).sum()
                                            for k, v in enumerate(jax.tree.leaves(final)))
        out[name, reverse] = jax.value_and_grad(loss, argnums=(0, 1, 2))(params, carry, zx)
    return out

  with jax.default_matmul_precision('highest'):
    out = run(params, carry, zx_LxBxGxN)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for reverse in (False, True):
    plain, fused = out['plain', reverse], out['fused', reverse]
    np.testing.assert_allclose(fused[0], plain[0], rtol=tol)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(fused[1])):
      assert a.dtype == b.dtype
      scale = float(jnp.abs(a.astype(jnp.float32)).max())
      np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                 atol=tol * scale)
  # The direction matters, so the comparison above can tell one from the other.
  assert abs(float(out['plain', True][0] - out['plain', False][0])) > 1e-2



@pytest.mark.parametrize('cell', CELLS)
def test_embedding_folded_into_the_input_projection_equals_lookup_then_layer(cell):
  """RNNLayer(tokens, table_VxE=table) (the LM's first layer: rows table W_x gathered by
  token) against the plain path, table[tokens] into the layer: outputs and the gradients of
  the layer's parameters and of the table."""
  layer = rnn.RNNLayer(cell, N)
  table = jnp.asarray(_floats((V, E), seed=3))
  tokens = jnp.asarray(_tokens())
  params = nn.unbox(_init(layer, jnp.take(table, tokens, axis=0)))['params']
  g = jnp.asarray(_floats((B, L, N), seed=4))

  @_jit_fn
  def run(params, table):
    folded = lambda p, t: layer.apply({'params': p}, tokens, table_VxE=t)[1]
    plain = lambda p, t: layer.apply({'params': p}, jnp.take(t, tokens, axis=0))[1]
    return [jax.value_and_grad(lambda p, t: (f(p, t) * g).sum(), argnums=(0, 1))(params, table)
            for f in (folded, plain)]

  with jax.default_matmul_precision('highest'):
    (value, grads), (ref_value, ref_grads) = run(params, table)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())
  # The table's gradient reaches only the rows of tokens that occur.
  unused = np.setdiff1d(np.arange(V), np.asarray(tokens))
  assert len(unused) and not np.asarray(grads[1])[unused].any() and np.asarray(grads[1]).any()


def test_lstm_gate_activations_are_sigmoids_and_a_tanh_far_into_the_tails():
  """`_lstm_acts` computes all four gates with one tanh: it must equal sigmoid for i, f, o
  and tanh for g, including where the sigmoid saturates."""
  z_BxGxN = jnp.asarray(np.linspace(-30.0, 30.0, 4 * 4 * 301).reshape(4, 4, 301), jnp.float32)
  acts = np.asarray(rnn._lstm_acts(z_BxGxN))
  z = np.asarray(z_BxGxN, np.float64)
  for k in (0, 1, 3):
    np.testing.assert_allclose(acts[:, k], _sigmoid(z[:, k]), atol=3e-7)
  np.testing.assert_allclose(acts[:, 2], np.tanh(z[:, 2]), atol=3e-7)  # 2 ulps at 1.
  assert acts[:, 2].min() < -0.99 and acts[:, 0].min() < 1e-6  # Both ranges reached.
