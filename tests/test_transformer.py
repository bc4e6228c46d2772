"""Tests for jaxbig.models.transformer: causality, KV-cache decoding, attention paths, remat
and scan, logical names, bfloat16, the classifier, and length checks.

Shape letters: B batch, L sequence length, V vocabulary, H heads, D features per head,
K outputs.
"""

import functools
from functools import partial
import math
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
from jax import lax
import pytest

import conftest
from jaxbig import sharding
from jaxbig.kernels.attention import heads_major_attention
from jaxbig.models import axes
from jaxbig.models.rnn import RNNLM
from jaxbig.models import transformer
from jaxbig.models.transformer import (
    POS_TABLE, Block, TransformerClassifier, TransformerLM, causal_mask, reference_attention,
    rope)

B, L, V, MAX_LEN, DEPTH = 2, 12, 256, 16, 2
PROMPT = 5
# A larger init than the default 0.02 makes every dependency visible well above float noise.
TINY = dict(width=32, depth=DEPTH, heads=4, max_len=MAX_LEN, init_std=0.1)

# XLA's CPU backend spends far longer optimising these tiny graphs than running them.
_jit = partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _lm(**kw) -> TransformerLM:
  return TransformerLM(vocab_size=V, **{**TINY, **kw})


def _tokens(seed: int = 0, shape: tuple = (B, L)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def _init(model: nn.Module, x: jax.Array) -> dict:
  """Unboxed variables of `model` initialised on `x`."""
  return nn.unbox(_jit(lambda x: model.init({'params': jax.random.key(0)}, x, train=False))(x))


@functools.cache
def _learned_params() -> dict:
  """Params of the unscanned LM with learned positions (compiled once for the whole file)."""
  return _init(_lm(pos='learned'), _tokens())['params']


def _lm_params(pos: str, scan_layers: bool = False) -> dict:
  """Params for `_lm(pos=pos, scan_layers=scan_layers)`, all from one initialisation."""
  params = dict(_learned_params())
  if pos == 'rope':
    del params['pos_embed']
  return _stack(params) if scan_layers else params


def _stack(params: dict) -> dict:
  """The scan_layers layout of unscanned params: block{i} stacked into 'blocks'."""
  params = dict(params)
  blocks = [params.pop(f'block{i}') for i in range(DEPTH)]
  return {**params, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _apply(model: nn.Module):
  return _jit(lambda params, x: model.apply({'params': params}, x, train=False))


# Each position kind and each layer layout once (the four pairs cost twice as much).
@pytest.mark.parametrize('pos, scan_layers', [('rope', False), ('learned', True)])
def test_lm_is_causal(pos, scan_layers):
  tokens = _tokens(0)
  t = 5
  edited = tokens.at[:, t + 1:].set(_tokens(1)[:, t + 1:])
  apply = _apply(_lm(pos=pos, scan_layers=scan_layers))
  params = _lm_params(pos, scan_layers)
  logits, logits_edited = apply(params, tokens), apply(params, edited)
  np.testing.assert_allclose(logits_edited[:, :t + 1], logits[:, :t + 1], atol=1e-6)
  # Every later position sees the edit (through its own token or through attention).
  later = np.abs(logits_edited - logits)[:, t + 1:].max(axis=-1)
  assert later.min() > 1e-3, later


@pytest.mark.parametrize('pos, heads_major, scan_layers', [
    ('rope', False, False), ('learned', True, True)])
def test_packed_documents_see_only_themselves(pos, heads_major, scan_layers):
  """A document (opened by the end token) gives the same logits wherever it sits in a row
  and whatever precedes it: at the row's start, and after another document."""
  eos = 7
  a, b, c = np.array([3, 4, 5, 2]), np.array([eos, 9, 1, 2, 3]), np.array([eos, 4, 4])
  rows = jnp.asarray(np.stack([np.concatenate([a, b, c]), np.concatenate([b, c, a + 1])]),
                     jnp.int32)
  model = _lm(doc_eos=eos, pos=pos, heads_major=heads_major, scan_layers=scan_layers)
  params = _init(model, rows)['params']
  logits = _apply(model)(params, rows)
  np.testing.assert_allclose(logits[0, 4:9], logits[1, :5], atol=1e-5)  # b, moved.
  np.testing.assert_allclose(logits[0, 9:], logits[1, 5:8], atol=1e-5)  # c, after b.
  # Unpacked, b sees a: its logits depend on where it sits.
  plain = _apply(_lm(pos=pos, heads_major=heads_major, scan_layers=scan_layers))(params, rows)
  assert np.abs(plain[0, 4:9] - plain[1, :5]).max() > 1e-2


@pytest.mark.parametrize('pos, scan_layers', [('rope', True), ('learned', False)])
@pytest.mark.slow(reason='compiles several Transformer variants')
def test_cached_decoding_matches_full_forward(pos, scan_layers):
  model = _lm(pos=pos, scan_layers=scan_layers)
  decoder = model.clone(decode=True)
  tokens = _tokens(2)
  params = _lm_params(pos, scan_layers)
  empty = _abstract_init(decoder, jnp.zeros((B, MAX_LEN), jnp.int32))['cache']

  @_jit
  def run(params, tokens):
    full = model.apply({'params': params}, tokens, train=False)
    step = lambda cache, x: decoder.apply(
        {'params': params, 'cache': cache}, x, train=False, mutable=['cache'])
    # The cache as `init` makes it, without compiling the parameter initialisers.
    _, fresh = decoder.apply(
        {'params': params}, jnp.zeros((B, MAX_LEN), jnp.int32), train=False, mutable=['cache'])
    prompt, variables = step(fresh['cache'], tokens[:, :PROMPT])

    def one_token(i, carry):
      logits, cache = carry
      out, variables = step(cache, lax.dynamic_slice_in_dim(tokens, i, 1, axis=1))
      return lax.dynamic_update_slice_in_dim(logits, out, i, axis=1), variables['cache']

    logits = jnp.zeros_like(full).at[:, :PROMPT].set(prompt)
    logits, cache = lax.fori_loop(PROMPT, L, one_token, (logits, variables['cache']))
    alone, _ = step(fresh['cache'], tokens[:, L - 1:])
    overflow, _ = step(cache, tokens[:, :PROMPT])
    return full, logits, fresh['cache'], cache, alone, overflow

  full, logits, fresh, cache, alone, overflow = run(params, tokens)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), fresh) == jax.tree.map(
      lambda x: (x.shape, x.dtype), empty)
  assert int(fresh['cache_index']) == 0 and not any(x.any() for x in jax.tree.leaves(fresh))
  assert int(cache['cache_index']) == L
  np.testing.assert_allclose(logits, full, atol=1e-5)
  # The cache matters: the last token alone, from an empty cache, predicts differently.
  assert np.abs(alone[:, 0] - full[:, L - 1]).max() > 1e-3
  # Running past max_len cannot raise under jit; it poisons the logits instead.
  assert np.isnan(overflow).all()


