"""Precision policies: the types in the compiled step, training close to fp32, and loss
scaling (fp16) that skips an overflowing step without touching the state."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxbig import config as config_lib, precision, train
from jaxbig.config import ConfigError

MODELS = {
    'cnn': 'experiments/cnn_digits.py:smoke',
    'transformer': 'experiments/gpt_stdlib.py:smoke',
}
STEPS = 10
# Relative tolerance of each policy's per-step losses against fp32's over STEPS steps.
# Measured worst cases (cnn, transformer): fp16 2e-4, bf16 4e-3, int8 3e-3, fp8 2.5e-2.
# cnn: 2 convolutions and 2 dense layers. transformer: 2 blocks of q, k, v, scores, values,
# output, MLP in and out, plus the logits.
FORWARD_MATMULS = {'cnn': 4, 'transformer': 17}
RTOL = {'tf32': 1e-5, 'fp16': 3e-3, 'bf16': 0.03, 'int8': 0.03, 'fp8': 0.06}


def _setup(model: str, name: str, *overrides):
  return train.setup(config_lib.load(MODELS[model], ['mesh.data=1', f'precision={name}',
                                                     *overrides]))


def _types(ops: list[str]) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of StableHLO dot_general and convolution lines."""
  t = r'tensor<(?:\d+x)*(\w+)>'
  types = [re.search(rf':\s*\({t}, {t}\)\s*->\s*{t}', op).groups() for op in ops]
  assert len(types) == len(ops) and ops
  return types


@pytest.mark.parametrize('model', MODELS)
def test_compiled_step_has_the_policy_types(runs, model):
  fp32, tf32, bf16 = (runs[model, p]['matmuls'] for p in ('fp32', 'tf32', 'bf16'))
  assert len(fp32) == len(tf32)
  # On CPUs the float32 CNN's 64 -> 128 convolution is Winograd's matmuls (kernels/winograd.py):
  # its forward and two gradient convolutions become two batched products each.
  assert len(bf16) == len(fp32) - (3 if model == 'cnn' else 0)
  assert all(m.count('HIGHEST') == 2 for m in fp32)  # Both operands.
  assert not any('HIGHEST' in m for m in tf32 + bf16)
  assert all(t == ('f32', 'f32', 'f32') for t in _types(fp32) + _types(tf32))
  # Most matmuls take bfloat16 operands; the logits and the loss stay float32.
  tb16 = _types(bf16)
  assert sum(t[:2] == ('bf16', 'bf16') for t in tb16) > len(tb16) // 2

  t16 = _types(runs[model, 'fp16']['matmuls'])
  assert sum(t[:2] == ('f16', 'f16') for t in t16) > len(t16) // 2
  assert not any('bf16' in t for t in t16)

  # int8: every forward matmul takes int8 operands and accumulates in int32; the gradients
  # flow in bfloat16.
  t8 = _types(runs[model, 'int8']['matmuls'])
  s8 = [t for t in t8 if t[:2] == ('i8', 'i8')]
  assert len(s8) == FORWARD_MATMULS[model] and all(t[2] == 'i32' for t in s8)
  assert all(t == ('bf16', 'bf16', 'bf16') for t in t8 if t not in s8)

  # fp8: e4m3 operands forward; e5m2 gradients meet them in the dense layers' backward pass.
  tf8 = _types(runs[model, 'fp8']['matmuls'])
  fwd = [t for t in tf8 if t[:2] == ('f8E4M3FN', 'f8E4M3FN')]
  bwd = [t for t in tf8 if 'f8E5M2' in t[:2]]
  assert len(fwd) == FORWARD_MATMULS[model]
  assert bwd and all(t[:2] in (('f8E5M2', 'f8E4M3FN'), ('f8E4M3FN', 'f8E5M2')) for t in bwd)


def _jobs() -> dict:
  jobs = {}
  for model, spec in MODELS.items():
    for name in ('fp32', *RTOL):
      jobs[model, name] = {'spec': spec, 'overrides': ['mesh.data=1', f'precision={name}'],
                           'devices': 1, 'steps': STEPS, 'matmuls': True}
  # Quantised training on a sharded mesh: Qwix's scales are reductions over split dimensions.
  jobs['transformer', 'int8', (2, 2, 2)] = {
      'spec': MODELS['transformer'], 'devices': 8, 'steps': STEPS,
      'overrides': ['mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2', 'precision=int8']}
  return jobs


def worker_jobs() -> list[dict]:
  """The training runs, which conftest.py hands to a background worker (tests/mesh_worker.py)."""
  return list(_jobs().values())


@pytest.fixture(scope='module')
def runs(request, tmp_path_factory) -> dict:
  """Each job's result: {'losses': per step, 'matmuls': the train step's matmul lines}."""
  results = conftest.worker_results(request, tmp_path_factory)
  assert not any('error' in r for r in results), results
  return dict(zip(_jobs(), results))


