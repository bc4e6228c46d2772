"""Tests of jaxbig.optim: every optimizer trains, decay/penalties/clipping/schedules do what they say."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig import optim

STEPS = 100


def make_cfg(**overrides):
  """The default `opt` section with the changes a test makes, as an experiment would."""
  cfg = optim.default_config()
  cfg.update(overrides)
  return cfg


def make_params():
  """A Dense kernel and bias and a BatchNorm scale, as Flax names them."""
  return {
      'Dense_0': {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]),
                  'bias': jnp.array([0.5, -1.5])},
      'BatchNorm_0': {'scale': jnp.array([2.0, -0.25])},
  }


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def step(tx, grads, params, state=None):
  """One update from `grads`; returns (new params, update, new state)."""
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return jax.tree.map(jnp.add, params, updates), updates, state


def quadratic_loss(params):
  leaves = jax.tree.leaves(params)
  return sum(0.5 * jnp.sum((p - 1.0) ** 2) for p in leaves)


def train(name, num_steps=50, **overrides):
  """Runs `num_steps` updates of `name` on the quadratic loss; returns (losses, final params)."""
  cfg = make_cfg(name=name, lr=0.1, schedule='constant', clip_norm=0.0, **overrides)
  tx, _ = optim.build(cfg, STEPS)
  params = make_params()

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(quadratic_loss)(params)
      updates, state = tx.update(grads, state, params)
      return (jax.tree.map(jnp.add, params, updates), state), loss
    (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, num_steps)
    return losses, params

  losses, params = run(params)
  return np.asarray(losses), params


# Optimizers.


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_every_optimizer_decreases_a_quadratic(name):
  losses, _ = train(name, weight_decay=0.0)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], f'{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}'


def test_optimizers_follow_different_trajectories():
  finals = {name: train(name, num_steps=10, weight_decay=0.1)[1] for name in optim.OPTIMIZERS}
  flat = {name: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
          for name, p in finals.items()}
  # adam + decoupled decay is AdamW by construction; every other pair must differ.
  np.testing.assert_allclose(flat['adam'], flat['adamw'], rtol=1e-6)
  for a, b in itertools.combinations(optim.OPTIMIZERS, 2):
    if {a, b} != {'adam', 'adamw'}:
      assert not np.allclose(flat[a], flat[b], rtol=1e-4, atol=1e-6), f'{a} == {b}'


@pytest.mark.parametrize('name,field,value', [
    ('momentum', 'momentum', 0.5), ('nesterov', 'momentum', 0.5), ('rmsprop', 'momentum', 0.5),
    ('adagrad', 'eps', 0.5), ('adam', 'b1', 0.5), ('adamw', 'b2', 0.9), ('adamw', 'eps', 0.5),
    ('lion', 'b1', 0.5), ('lion', 'b2', 0.5),
])
def test_hyperparameters_reach_the_optimizer(name, field, value):
  # 50 steps: Lion's sign update only feels b1/b2 once the iterates overshoot and oscillate.
  _, base = train(name)
  _, changed = train(name, **{field: value})
  assert not np.allclose(base['Dense_0']['kernel'], changed['Dense_0']['kernel'], rtol=1e-4)


# Weight decay and its mask.


def test_decay_mask_selects_only_kernels():
  assert optim.decay_mask(make_params()) == {
      'Dense_0': {'kernel': True, 'bias': False}, 'BatchNorm_0': {'scale': False}}
  abstract = jax.eval_shape(lambda: make_params())  # tx.init may see ShapeDtypeStructs.
  assert optim.decay_mask(abstract) == optim.decay_mask(make_params())


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'adam', 'momentum', 'lion'])
@pytest.mark.parametrize('wd', [0.0, 0.1])
def test_decoupled_weight_decay_shrinks_only_kernels_by_lr_wd_w(name, wd):
  lr = 0.5
  tx, _ = optim.build(make_cfg(name=name, lr=lr, weight_decay=wd, schedule='constant'), STEPS)
  params = make_params()
  state = None
  for _ in range(3):
    new, _, state = step(tx, zeros_like(params), params, state)
    kernel = params['Dense_0']['kernel']
    np.testing.assert_allclose(new['Dense_0']['kernel'], kernel - lr * wd * kernel, rtol=1e-6)
    np.testing.assert_array_equal(new['Dense_0']['bias'], params['Dense_0']['bias'])
    np.testing.assert_array_equal(new['BatchNorm_0']['scale'], params['BatchNorm_0']['scale'])
    params = new
  changed = not np.array_equal(params['Dense_0']['kernel'], make_params()['Dense_0']['kernel'])
  assert changed == (wd > 0)


def test_weight_decay_follows_the_schedule():
  """Decoupled decay is lr(t) * wd * w: zero on the first warmup step, not a constant wd * w."""
  tx, lr = optim.build(make_cfg(name='sgd', lr=0.5, weight_decay=0.1, warmup_steps=4), STEPS)
  params = make_params()
  kernel = params['Dense_0']['kernel']
  new, _, state = step(tx, zeros_like(params), params)
  np.testing.assert_array_equal(new['Dense_0']['kernel'], kernel)  # lr(0) == 0.
  newer, _, _ = step(tx, zeros_like(params), new, state)
  np.testing.assert_allclose(newer['Dense_0']['kernel'], kernel - lr(1) * 0.1 * kernel, rtol=1e-6)


# Coupled penalties.


@pytest.mark.parametrize('penalty', ['l1', 'l2', 'none'])
def test_penalties_move_only_kernels(penalty):
  lr, strength = 0.5, 0.2
  cfg = make_cfg(name='sgd', lr=lr, weight_decay=0.0, schedule='constant')
  if penalty != 'none':
    cfg[penalty] = strength
  tx, _ = optim.build(cfg, STEPS)
  params = make_params()
  new, _, _ = step(tx, zeros_like(params), params)
  kernel = params['Dense_0']['kernel']
  expected = {'l1': kernel - lr * strength * jnp.sign(kernel),
              'l2': kernel - lr * strength * kernel,
              'none': kernel}[penalty]
  np.testing.assert_allclose(new['Dense_0']['kernel'], expected, rtol=1e-6)
  np.testing.assert_array_equal(new['Dense_0']['bias'], params['Dense_0']['bias'])
  np.testing.assert_array_equal(new['BatchNorm_0']['scale'], params['BatchNorm_0']['scale'])


def test_l2_goes_through_adam_scaling_but_weight_decay_does_not():
  """Coupled L2 is normalised by Adam (first step ~ lr * sign); decoupled decay is lr * wd * w."""
  lr, strength = 0.01, 0.5
  params = make_params()
  kernel = params['Dense_0']['kernel']
  tx, _ = optim.build(make_cfg(name='adam', lr=lr, l2=strength, weight_decay=0.0,
                               schedule='constant'), STEPS)
  _, updates, _ = step(tx, zeros_like(params), params)
  np.testing.assert_allclose(updates['Dense_0']['kernel'], -lr * jnp.sign(kernel), rtol=1e-5)
  tx, _ = optim.build(make_cfg(name='adam', lr=lr, weight_decay=strength,
                               schedule='constant'), STEPS)
  _, updates, _ = step(tx, zeros_like(params), params)
  np.testing.assert_allclose(updates['Dense_0']['kernel'], -lr * strength * kernel, rtol=1e-5)


# Clipping.


@pytest.mark.parametrize('clip_norm', [0.0, 1.0, 3.0])
def test_clip_norm_bounds_the_global_update_norm(clip_norm):
  tx, _ = optim.build(make_cfg(name='sgd', lr=1.0, weight_decay=0.0, clip_norm=clip_norm,
                               schedule='constant'), STEPS)
  params = make_params()
  grads = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
  grad_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
  _, updates, _ = step(tx, grads, params)
  update_norm = float(np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree.leaves(updates))))
  np.testing.assert_allclose(update_norm, clip_norm if clip_norm else grad_norm, rtol=1e-5)


# Schedules.


@pytest.mark.parametrize('kind', optim.SCHEDULES)
@pytest.mark.parametrize('warmup', [0, 20])
def test_schedule_shape(kind, warmup):
  lr, end_factor, total = 0.4, 0.1, 100
  _, sched = optim.build(make_cfg(lr=lr, schedule=kind, warmup_steps=warmup,
                                  end_lr_factor=end_factor), total)
  at = lambda s: float(sched(s))
  if warmup:
    assert at(0) == 0.0
    np.testing.assert_allclose(at(warmup // 2), lr / 2, rtol=1e-6)
  np.testing.assert_allclose(at(warmup), lr, rtol=1e-6)
  middle = warmup + (total - warmup) // 2
  if kind == 'constant':
    for s in (warmup, middle, total - 1, total):
      np.testing.assert_allclose(at(s), lr, rtol=1e-6)
  else:
    np.testing.assert_allclose(at(total), lr * end_factor, rtol=1e-5)
    # Both are halfway at the midpoint; cosine is above the line before it, linear on it.
    np.testing.assert_allclose(at(middle), (lr + lr * end_factor) / 2, rtol=1e-5)
    quarter = warmup + (total - warmup) // 4
    linear_quarter = lr - 0.25 * (lr - lr * end_factor)
    if kind == 'linear':
      np.testing.assert_allclose(at(quarter), linear_quarter, rtol=1e-5)
    else:
      assert at(quarter) > linear_quarter * 1.05


def test_optimizer_uses_the_returned_schedule():
  cfg = make_cfg(name='sgd', lr=0.4, weight_decay=0.0, clip_norm=0.0, schedule='linear',
                 warmup_steps=2, end_lr_factor=0.0)
  tx, sched = optim.build(cfg, 10)
  params = {'w': jnp.zeros((3,))}
  state = tx.init(params)
  for t in range(10):
    updates, state = tx.update({'w': jnp.ones((3,))}, state, params)
    np.testing.assert_allclose(updates['w'], -float(sched(t)) * np.ones(3), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kind', ['cosine', 'linear'])
def test_all_warmup_schedule_builds(kind):
  _, sched = optim.build(make_cfg(schedule=kind, warmup_steps=10, end_lr_factor=0.2), 10)
  np.testing.assert_allclose(float(sched(5)), 0.5e-3, rtol=1e-6)  # Halfway through warmup.
  np.testing.assert_allclose(float(sched(10)), 0.2e-3, rtol=1e-6)  # lr * end_lr_factor.


# Validation.


@pytest.mark.parametrize('field,value', [
    ('name', 'adamax'),
    ('schedule', 'step'),
    ('lr', -0.1),
    ('lr', 0.0),
    ('momentum', 1.0),
    ('momentum', -0.1),
    ('weight_decay', -1e-4),
    ('l1', -0.1),
    ('l2', -0.1),
    ('clip_norm', -1.0),
    ('warmup_steps', -1),
    ('warmup_steps', STEPS + 1),
    ('end_lr_factor', 1.5),
    ('end_lr_factor', -0.1),
    ('b1', 1.0),
    ('b2', -0.5),
    ('eps', -1e-8),
])
def test_bad_field_raises_naming_it(field, value):
  cfg = make_cfg()
  optim.build(cfg, STEPS)  # The same config with the good value builds.
  cfg[field] = value
  with pytest.raises(ValueError, match=rf'^opt\.{field}\b') as info:
    optim.build(cfg, STEPS)
  assert '\n' not in str(info.value)
  assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_bad_total_steps_raises():
  with pytest.raises(ValueError, match='total_steps'):
    optim.build(make_cfg(), 0)


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match="unknown optimizer 'adamax'; choose from sgd, momentum"):
    optim.build(make_cfg(name='adamax'), STEPS)


def test_default_config_declares_every_field():
  cfg = optim.default_config()
  assert set(cfg.keys()) == {
      'name', 'lr', 'momentum', 'b1', 'b2', 'eps', 'weight_decay', 'l1', 'l2', 'clip_norm',
      'schedule', 'warmup_steps', 'end_lr_factor'}
  optim.validate(cfg, STEPS)