def test_attention_paths_match_reference():
  @_jit
  def run(q, k, v):
    mask = causal_mask(jnp.arange(L), L)
    # Queries at positions 4.. over all keys: the decode path's mask.
    offset = causal_mask(4 + jnp.arange(L - 4), L)
    return dict(
        xla=jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla'),
        auto=jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None),
        reference=reference_attention(q, k, v, mask),
        unmasked=reference_attention(q, k, v),
        xla_offset=jax.nn.dot_product_attention(
            q[:, 4:], k, v, mask=offset, implementation='xla'),
        reference_offset=reference_attention(q[:, 4:], k, v, offset))

  out = run(*np.random.default_rng(0).standard_normal((3, B, L, 4, 8)).astype(np.float32))
  np.testing.assert_allclose(out['xla'], out['reference'], atol=1e-5)
  np.testing.assert_allclose(out['auto'], out['xla'], atol=1e-6)
  np.testing.assert_allclose(out['xla_offset'], out['reference_offset'], atol=1e-5)
  # The mask is doing something.
  assert np.abs(out['xla'] - out['unmasked']).max() > 1e-2


def test_auto_attention_equals_xla_on_cpu():
  tokens = _tokens(3)
  params = _lm_params('rope')
  np.testing.assert_allclose(
      _apply(_lm(attention='auto'))(params, tokens), _apply(_lm())(params, tokens), atol=1e-6)