@pytest.mark.parametrize('model', MODELS)
def test_precisions_train_close_to_fp32(runs, model):
  fp32 = runs[model, 'fp32']['losses']
  assert fp32[-1] < fp32[0] - 0.1  # It trains.
  for name, rtol in RTOL.items():
    got = runs[model, name]['losses']
    np.testing.assert_allclose(got, fp32, rtol=rtol, err_msg=name)
    if name != 'tf32':  # CPUs have no TF32: the same numbers. The others really differ.
      assert max(abs(a - b) for a, b in zip(got, fp32)) > 1e-5, name


def test_quantised_training_runs_on_a_sharded_mesh(runs):
  one = runs['transformer', 'int8']['losses']
  mesh = runs['transformer', 'int8', (2, 2, 2)]['losses']
  np.testing.assert_allclose(mesh, one, rtol=1e-3)


def test_unknown_precision_is_one_line():
  with pytest.raises(ConfigError, match="^precision: unknown precision 'fp64'; choose from"):
    precision.get(config_lib.load(MODELS['cnn'], ['precision=fp64']))


def test_fp16_refuses_to_train_without_loss_scaling():
  with pytest.raises(ConfigError, match='^loss_scale.mode=none: precision=fp16 needs loss'):
    _setup('cnn', 'fp16', 'loss_scale.mode=none')
  assert _setup('cnn', 'fp32', 'loss_scale.mode=none').scaling is None
  assert _setup('cnn', 'bf16').scaling is None  # auto: only fp16 scales.
  assert _setup('cnn', 'bf16', 'loss_scale.mode=static').scaling.dynamic is False


def test_loss_scale_grows_backs_off_and_caps():
  scaling = precision.LossScaling(dynamic=True, init=8.0, growth_interval=2, factor=2.0,
                                  max=32.0)
  ls = scaling.init_state()
  trace = []
  for finite in (True, True, True, True, True, True, False, False, False, False, True):
    ls = scaling.update(ls, jnp.asarray(finite))
    trace.append(float(ls.scale))
  assert trace == [8, 16, 16, 32, 32, 32, 16, 8, 4, 2, 2]
  assert int(ls.skipped) == 4
  ls = scaling.update(ls.replace(scale=jnp.asarray(1.0)), jnp.asarray(False))
  assert float(ls.scale) == 1.0  # Never below 1.
  static = precision.LossScaling(False, 8.0, 2, 2.0, 32.0)
  ls = static.init_state()
  for finite in (True, True, True, False):
    ls = static.update(ls, jnp.asarray(finite))
  assert float(ls.scale) == 8.0 and int(ls.skipped) == 1


@pytest.mark.slow(reason='trains runs under loss scaling')
def test_overflow_halves_the_scale_and_leaves_the_state_unchanged():
  s = _setup('cnn', 'fp16')
  state = train.init_state(s)
  steps = train.compile_steps(s, state, with_eval=False)
  it = s.data.train_iter()
  state, m1 = steps.train(state, next(it))
  assert float(m1['skipped']) == 0.0 and float(m1['loss_scale']) == 2.0**15
  before = jax.device_get(state)
  poisoned = next(it)
  poisoned['x'] = poisoned['x'] * 1e6  # float16 overflows (max 65504) in the first conv.
  state, m2 = steps.train(state, poisoned)
  after = jax.device_get(state)
  assert float(m2['skipped']) == 1.0
  assert float(after.loss_scale.scale) == 2.0**14 and int(after.loss_scale.skipped) == 1
  for name in ('params', 'opt_state', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
  assert int(after.step) == int(before.step) + 1  # Counted as a step; the data moved on.
  state, m3 = steps.train(state, next(it))  # Training goes on at the lower scale.
  assert float(m3['skipped']) == 0.0
  updated = jax.device_get(state)
  assert float(updated.loss_scale.scale) == 2.0**14
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), updated.params, after.params)
  assert all(jax.tree.leaves(changed))
  assert all(np.isfinite(x).all() and x.dtype == np.float32
             for x in jax.tree.leaves(updated.params))


def test_fp8_is_emulated_without_fp8_units():
  device = lambda platform, cc='': type('Device', (), {'platform': platform,
                                                       'compute_capability': cc})()
  fp8, int8 = precision.POLICIES['fp8'], precision.POLICIES['int8']
  assert precision.emulated(fp8, device('cpu'))
  assert precision.emulated(fp8, device('gpu', '8.0'))  # A100.
  assert not precision.emulated(fp8, device('gpu', '9.0'))  # H100.
  assert not precision.emulated(int8, device('cpu'))


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
@pytest.mark.slow(reason='trains runs under loss scaling')
def test_fp16_run_reports_its_skipped_steps(mode, tmp_path):
  config = config_lib.load(MODELS['cnn'], [f'parallel.mode={mode}', 'precision=fp16',
                                           'train.steps=4', 'train.log_every=2',
                                           'train.eval_every=0', 'train.ckpt_every=0'])
  summary = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert summary['precision'] == 'fp16' and summary['skipped_steps'] == 0
  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f if 'train/skipped_steps' in line]
  assert [m['loss_scale'] for m in logged] == [2.0**15, 2.0**15]
