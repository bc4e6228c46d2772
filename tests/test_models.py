"""Tests for jaxbig.models: the registry, logical names, initialisers, BatchNorm, dtypes, dropout.

Shape letters: B batch, K outputs.
"""

import dataclasses
import math
import pathlib
import re
from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from jaxbig import config, models
from jaxbig.models import init as inits
from jaxbig.models.resnet import ResNet18, ResNet34, ResNet50, ResNetTiny

B = 4
IMAGE = (8, 8, 1)  # The digits data set.
VECTOR = (10,)

# XLA's CPU backend spends ~10x longer optimising these tiny graphs than running them;
# per-jit options keep the whole file fast without touching other tests' XLA_FLAGS.
_jit = partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@dataclasses.dataclass(frozen=True)
class Meta:
  input_shape: tuple
  num_outputs: int
  task: str = 'classification'
  vocab_size: int = 0
  doc_eos: int = -1
  num_classes: int = 0


EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
# Each model's `config.model` comes from a real experiment file.
_EXPERIMENTS = {'cnn': 'cnn_digits.py', 'mlp': 'mlp_diabetes.py',
                'transformer': 'seq_digits.py:transformer,', 'lstm': 'seq_digits.py:lstm,',
                'gru': 'seq_digits.py:gru,', 'autoencoder': 'vae_digits.py:ae,',
                'vae': 'vae_digits.py:'}
# No ResNet experiment yet: every field a ResNet factory reads, declared as one would.
_RESNET = dict(width=4, small_input=True, init='he', init_std=0.02)


def _cfg(name: str, variant: str = 'smoke', **overrides) -> ml_collections.ConfigDict:
  """`config.model` of the experiment for `name` (its smoke size unless told), overridden."""
  if name in _EXPERIMENTS:
    file, _, prefix = _EXPERIMENTS[name].partition(':')
    cfg = config.load_module_config(f'{EXPERIMENTS / file}:{prefix}{variant}').model
  else:
    cfg = ml_collections.ConfigDict(dict(name=name, **_RESNET))
  cfg.update(overrides)
  return cfg


def _meta(name: str, num_outputs: int = 3) -> Meta:
  return Meta(VECTOR if name == 'mlp' else IMAGE, num_outputs)