def _grad_fn(model: nn.Module, jit: bool = True):
  """value_and_grad of the next-token loss of `model`, as fn(params, tokens)."""
  def loss_fn(params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  grad_fn = jax.value_and_grad(loss_fn)
  return _jit(grad_fn) if jit else grad_fn


def _transforms(model: nn.Module, params: dict, tokens: jax.Array) -> tuple[bool, bool]:
  """Whether the gradient's jaxpr holds a rematerialisation ('remat2' in jax 0.10), a scan."""
  jaxpr = str(jax.make_jaxpr(_grad_fn(model, jit=False))(params, tokens))
  return 'remat' in jaxpr or 'checkpoint' in jaxpr, 'scan[' in jaxpr


@pytest.mark.slow(reason='compiles several Transformer variants')
def test_remat_and_scan_match_plain_model():
  tokens = _tokens(4, (B, L + 1))
  params = _lm_params('rope')
  stacked = _lm_params('rope', scan_layers=True)
  assert stacked['blocks']['mlp_in']['kernel'].shape == (DEPTH, 32, 128)
  assert _transforms(_lm(), params, tokens) == (False, False)
  assert _transforms(_lm(remat=True), params, tokens) == (True, False)
  assert _transforms(_lm(scan_layers=True), stacked, tokens) == (False, True)
  # Both at once: a rematerialised scan body, same loss and gradients, whatever the policy
  # keeps (test_remat_policies_keep_what_they_name). offload_input is `full` on a CPU, which
  # has no host memory apart from its own (test_plan shows it offloaded on a TPU).
  assert _transforms(_lm(scan_layers=True, remat=True), stacked, tokens) == (True, True)
  # The layout mapping matters: the same layers in the other order give another loss.
  swapped = {**stacked, 'blocks': jax.tree.map(lambda x: x[::-1], stacked['blocks'])}
  grad = lambda model: _grad_fn(model, jit=False)
  # Every variant in one compiled program (one compile instead of six).
  out = _jit(lambda params, stacked, swapped, tokens: dict(
      plain=grad(_lm())(params, tokens), remat=grad(_lm(remat=True))(params, tokens),
      scan=grad(_lm(scan_layers=True))(stacked, tokens),
      swapped=grad(_lm(scan_layers=True))(swapped, tokens)[0],
      full=grad(_lm(scan_layers=True, remat='full'))(stacked, tokens),
      dots=grad(_lm(scan_layers=True, remat='dots'))(stacked, tokens)))(
          params, stacked, swapped, tokens)
  loss, grads = out['plain']
  for name in ('remat', 'scan', 'full', 'dots'):
    got_loss, got_grads = out[name]
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6, err_msg=name)
    jax.tree.map(partial(np.testing.assert_allclose, atol=1e-6, err_msg=name), got_grads,
                 grads if name == 'remat' else _stack(grads))
  assert abs(float(out['swapped']) - float(loss)) > 1e-4


def _saved_bytes(model: nn.Module, params: dict, tokens: jax.Array, capsys) -> tuple[int, str]:
  """(bytes, listing) of the residuals the loss's backward pass keeps from its forward pass,
  as `jax.ad_checkpoint.print_saved_residuals` lists them (traced, not compiled)."""
  def loss_fn(params):
    logits = model.apply({'params': params}, tokens[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss_fn, params)
  listing = capsys.readouterr().out
  total = 0
  for dtype, dims in re.findall(r'(f32|i32|bool)\[([\d,]*)\]', listing):
    total += math.prod(int(d) for d in dims.split(',') if d) * (1 if dtype == 'bool' else 4)
  return total, listing


def test_remat_policies_keep_what_they_name(capsys):
  """Each policy keeps a different set of activations for the backward pass: `full` only
  the blocks' inputs, `save:qkv` those and the projections, `dots` every matmul against a
  weight, `dots_saveable` the attention scores too, `none` everything."""
  tokens = _tokens(4, (B, L + 1))
  params = _lm_params('rope')
  saved = {p: _saved_bytes(_lm(remat=p), params, tokens, capsys)
           for p in ('none', 'full', 'save:qkv', 'dots', 'dots_saveable')}
  size = {p: v[0] for p, v in saved.items()}
  assert size['full'] < size['save:qkv'] < size['dots'] < size['dots_saveable'] <= size['none']
  # The q, k and v projections of both blocks: 3 x 2 x (B, L, heads, head size) floats.
  assert size['save:qkv'] - size['full'] == 3 * DEPTH * B * L * 32 * 4
  assert "named 'qkv'" in saved['save:qkv'][1] and "named 'qkv'" not in saved['full'][1]
  assert _lm(remat=True).remat is True and _saved_bytes(
      _lm(remat=True), params, tokens, capsys)[0] == size['full']  # The old boolean field.


@pytest.mark.parametrize('value, named', [
    ('fast', "model.remat: unknown policy 'fast'; choose from none, full, dots"),
    ('save:qkv,logits', "model.remat: save: takes names from qkv, attn_out, mlp_in, "
                        "mlp_hidden; got 'logits'"),
])
def test_an_unknown_remat_policy_is_one_line(value, named, capsys, tmp_path):
  code, _, err = conftest.run_cli(capsys, 'train', 'experiments/gpt_stdlib.py:smoke',
                         f'model.remat={value}', '--workdir', tmp_path / 'wd')
  assert code == 2 and err.count('\n') == 1 and named in err, err
  assert not (tmp_path / 'wd').exists()


def _abstract_init(model: nn.Module, x: jax.Array) -> dict:
  """Shapes, dtypes and boxes of `model.init` on `x`, without running it."""
  return jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x, train=False), x)


