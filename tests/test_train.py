"""Tests for jaxbig.train: exact resume, gradient accumulation, BatchNorm state, losses, golden step."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig import checkpoint, config as config_lib, data as data_lib, losses, train
from jaxbig import metrics as metrics_lib

CNN_SMOKE = 'experiments/cnn_digits.py:smoke'


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  config = config_lib.load(CNN_SMOKE, ['train.log_every=1', 'train.ckpt_every=5'])
  workdir = str(tmp_path_factory.mktemp('full'))
  train.train_and_evaluate(config, workdir)
  return config, _losses(workdir)


@pytest.fixture(scope='module')
def interrupted(uninterrupted, tmp_path_factory):
  """A workdir of the same run stopped after step 13; each test resumes a copy of it."""
  config, _ = uninterrupted
  workdir = tmp_path_factory.mktemp('interrupted') / 'run'
  assert train.train_and_evaluate(config, str(workdir), stop_after=13) is None
  return workdir


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_resume_is_bit_identical(uninterrupted, interrupted, tmp_path):
  config, expected = uninterrupted
  workdir = str(tmp_path / 'run')
  shutil.copytree(interrupted, workdir)  # Saved at 5 and 10.
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from'] == 10
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 21))
  # Dropout, shuffling and augmentation all take part: exact equality, not closeness.
  assert got == expected


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_resume_without_data_position_differs(uninterrupted, interrupted, tmp_path,
                                              monkeypatch):
  """The resume test can fail: forgetting the iterator position changes the losses."""
  config, expected = uninterrupted
  workdir = str(tmp_path / 'run')
  shutil.copytree(interrupted, workdir)
  original = data_lib.Data.train_iter

  def forgetful(self, rows=None):
    it = original(self, rows)
    it.set_state = lambda state: None
    return it

  monkeypatch.setattr(data_lib.Data, 'train_iter', forgetful)
  train.train_and_evaluate(config, workdir)
  got = _losses(workdir)
  assert all(got[s] == expected[s] for s in range(1, 11))
  assert any(got[s] != expected[s] for s in range(11, 21))


def _one_step(overrides, batch=None, spec=CNN_SMOKE):
  config = config_lib.load(spec, ['data.augment_shift=0',
                                   'opt.warmup_steps=0', *overrides])
  s = train.setup(config)
  state = train.init_state(s)
  steps = train.compile_steps(s, state, with_eval=False)
  if batch is None:
    batch = next(s.data.train_iter())
  new_state, metrics = steps.train(state, batch)
  return s, new_state, jax.device_get(metrics), batch


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_gradient_accumulation_equals_large_batch():
  _, big, m_big, batch = _one_step(['model.dropout=0.0', 'data.batch_size=32'])
  _, acc, m_acc, _ = _one_step(['model.dropout=0.0', 'data.batch_size=32', 'train.accum_steps=4'], batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               big.params, acc.params)
  np.testing.assert_allclose(m_big['loss'], m_acc['loss'], rtol=1e-5)
  assert m_acc['count'] == 32
  # Not vacuous: one micro-batch alone gives a different update. Its 8 examples repeated 4
  # times make the same mean gradient in the batch-32 program already compiled above.
  quarter = jax.tree.map(lambda a: np.concatenate([a[:8]] * 4), batch)
  _, small, _, _ = _one_step(['model.dropout=0.0', 'data.batch_size=32'], quarter)
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), big.params, small.params)
  assert max(jax.tree.leaves(diffs)) > 1e-6


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_batchnorm_statistics_update_in_training_only():
  config = config_lib.load('experiments/resnet_digits.py:smoke', ['data.augment_shift=0'])
  s = train.setup(config)
  state = train.init_state(s)
  stats0 = jax.device_get(state.batch_stats)  # The step donates the state.
  batch = next(s.data.train_iter())
  state, _ = train.compile_steps(s, state, with_eval=False).train(state, batch)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), stats0, state.batch_stats)
  assert all(jax.tree.leaves(changed)) and jax.tree.leaves(changed)
  x = jnp.asarray(batch['x'])
  # Jitted: a ResNet run op by op takes most of a minute on 2 cores.
  forward = jax.jit(train._forward, static_argnums=0, static_argnames='train')
  # The other rows replaced, same shape (one compile per mode): eval is per example, train
  # normalises with the batch's statistics.
  x_other = x.at[1:].set(x[::-1][:-1] * 0.5 + 1.0)
  run = lambda inputs, mode: forward(s.model, state.params, state.batch_stats, inputs,
                                     train=mode)[0][:1]
  np.testing.assert_allclose(run(x, False), run(x_other, False), rtol=1e-4, atol=1e-5)
  assert not np.allclose(run(x, True), run(x_other, True), atol=1e-4)


def test_golden_first_step():
  """Golden numbers: update them only for an intended change of init, data order or model."""
  _, _, metrics, _ = _one_step([])
  loss = metrics['loss'] / metrics['count']
  np.testing.assert_allclose(loss, GOLDEN_FIRST_LOSS, rtol=1e-4)


GOLDEN_FIRST_LOSS = 4.386779  # cnn_digits:smoke, seed 0, jax 0.10.2 on CPU (per-epoch numpy order).


def test_cross_entropy_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  smooth = 0.1
  targets = np.eye(4)[labels] * (1 - smooth) + smooth / 4
  per_example = -(targets * logp).sum(-1)
  expected = (per_example * mask * weights[labels]).sum()
  got, sums = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                                   label_smoothing=smooth, class_weights_K=jnp.asarray(weights))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert sums['count'] == 5  # The masked (padding) row is not counted.
  assert sums['correct'] == (logits.argmax(-1) == labels)[:5].sum()
  plain, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  assert abs(float(plain) - expected) > 1e-3  # Smoothing and weights change it.


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_argmax_is_argmax_equality_with_ties():
  """Ties (small integers: many) go to the first index, as in argmax; also per position."""
  rng = np.random.default_rng(1)
  logits = rng.integers(0, 3, (40, 7, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (40, 7))
  got = np.asarray(losses.argmax_is(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_array_equal(got, logits.argmax(-1) == labels)
  maxima = logits == logits.max(-1, keepdims=True)
  tied_label = np.take_along_axis(maxima, labels[..., None], -1)[..., 0] & (maxima.sum(-1) > 1)
  assert got[tied_label].any() and not got[tied_label].all()  # Ties both ways were tested.
  # A row of -inf (argmax: class 0), and labels that are no class (never correct).
  edge = np.array([[-np.inf] * 3] * 2 + [[1.0, 2.0, 3.0]] * 2, np.float32)
  edge_labels = np.array([0, 1, -1, 3])
  np.testing.assert_array_equal(losses.argmax_is(jnp.asarray(edge), jnp.asarray(edge_labels)),
                                [True, False, False, False])


def test_class_weights_balanced():
  cfg = config_lib.load(CNN_SMOKE, ['train.balance_classes=true']).train
  w = losses.class_weights(cfg, np.array([0, 0, 0, 1]), 2)
  np.testing.assert_allclose(w, [4 / 6, 4 / 2])
  cfg = config_lib.load(CNN_SMOKE, ['train.class_weights=1,2,3']).train
  with pytest.raises(config_lib.ConfigError, match='train.class_weights'):
    losses.class_weights(cfg, np.array([0, 1]), 2)


def test_checkpoints_from_before_loss_scaling_still_restore(tmp_path):
  """A state saved before TrainState had `loss_scale` and `skips` restores, with the first
  empty and no steps skipped."""
  s = train.setup(config_lib.load(CNN_SMOKE, []))
  state = train.init_state(s)
  old = {name: getattr(state, name)
         for name in ('step', 'params', 'batch_stats', 'opt_state', 'rng')}
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  ckpts.save(3, old, {}, {})
  ckpts.close()
  restored, _, _ = train.restore(s, checkpoint.Checkpoints(str(tmp_path)), 3)
  assert restored.loss_scale == {}
  assert (int(restored.skips.run), int(restored.skips.total)) == (0, 0)
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
  # A state that lacks a field holding values does not restore silently.
  fp16 = train.setup(config_lib.load(CNN_SMOKE, ['precision=fp16']))
  with pytest.raises(ValueError, match='loss_scale'):
    checkpoint.Checkpoints(str(tmp_path)).restore(3, train.abstract_state(fp16))


@pytest.mark.slow(reason='trains or compiles several train steps')
def test_profile_traces_the_asked_steps_with_annotations(uninterrupted, tmp_path):
  """train.profile_steps=2 after step 3: a trace of steps 4 and 5 in
  WORKDIR/tb/plugins/profile/, and the same losses as without it."""
  import glob
  import gzip
  config, reference = uninterrupted
  overrides = ['train.log_every=1', 'train.ckpt_every=5', 'train.profile_steps=2',
               'train.profile_start=3']
  train.train_and_evaluate(config_lib.load(CNN_SMOKE, overrides), str(tmp_path))
  traces = glob.glob(str(tmp_path / 'tb' / 'plugins' / 'profile' / '*' / '*.trace.json.gz'))
  assert len(traces) == 1 and glob.glob(str(tmp_path / 'tb/plugins/profile/*/*.xplane.pb'))
  with gzip.open(traces[0]) as f:
    events = json.load(f)['traceEvents']
  traced = sorted(int(e['args']['step_num']) for e in events if e.get('name') == 'train')
  assert traced == [4, 5]
  got = _losses(str(tmp_path))
  assert got == reference


def test_a_log_step_is_fetched_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
  """The host never waits for the device at a log step: the interval ending at step k is
  fetched once step k + 1 has been handed to the device (the last one after the loop)."""
  import dataclasses as dc
  dispatched, fetched = [], []
  compile_steps = train.compile_steps

  def counting(*args, **kwargs):
    steps = compile_steps(*args, **kwargs)
    run = steps.train
    return dc.replace(steps, train=lambda *a: dispatched.append(1) or run(*a))

  flush = metrics_lib.TrainLog.flush

  def recording(self, saved):
    if self.closed is not None:
      fetched.append((self.closed[0], len(dispatched)))
    return flush(self, saved)

  monkeypatch.setattr(train, 'compile_steps', counting)
  monkeypatch.setattr(metrics_lib.TrainLog, 'flush', recording)
  config = config_lib.load(CNN_SMOKE, ['train.log_every=4', 'train.eval_every=0',
                                       'train.ckpt_every=0', 'train.steps=12'])
  train.train_and_evaluate(config, str(tmp_path))
  assert fetched == [(4, 5), (8, 9), (12, 12)]
  assert sorted(_losses(str(tmp_path))) == [4, 8, 12]
