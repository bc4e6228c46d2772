"""Tests for jaxbig.models: the registry, logical names, initialisers, BatchNorm, dtypes, dropout.

Shape letters: B batch, H height, W width, C channels, K outputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from jaxbig import models
from jaxbig.models import init as inits
from jaxbig.models.resnet import ResNet18, ResNet34, ResNet50, ResNetTiny

B = 4
IMAGE = (8, 8, 1)  # The digits data set.
VECTOR = (10,)


@dataclasses.dataclass(frozen=True)
class Meta:
    input_shape: tuple
    num_outputs: int


# Every field a model reads, shrunk to CPU size, as an experiment file declares them.
_TINY = {
    'cnn': dict(features=(4, 8), hidden=16, dropout=0.0, init='he', init_std=0.02),
    'mlp': dict(widths=(16, 8), activation='relu', dropout=0.0, init='he', init_std=0.02),
    'resnet': dict(width=4, small_input=True, init='he', init_std=0.02),
}


def _cfg(name: str, **overrides) -> ml_collections.ConfigDict:
    fields = _TINY['resnet' if name.startswith('resnet') else name]
    return ml_collections.ConfigDict(dict(name=name, **{**fields, **overrides}))


def _meta(name: str, num_outputs: int = 3) -> Meta:
    return Meta(VECTOR if name == 'mlp' else IMAGE, num_outputs)


def _batch(shape: tuple, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, *shape))


def _init(model: nn.Module, x: jax.Array) -> dict:
    # Jitted: one compile is much faster on CPU than op-by-op dispatch of a ResNet.
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


@pytest.mark.parametrize('name', models.MODELS)
def test_build_init_apply_with_logical_names(name):
    meta = _meta(name)
    model = models.build(_cfg(name), meta)
    x = _batch(meta.input_shape)
    variables = _init(model, x)
    logits_BxK = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits_BxK.shape == (B, meta.num_outputs)
    assert logits_BxK.dtype == jnp.float32
    assert models.has_batch_stats(name) == ('batch_stats' in variables)

    boxes = jax.tree.leaves(variables['params'], is_leaf=lambda l: isinstance(l, nn.Partitioned))
    assert boxes
    for box in boxes:
        assert isinstance(box, nn.Partitioned), f'{name}: unboxed parameter {box}'
        assert len(box.names) == box.value.ndim, f'{name}: {box.names} for {box.value.shape}'
    specs = jax.tree.leaves(nn.get_partition_spec(variables['params']))
    assert len(specs) == len(boxes)


def test_cnn_seed_shapes_on_digits():
    model = models.build(
        _cfg('cnn', features=(64, 128), hidden=1024), Meta(IMAGE, 10))
    shapes = jax.eval_shape(lambda: nn.unbox(_init(model, _batch(IMAGE))))['params']
    shapes = jax.tree.map(lambda s: s.shape, shapes)
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
    params = jax.eval_shape(lambda: nn.unbox(_init(model, _batch(image))))['params']
    convs = sorted(k for k in params if k.startswith('conv'))
    assert [params[k]['kernel'].shape[-1] for k in convs] == list(features)
    assert params['conv0']['kernel'].shape[2] == image[-1]
    assert params['hidden']['kernel'].shape == (flat, 16)


def test_normal_initializer_uses_std():
    kernel = inits.initializer('normal', std=0.5)(jax.random.key(0), (256, 256))
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
    kernel = inits.initializer(name)(jax.random.key(0), (400, 100))
    # 40,000 samples: the variance estimate is within ~1% (one sigma), and the three
    # formulas are at least 25% apart, so a wrong initialiser cannot pass.
    assert float(jnp.var(kernel)) == pytest.approx(variance, rel=0.05)


def test_unknown_initializer_raises():
    with pytest.raises(ValueError, match=r"model\.init: unknown initializer 'x'; choose from "
                                         r"normal, glorot, he, lecun"):
        inits.initializer('x')
    model = models.build(_cfg('cnn', init='x'), _meta('cnn'))
    with pytest.raises(ValueError, match=r'model\.init'):
        _init(model, _batch(IMAGE))


def _tiny_resnet() -> nn.Module:
    return ResNetTiny(num_outputs=3)


def test_resnet_train_mode_updates_batch_stats():
    model = _tiny_resnet()
    x = _batch(IMAGE)
    variables = _init(model, x)
    _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    old = jax.tree.leaves(variables['batch_stats'])
    new = jax.tree.leaves(updates['batch_stats'])
    assert len(old) == len(new) > 0
    for before, after in zip(old, new):
        assert after.dtype == jnp.float32
        assert not np.allclose(before, after)


def test_resnet_eval_mode_is_per_example_and_train_mode_is_not():
    model = _tiny_resnet()
    x = _batch(IMAGE)
    other = x.at[1:].set(_batch(IMAGE, seed=1)[1:])  # Same first example, new others.
    variables = _init(model, x)
    # Eval mode reads batch_stats but needs no mutable collection.
    eval_x = model.apply(variables, x, train=False)
    eval_other = model.apply(variables, other, train=False)
    np.testing.assert_allclose(eval_x[0], eval_other[0], rtol=1e-5, atol=1e-6)
    train_x, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    train_other, _ = model.apply(variables, other, train=True, mutable=['batch_stats'])
    assert not np.allclose(train_x[0], train_other[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('size,count', [
    # torchvision's counts for the same architectures.
    (ResNet18, 11_689_512),
    (ResNet34, 21_797_672),
    (ResNet50, 25_557_032),
])
def test_resnet_param_counts_on_imagenet(size, count):
    model = size(num_outputs=1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    assert sum(s.size for s in jax.tree.leaves(shapes['params'])) == count


@pytest.mark.parametrize('name', ['cnn', 'mlp', 'resnet_tiny'])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    meta = _meta(name)
    x = _batch(meta.input_shape)
    fp32 = models.build(_cfg(name), meta)
    bf16 = models.build(_cfg(name), meta, dtype=jnp.bfloat16)
    variables = _init(bf16, x)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    logits_bf16 = bf16.apply(variables, x, train=False)
    logits_fp32 = fp32.apply(variables, x, train=False)
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

    def run(m, train, seed):
        return m.apply(variables, x, train=train, rngs={'dropout': jax.random.key(seed)})

    assert not np.allclose(run(model, True, 1), run(model, True, 2))
    np.testing.assert_array_equal(run(model, False, 1), run(model, False, 2))
    np.testing.assert_array_equal(run(model, False, 1), run(plain, True, 1))


@pytest.mark.parametrize('activation', ['gelu', 'tanh', 'sigmoid'])
def test_mlp_activation_changes_output(activation):
    meta = _meta('mlp')
    x = _batch(meta.input_shape)
    relu = models.build(_cfg('mlp'), meta)
    other = models.build(_cfg('mlp', activation=activation), meta)
    variables = _init(relu, x)
    assert not np.allclose(relu.apply(variables, x, train=False),
                           other.apply(variables, x, train=False))


def test_unknown_activation_raises():
    model = models.build(_cfg('mlp', activation='swishy'), _meta('mlp'))
    with pytest.raises(ValueError, match=r"model\.activation: unknown activation 'swishy'"):
        _init(model, _batch(VECTOR))


def test_unknown_model_raises():
    with pytest.raises(ValueError, match=r"model\.name: unknown model 'x'; choose from cnn, mlp"):
        models.build(ml_collections.ConfigDict(dict(name='x')), Meta(IMAGE, 3))
    with pytest.raises(ValueError, match=r'model\.name'):
        models.has_batch_stats('x')


def test_image_models_reject_flat_inputs():
    with pytest.raises(ValueError, match=r"model\.name: 'cnn' needs image inputs"):
        models.build(_cfg('cnn'), Meta(VECTOR, 3))