def _boxes(model: nn.Module, x: jax.Array) -> dict:
  abstract = _abstract_init(model, x)
  flat = jax.tree_util.tree_flatten_with_path(
      abstract['params'], is_leaf=lambda l: isinstance(l, nn.Partitioned))[0]
  return {jax.tree_util.keystr(path): box for path, box in flat}


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('kind', ['lm_tied', 'lm_untied_learned', 'classifier'])
def test_every_param_has_logical_names(kind, scan_layers):
  if kind == 'classifier':
    model, x = TransformerClassifier(3, **TINY, scan_layers=scan_layers), jnp.zeros((B, 8, 8, 1))
  else:
    untied = kind == 'lm_untied_learned'
    model = _lm(scan_layers=scan_layers, tie_embeddings=not untied,
                pos='learned' if untied else 'rope')
    x = _tokens()
  boxes = _boxes(model, x)
  known = {name for name, _ in sharding.RULES} | {None}
  for path, box in boxes.items():
    assert isinstance(box, nn.Partitioned), f'{path}: unboxed parameter {box}'
    assert len(box.names) == box.value.ndim, (path, box.names, box.value.shape)
    assert set(box.names) <= known, (path, box.names)
    in_blocks = "['blocks']" in path
    assert in_blocks == scan_layers or not path.startswith("['block")
    assert (box.names[0] == 'layers') == in_blocks, (path, box.names)
    if in_blocks:
      assert box.value.shape[0] == DEPTH
  assert any(p.startswith("['block0']") for p in boxes) != scan_layers
  if kind == 'lm_tied':
    assert not any('logits' in p for p in boxes)
  if kind == 'lm_untied_learned':
    assert boxes["['logits']['kernel']"].names == axes.LOGITS_KERNEL
    assert boxes["['pos_embed']['embedding']"].names == POS_TABLE
  if kind == 'classifier':
    assert boxes["['out']['kernel']"].names == axes.OUT_KERNEL


@pytest.mark.slow(reason='compiles several Transformer variants')
def test_bf16_compute_keeps_float32_params_and_logits():
  tokens = _tokens(5, (B, L + 1))
  model = _lm(dtype=jnp.bfloat16)
  abstract = _abstract_init(model, tokens)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(abstract))} == {jnp.dtype(jnp.float32)}
  params = _lm_params('rope')
  logits = _apply(model)(params, tokens[:, :-1])
  reference = _apply(_lm())(params, tokens[:, :-1])
  assert logits.dtype == jnp.float32
  error = np.abs(logits - reference).max()
  assert 0 < error < 0.05 * np.abs(reference).max(), error
  loss, grads = _grad_fn(model)(params, tokens)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('inputs', ['tokens', 'features', 'image'])