def _batch(shape: tuple, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((B, *shape)).astype(np.float32)


def _init_fn(model: nn.Module):
  return lambda x: model.init(jax.random.key(0), x, train=False)


def _init(model: nn.Module, x: np.ndarray) -> dict:
  return _jit(_init_fn(model))(x)


def _shapes(model: nn.Module, x: np.ndarray) -> dict:
  """Unboxed parameter shapes, without computing anything."""
  params = nn.unbox(jax.eval_shape(_init_fn(model), x))['params']
  return jax.tree.map(lambda s: s.shape, params)


def _apply(model: nn.Module, variables: dict, x: np.ndarray, *, train: bool,
           seed: int = 0, mutable=False):
  rngs = {'dropout': jax.random.key(seed)}
  run = lambda v, x, r: model.apply(v, x, train=train, rngs=r, mutable=mutable)
  return _jit(run)(variables, x, rngs)


@pytest.mark.parametrize('name', models.MODELS)
def test_build_init_apply_with_logical_names(name):
  meta = _meta(name)
  model = models.build(_cfg(name), meta)
  x = _batch(meta.input_shape)
  # Abstract: tracing checks every shape, dtype and name without compiling each ResNet;
  # the tests below run cnn, mlp and resnet_tiny for real.
  variables = jax.eval_shape(_init_fn(model), x)
  rngs = {'sample': jax.random.key(0)}  # The VAE samples its latent.
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, rngs=rngs), variables, x)
  if name in ('autoencoder', 'vae'):  # Reconstructions, not logits.
    out = out['recon_logits']
    assert out.shape == (B, *meta.input_shape)
  else:
    assert out.shape == (B, meta.num_outputs)
  assert out.dtype == jnp.float32
  assert models.has_batch_stats(name) == ('batch_stats' in variables)

  boxes = jax.tree.leaves(variables['params'], is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert boxes
  for box in boxes:
    assert isinstance(box, nn.Partitioned), f'{name}: unboxed parameter {box}'
    assert len(box.names) == len(box.value.shape), f'{name}: {box.names} for {box.value.shape}'
  specs = jax.tree.leaves(nn.get_partition_spec(variables['params']))
  assert len(specs) == len(boxes)


def test_cnn_seed_shapes_on_digits():
  model = models.build(_cfg('cnn', variant=''), Meta(IMAGE, 10))
  shapes = _shapes(model, _batch(IMAGE))
  assert shapes['conv0']['kernel'] == (3, 3, 1, 64)
  assert shapes['conv1']['kernel'] == (3, 3, 64, 128)
  assert shapes['hidden']['kernel'] == (2 * 2 * 128, 1024)
  assert shapes['out']['kernel'] == (1024, 10)


@pytest.mark.parametrize('features,image,flat', [
    ((4, 8, 2), (8, 8, 1), 1 * 1 * 2),
    ((4,), (8, 8, 1), 4 * 4 * 4),
    ((4, 8), (7, 7, 3), 2 * 2 * 8),  # Odd sizes: SAME pooling rounds up, 7 -> 4 -> 2.
])
def test_cnn_features_set_the_conv_stages(features, image, flat):
  model = models.build(_cfg('cnn', features=features), Meta(image, 3))
  shapes = _shapes(model, _batch(image))
  convs = sorted(k for k in shapes if k.startswith('conv'))
  assert [shapes[k]['kernel'] for k in convs] == [
      (3, 3, c_in, c_out) for c_in, c_out in zip((image[-1], *features), features)]
  assert shapes['hidden']['kernel'] == (flat, _cfg('cnn').hidden)


def test_normal_initializer_uses_std():
  kernel = _jit(lambda k: inits.initializer('normal', std=0.5)(k, (256, 256)))(
      jax.random.key(0))
  assert abs(float(jnp.std(kernel)) - 0.5) < 0.01
  # Through the registry: the config's init and init_std reach the layers.
  model = models.build(_cfg('mlp', widths=(256,), init='normal', init_std=0.5), Meta((256,), 3))
  params = nn.unbox(_init(model, _batch((256,))))['params']
  assert abs(float(jnp.std(params['dense0']['kernel'])) - 0.5) < 0.01


@pytest.mark.parametrize('name,variance', [
    ('he', 2 / 400),              # 2 / fan_in
    ('lecun', 1 / 400),           # 1 / fan_in
    ('glorot', 2 / (400 + 100)),  # 2 / (fan_in + fan_out)
])
def test_initializer_variances_follow_their_formula(name, variance):
  kernel = _jit(lambda k: inits.initializer(name)(k, (400, 100)))(jax.random.key(0))
  # 40,000 samples: the variance estimate is within ~1% (one sigma), and the three
  # formulas are at least 25% apart, so a wrong initialiser cannot pass.
  assert float(jnp.var(kernel)) == pytest.approx(variance, rel=0.05)


def test_unknown_initializer_raises():
  with pytest.raises(ValueError, match=r"model\.init: unknown initializer 'x'; choose from "
                                       r"normal, glorot, he, lecun"):
    inits.initializer('x')
  with pytest.raises(config.ConfigError, match=r"model\.init: unknown 'x'; choose from normal"):
    models.build(_cfg('cnn', init='x'), _meta('cnn'))  # Before anything is traced.


@pytest.mark.slow(reason='compiles a ResNet')
def test_resnet_train_mode_updates_batch_stats():
  model = ResNetTiny(num_outputs=3)
  x = _batch(IMAGE)
  variables = _init(model, x)
  _, updates = _apply(model, variables, x, train=True, mutable=['batch_stats'])
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(updates['batch_stats'])
  assert len(old) == len(new) > 0
  for before, after in zip(old, new):
    assert after.dtype == jnp.float32
    assert not np.allclose(before, after)


@pytest.mark.slow(reason='compiles a ResNet')
def test_resnet_eval_mode_is_per_example_and_train_mode_is_not():
  model = ResNetTiny(num_outputs=3)
  x = _batch(IMAGE)
  others = x.copy()
  others[1:] = _batch(IMAGE, seed=1)[1:]  # Same first example, new others.
  variables = _init(model, x)
  # Eval mode reads batch_stats but needs no mutable collection.
  eval_x = _apply(model, variables, x, train=False)
  eval_others = _apply(model, variables, others, train=False)
  np.testing.assert_allclose(eval_x[0], eval_others[0], rtol=1e-5, atol=1e-6)
  train_x, _ = _apply(model, variables, x, train=True, mutable=['batch_stats'])
  train_others, _ = _apply(model, variables, others, train=True, mutable=['batch_stats'])
  assert not np.allclose(train_x[0], train_others[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('size,count', [
    # torchvision's counts for the same architectures.
    (ResNet18, 11_689_512),
    (ResNet34, 21_797_672),
    (ResNet50, 25_557_032),
])
def test_resnet_param_counts_on_imagenet(size, count):
  shapes = _shapes(size(num_outputs=1000), np.zeros((1, 224, 224, 3), np.float32))
  is_shape = lambda l: isinstance(l, tuple)
  assert sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=is_shape)) == count


@pytest.mark.parametrize('name', ['cnn', 'mlp', 'resnet_tiny'])
@pytest.mark.slow(reason='compiles a ResNet')
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  meta = _meta(name)
  x = _batch(meta.input_shape)
  fp32 = models.build(_cfg(name), meta)
  bf16 = models.build(_cfg(name), meta, dtype=jnp.bfloat16)
  variables = _init(bf16, x)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  logits_bf16 = _apply(bf16, variables, x, train=False)
  logits_fp32 = _apply(fp32, variables, x, train=False)
  assert logits_bf16.dtype == jnp.float32
  diff = float(jnp.max(jnp.abs(logits_bf16 - logits_fp32)))
  scale = float(jnp.max(jnp.abs(logits_fp32)))
  assert 0 < diff < 0.05 * scale


@pytest.mark.parametrize('name', ['cnn', 'mlp'])
def test_dropout(name):
  meta = _meta(name)
  x = _batch(meta.input_shape)
  model = models.build(_cfg(name, dropout=0.5), meta)
  plain = models.build(_cfg(name, dropout=0.0), meta)
  variables = _init(model, x)
  run = partial(_apply, variables=variables, x=x)
  assert not np.allclose(run(model, train=True, seed=1), run(model, train=True, seed=2))
  np.testing.assert_array_equal(run(model, train=False, seed=1), run(model, train=False, seed=2))
  np.testing.assert_array_equal(run(model, train=False, seed=1), run(plain, train=True, seed=1))


@pytest.mark.parametrize('activation', ['gelu', 'tanh', 'sigmoid'])
def test_mlp_activation_changes_output(activation):
  meta = _meta('mlp')
  x = _batch(meta.input_shape)
  relu = models.build(_cfg('mlp'), meta)
  other = models.build(_cfg('mlp', activation=activation), meta)
  variables = _init(relu, x)
  assert not np.allclose(_apply(relu, variables, x, train=False),
                         _apply(other, variables, x, train=False))


def test_unknown_activation_raises():
  with pytest.raises(config.ConfigError, match=r"model\.activation: unknown 'swishy'"):
    models.build(_cfg('mlp', activation='swishy'), _meta('mlp'))
  with pytest.raises(ValueError, match=r"model\.activation: unknown activation 'swishy'"):
    _init(models.MLP(num_outputs=1, widths=(4,), activation='swishy'), _batch(VECTOR))


def test_unknown_model_raises():
  with pytest.raises(ValueError, match=r"model\.name: unknown model 'x'; choose from cnn, mlp"):
    models.build(ml_collections.ConfigDict(dict(name='x')), Meta(IMAGE, 3))
  with pytest.raises(ValueError, match=r'model\.name'):
    models.has_batch_stats('x')


def test_image_models_reject_flat_inputs():
  with pytest.raises(ValueError, match=r"model\.name: 'cnn' needs image inputs"):
    models.build(_cfg('cnn'), Meta(VECTOR, 3))


@pytest.mark.parametrize('size', [(8, 8), (7, 5)])
def test_cnn_max_pool_matches_flax_max_pool_with_gradients(size):
  """The CNN's reshape max-pool against nn.max_pool(2x2, stride 2, SAME): outputs and
  gradients on random inputs (no ties), even and odd sizes (SAME keeps the last row)."""
  from jaxbig.models.cnn import max_pool_2x2
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *size, 3)), jnp.float32)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
  out_shape = jax.eval_shape(flax_pool, x).shape
  g = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)
  run = _jit(lambda x: [jax.value_and_grad(lambda x: (f(x) * g).sum())(x)
                        for f in (max_pool_2x2, flax_pool)])
  (value, grad), (ref_value, ref_grad) = run(x)
  assert max_pool_2x2(x).shape == out_shape
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_array_equal(grad, ref_grad)
  # Pooling picks a quarter of the inputs: the gradient is zero elsewhere, not everywhere.
  assert 0 < np.count_nonzero(grad) < grad.size