@pytest.mark.slow(reason='compiles several Transformer variants')
def test_classifier_inputs_and_batch_independence(inputs):
  rng = np.random.default_rng(6)
  if inputs == 'tokens':
    model, x = TransformerClassifier(3, vocab_size=V, **TINY), _tokens(6, (3, L))
    other = _tokens(7, (3, L))
  else:
    shape = (3, L, 5) if inputs == 'features' else (3, 8, 8, 1)
    model = TransformerClassifier(3, **TINY)
    x, other = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  params = _init(model, x)['params']
  apply = _apply(model)
  logits = apply(params, x)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  edited = apply(params, x.at[1:].set(other[1:]))
  np.testing.assert_allclose(edited[0], logits[0], atol=1e-6)
  assert np.abs(edited[1:] - logits[1:]).max() > 1e-3


def test_dropout_only_in_training():
  model = _lm(dropout=0.3)
  tokens = _tokens(8)
  params = _lm_params('rope')
  run = _jit(lambda rng, train: model.apply(
      {'params': params}, tokens, train=train, rngs={'dropout': rng}), static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
  assert np.abs(run(jax.random.key(1), True) - run(jax.random.key(2), True)).max() > 1e-3


def test_too_long_input_raises():
  _abstract_init(_lm(), _tokens(shape=(B, MAX_LEN)))
  with pytest.raises(ValueError, match=r'data\.seq_len \(17\) exceeds model\.max_len \(16\)'):
    _abstract_init(_lm(), _tokens(shape=(B, MAX_LEN + 1)))
  _abstract_init(TransformerClassifier(3, **TINY), jnp.zeros((B, MAX_LEN, 4, 1)))
  with pytest.raises(ValueError, match=r'data\.seq_len \(20\) exceeds model\.max_len \(16\)'):
    _abstract_init(TransformerClassifier(3, **TINY), jnp.zeros((B, 20, 4, 1)))


@pytest.mark.parametrize('field, value, message', [
    ('pos', 'alibi', 'model.pos'), ('attention', 'splash', 'model.attention'),
    ('heads', 5, 'divisible by model.heads')])
def test_bad_attributes_raise(field, value, message):
  with pytest.raises(ValueError, match=message):
    _abstract_init(_lm(**{field: value}), _tokens())


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_heads_major_attention_matches_reference_with_gradients(dtype):
  """The CPU fast path against the plain reference and JAX's XLA path: outputs and the
  gradients of q, k and v, causal and not, on random inputs."""
  q, k, v, g = (jnp.asarray(a, dtype) for a in
                np.random.default_rng(1).standard_normal((4, B, L, 4, 8)))
  mask = causal_mask(jnp.arange(L), L)
  loss = lambda fn: lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * g).sum()
  paths = {
      ('fast', True): lambda q, k, v: heads_major_attention(q, k, v, causal=True),
      ('fast', False): lambda q, k, v: heads_major_attention(q, k, v, causal=False),
      ('reference', True): lambda q, k, v: reference_attention(q, k, v, mask),
      ('reference', False): reference_attention,
      ('jax', True): lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation='xla'),
  }
  with jax.default_matmul_precision('highest'):
    out = _jit(lambda q, k, v: {name: jax.value_and_grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
                                for name, fn in paths.items()})(q, k, v)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for causal in (True, False):
    fast, ref = out['fast', causal], out['reference', causal]
    np.testing.assert_allclose(fast[0], ref[0], rtol=tol)
    for a, b in zip(ref[1], fast[1]):
      assert a.dtype == b.dtype == dtype
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max())
  np.testing.assert_allclose(out['fast', True][0], out['jax', True][0], rtol=tol)
  # The mask matters: causal and full attention differ.
  assert abs(float(out['fast', True][0] - out['fast', False][0])) > 1e-2


def test_block_on_token_rows_equals_a_plain_three_dimensional_block():
  """Block computes its projections and MLP on (B L, E) token rows; the same block written
  directly on (B, L, E) with einsums (the plain reference) gives the same output and
  gradients."""
  width, heads = 32, 4
  block = Block(heads=heads, mlp_dim=4 * width, max_len=MAX_LEN, pos='rope', init_std=0.1,
                out_std=0.1)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((B, L, width)), jnp.float32)
  positions = jnp.arange(L)
  params = nn.unbox(_jit(lambda x: block.init(jax.random.key(0), x, positions))(x))['params']

  def reference(p, x):
    norm = lambda x, scale: x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale
    a = p['attn']
    h = norm(x, p['attn_norm']['scale'])
    q, k, v = (jnp.einsum('ble,ehd->blhd', h, a[n]['kernel']) for n in ('query', 'key', 'value'))
    q, k = rope(q, positions), rope(k, positions)
    o = reference_attention(q, k, v, causal_mask(positions, L))
    x = x + jnp.einsum('blhd,hde->ble', o, a['out']['kernel'])
    h = norm(x, p['mlp_norm']['scale'])
    h = nn.gelu(jnp.einsum('ble,em->blm', h, p['mlp_in']['kernel']))
    return x + jnp.einsum('blm,me->ble', h, p['mlp_out']['kernel'])

  g = jnp.asarray(np.random.default_rng(3).standard_normal((B, L, width)), jnp.float32)
  loss = lambda fn: lambda p, x: (fn(p, x) * g).sum()
  with jax.default_matmul_precision('highest'):
    out = _jit(lambda p, x: (
        jax.value_and_grad(loss(lambda p, x: block.apply({'params': p}, x, positions)[0]),
                           argnums=(0, 1))(p, x),
        jax.value_and_grad(loss(reference), argnums=(0, 1))(p, x)))(params, x)
  (value, grads), (ref_value, ref_grads) = out
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())
  # The block changes its input far beyond the tolerance.
  assert abs(float(value) - float(loss(lambda p, x: x)(params, x))) > 1e-1


# Large vocabularies: the loss made chunk by chunk (model.logits_chunk).

def _lm_loss(model, params, x, y, mask, chunk, smoothing=0.0):
  from jaxbig import losses  # pylint: disable=g-import-not-at-top
  train_cfg = type('TrainCfg', (), {'loss': 'xent', 'label_smoothing': smoothing})()
  out = model.apply({'params': params}, x, train=False)
  return losses.build(train_cfg, None, chunk)(out, {'y': y, 'mask': mask})


@pytest.mark.slow(reason='compiles four gradient programs')
@pytest.mark.parametrize('kind, tie, smoothing', [
    ('transformer', True, 0.0), ('transformer', False, 0.1), ('lstm', False, 0.0)])
def test_chunked_cross_entropy_equals_the_whole_logits_loss(kind, tie, smoothing):
  """Loss, metric sums and gradients; 30 positions in chunks of 7 (a ragged last chunk), a
  masked-out example; the same parameters in both forms."""
  if kind == 'lstm':
    model = partial(RNNLM, vocab_size=384, hidden=32, embed_dim=32 if tie else 16,
                    tie_embeddings=tie)
  else:
    model = partial(TransformerLM, vocab_size=384, width=32, depth=2, heads=4, max_len=64,
                    tie_embeddings=tie)
  whole, chunked = model(), model(logits_chunk=7)
  x = jax.random.randint(jax.random.key(0), (3, 30), 0, 384)
  y = jax.random.randint(jax.random.key(1), (3, 30), 0, 384).at[0, :5].set(x[0, :5])
  mask = jnp.array([1.0, 1.0, 0.0])
  params = whole.init(jax.random.key(2), x, train=False)['params']
  chex_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  chex_equal(params, chunked.init(jax.random.key(2), x, train=False)['params'])
  grad = lambda m, chunk: jax.value_and_grad(
      lambda p: _lm_loss(m, p, x, y, mask, chunk, smoothing), has_aux=True)(params)
  (loss, sums), grads = grad(whole, 0)
  (loss_c, sums_c), grads_c = grad(chunked, 7)
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  assert float(sums_c['count']) == float(sums['count']) == 60
  assert float(sums_c['correct']) == float(sums['correct'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_c, grads)


@pytest.mark.slow(reason='compiles two large gradient programs')
def test_chunked_cross_entropy_never_holds_the_whole_logits():
  """XLA's memory analysis of the compiled gradient, vocabulary 32768 at 512 positions:
  whole logits take over 3x their 128 MiB in temporaries (measured 415 MiB), chunks of 64
  a small multiple of one chunk's 16 MiB (measured 71 MiB)."""
  kw = dict(vocab_size=32768, width=64, depth=1, heads=4, max_len=512)
  x = jnp.zeros((2, 512), jnp.int32)
  mask = jnp.ones(2)

  def temporaries(chunk):
    model = TransformerLM(**kw, logits_chunk=chunk)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))['params']
    params = nn.meta.unbox(params)
    step = jax.jit(jax.grad(lambda p: _lm_loss(model, p, x, x, mask, chunk)[0]))
    return step.lower(params).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temporaries(0), temporaries(64)
  logits_bytes, chunk_bytes = 2 * 512 * 32768 * 4, 2 * 64 * 32768 * 4
  assert whole > 3 * logits_bytes  # Logits, their one-hot targets, softmax and gradient.
  assert chunked < 5 * chunk_bytes and chunked < whole / 5, (whole, chunked)