def test_cnn_pools_before_its_relu_with_the_same_values_and_gradients():
  """The CNN computes ReLU-then-pool as pool-then-ReLU (cheaper): equal on random inputs,
  forward and gradients, including windows whose four inputs are all negative."""
  from jaxbig.models.cnn import max_pool_2x2
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 6, 3)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 3, 3)), jnp.float32)
  run = _jit(lambda x: [jax.value_and_grad(lambda x: (f(x) * g).sum())(x) for f in (
      lambda x: nn.relu(max_pool_2x2(x)), lambda x: max_pool_2x2(nn.relu(x)))])
  (value, grad), (ref_value, ref_grad) = run(x)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_array_equal(grad, ref_grad)
  assert (max_pool_2x2(x) < 0).any() and (max_pool_2x2(x) > 0).any()


def test_auto_attention_takes_cudnn_only_where_it_applies(capsys):
  """`model.attention=auto` resolves per platform and dtype before anything is traced:
  cuDNN's fused attention on GPUs in bf16/fp16 with a head size it has kernels for, XLA's
  elsewhere (with a note on GPUs saying why); `cudnn` where it cannot run is one line."""
  seq = Meta((8,), 256, task='lm', vocab_size=256)
  cfg = lambda **kw: _cfg('transformer', **{'width': 64, 'heads': 4, 'attention': 'auto', **kw})
  build = lambda c, dtype, platform, meta=seq: models.build(c, meta, dtype, platform=platform)
  assert build(cfg(), jnp.bfloat16, 'gpu').attention == 'cudnn'
  assert build(cfg(), jnp.float16, 'cuda').attention == 'cudnn'
  for c, dtype, platform, meta, why in [
      (cfg(), jnp.float32, 'gpu', seq, 'bf16 or fp16 compute (precision gives float32)'),
      (cfg(heads=16), jnp.bfloat16, 'gpu', seq, 'a head size that is a multiple of 8'),
      (cfg(), jnp.bfloat16, 'gpu', Meta((8,), 256, task='lm', vocab_size=256, doc_eos=0),
       'no packed-document mask'),
      (cfg(), jnp.bfloat16, 'tpu', seq, 'an NVIDIA GPU (this run compiles for tpu)'),
      (cfg(), jnp.bfloat16, 'cpu', seq, 'an NVIDIA GPU (this run compiles for cpu)')]:
    capsys.readouterr()
    assert build(c, dtype, platform, meta).attention == 'xla'
    assert (why in capsys.readouterr().err) == (platform == 'gpu'), why
    with pytest.raises(config.ConfigError, match=re.escape(f"model.attention=cudnn needs {why}")):
      build(ml_collections.ConfigDict({**c.to_dict(), 'attention': 'cudnn'}), dtype, platform,
            meta)
  assert build(cfg(attention='xla'), jnp.bfloat16, 'gpu').attention == 'xla'