def _decode_all(model: nn.Module, params: dict, tokens: jax.Array) -> jax.Array:
  """Logits of `tokens` fed one at a time through `model`'s KV cache."""
  decoder = model.clone(decode=True)

  @_jit
  def run(params, tokens):
    step = lambda cache, x: decoder.apply(
        {'params': params, 'cache': cache}, x, train=False, mutable=['cache'])
    _, fresh = decoder.apply(
        {'params': params}, jnp.zeros((B, MAX_LEN), jnp.int32), train=False, mutable=['cache'])

    def one_token(cache, x_B):
      out, variables = step(cache, x_B[:, None])
      return variables['cache'], out[:, 0]

    cache, logits = lax.scan(one_token, fresh['cache'], tokens.T)
    return logits.transpose(1, 0, 2), cache

  return run(params, tokens)


@pytest.mark.parametrize('heads_major', [False, True])
def test_grouped_query_attention_equals_heads_reading_repeated_keys_and_values(heads_major):
  """kv_heads=2 of 4: each pair of query heads reads one key/value head. The same model
  with 4 key/value heads, each group's weights repeated, gives the same logits, through
  XLA's attention and the CPU kernel alike, and the KV cache holds 2 heads and decodes the
  same logits token by token."""
  tokens = _tokens(3)
  gqa = _lm(kv_heads=2, heads_major=heads_major)
  params = _init(gqa, tokens)['params']
  assert params['block0']['attn']['key']['kernel'].shape == (32, 2, 8)
  repeated = jax.tree.map(lambda x: x, params)
  for i in range(DEPTH):
    for name in ('key', 'value'):
      kernel = params[f'block{i}']['attn'][name]['kernel']
      repeated[f'block{i}']['attn'][name] = {'kernel': jnp.repeat(kernel, 2, axis=1)}
  want = _apply(_lm(heads_major=heads_major))(repeated, tokens)
  got = _apply(gqa)(params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The grouping matters: head 1 reading group 1's key instead changes the logits.
  other = jax.tree.map(lambda x: x, repeated)
  kernel = other['block0']['attn']['key']['kernel']
  other['block0']['attn']['key'] = {'kernel': kernel.at[:, 1].set(kernel[:, 2])}
  assert np.abs(_apply(_lm(heads_major=heads_major))(other, tokens) - want).max() > 1e-3
  if not heads_major:
    decoded, cache = _decode_all(gqa, params, tokens)
    assert cache['block0']['attn']['cached_key'].shape == (B, MAX_LEN, 2, 8)
    np.testing.assert_allclose(decoded, got, atol=1e-5)


def test_swiglu_bias_and_norm_epsilon_follow_their_formulas():
  """A block with model.mlp=swiglu, biases and norm_eps=0.01, against numpy: with the
  attention's output projection zeroed it is x + b_out + (SiLU(n(x) Wg + bg) *
  (n(x) Wi + bi)) Wo + bo, n the RMSNorm with that epsilon."""
  rng = np.random.default_rng(0)
  block = Block(heads=4, mlp_dim=24, max_len=MAX_LEN, mlp='swiglu', use_bias=True,
                norm_eps=0.01, init_std=0.3, out_std=0.3)
  x = jnp.asarray(rng.normal(size=(B, L, 32)), jnp.float32)
  positions = np.arange(L)
  params = nn.unbox(block.init(jax.random.key(0), x, positions))['params']
  assert {k: sorted(v) for k, v in params.items() if 'mlp' in k} == {
      'mlp_gate': ['bias', 'kernel'], 'mlp_in': ['bias', 'kernel'],
      'mlp_norm': ['scale'], 'mlp_out': ['bias', 'kernel']}
  assert sorted(params['attn']['query']) == ['bias', 'kernel']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  params['attn']['out']['kernel'] = jnp.zeros_like(params['attn']['out']['kernel'])
  got, _ = block.apply({'params': params}, x, positions)
  p = jax.tree.map(np.asarray, params)
  h = np.asarray(x) + p['attn']['out']['bias']
  n = h / np.sqrt((h * h).mean(-1, keepdims=True) + 0.01) * p['mlp_norm']['scale']
  gate = n @ p['mlp_gate']['kernel'] + p['mlp_gate']['bias']
  hidden = gate / (1 + np.exp(-gate)) * (n @ p['mlp_in']['kernel'] + p['mlp_in']['bias'])
  want = h + hidden @ p['mlp_out']['kernel'] + p['mlp_out']['bias']
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Every new parameter carries logical axis names of its own rank (sharding rules).
  boxes = block.init(jax.random.key(0), x, positions)['params']
  for path, box in jax.tree_util.tree_flatten_with_path(
      boxes, is_leaf=lambda l: isinstance(l, nn.Partitioned))[0]:
    assert isinstance(box, nn.Partitioned) and len(box.names) == box.value.ndim, path


def test_rope_theta_sets_the_rotation_frequencies():
  x = jnp.zeros((1, 3, 1, 8)).at[..., 1].set(1.0)  # Feature pair 1 (of 4): (x1, x5).
  positions = np.arange(3)
  np.testing.assert_array_equal(rope(x, positions), rope(x, positions, theta=10_000.0))
  out = np.asarray(rope(x, positions, theta=500_000.0))[0, :, 0]
  angles = positions * 500_000.0 ** (-1 / 4)  # Pair i turns by p theta^(-2i/D), i=1, D=8.
  np.testing.assert_allclose(out[:, 1], np.cos(angles), atol=1e-6)
  np.testing.assert_allclose(out[:, 5], np.sin(angles), atol=1e-6)


@pytest.mark.parametrize('override, named', [
    ('model.kv_heads=3', 'model.kv_heads (3) must divide model.heads (4)'),
    ('model.mlp=relu', "model.mlp: unknown 'relu'; choose from gelu, swiglu"),
    ('model.rope_theta=0', 'model.rope_theta must be > 0'),
    ('model.norm=batch', "model.norm: unknown 'batch'; choose from rms, layer"),
    ('model.mlp_dim=-1', 'model.mlp_dim must be >= 0'),
])
def test_bad_decoder_options_are_one_line(override, named, capsys, tmp_path):
  code, _, err = conftest.run_cli(capsys, 'train', 'experiments/gpt_stdlib.py:smoke', override,
                                  '--workdir', tmp_path / 'wd')
  assert code == 2 and err.count('\n') == 1 and named in err, err
  assert not (tmp_path / 'wd').exists()


@pytest.mark.slow(reason='runs the Pallas TPU kernels in interpret mode')
def test_flash_attention_kernel_equals_xla_attention_with_gradients():
  """The Pallas TPU splash kernel (forward and backward), run by Pallas's TPU interpreter on
  this CPU, against XLA's attention: the loss and gradients of a 1-block LM with grouped-
  query attention over 128 tokens, one row packed with three documents (the kernel's
  segment ids) and one row of a single document."""
  eos = 7
  tokens = np.array(_tokens(5, (2, 129)))
  tokens[tokens == eos] = eos + 1
  tokens[0, [30, 90]] = eos
  tokens = jnp.asarray(tokens)
  # One block; query heads in pairs: the kernel reads the key/value heads repeated.
  xla = _lm(max_len=128, kv_heads=2, depth=1, doc_eos=eos)
  params = _init(xla, tokens[:, :-1])['params']
  want_loss, want = _grad_fn(xla)(params, tokens)
  with transformer.interpret():
    loss, got = _grad_fn(xla.clone(attention='flash'))(params, tokens)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(partial(np.testing.assert_allclose, atol=2e-5), got, want)
  # The documents matter: unpacked, the loss differs.
  assert abs(float(_grad_fn(xla.clone(doc_eos=-1))(params, tokens)[0]) - float(loss)) > 1e-4

