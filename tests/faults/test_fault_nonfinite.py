"""Non-finite steps: skipped bit for bit and counted, the count resumes, too many in a row
stop the run (exit 3) and no checkpoint ever holds a non-finite value."""

import dataclasses

import jax
import numpy as np
import pytest

import conftest
import fault_helpers as fh
from jaxbig import config as config_lib, faults, train

# Short runs: checkpoints every 5 steps, a metrics line per step.
RUN = ['train.log_every=1', 'train.ckpt_every=5', 'train.eval_every=0']


@pytest.fixture(scope='module', params=['branch', 'select'])
def compiled(request):
  """The smoke CNN's setup, a fresh state on the host and the compiled steps (no augmentation,
  no warmup), with the guard of CPUs (lax.cond) or of the other platforms (jnp.where). The
  steps donate their state: give each call a copy on the device."""
  s = train.setup(config_lib.load(fh.CNN, ['data.augment_shift=0', 'opt.warmup_steps=0']))
  s = dataclasses.replace(s, kernels=dataclasses.replace(s.kernels, guard=request.param))
  state = train.init_state(s)
  steps = train.compile_steps(s, state, with_eval=False)
  branches = 'stablehlo.case' in train.lower_train_step(s).as_text()
  assert branches == (request.param == 'branch')
  return s, jax.device_get(state), steps


@pytest.mark.parametrize('poison', ['nan_input', 'overflowing_input'])
@pytest.mark.slow(reason='trains runs with NaN batches')
def test_a_non_finite_step_keeps_the_state_bit_for_bit(compiled, poison):
  s, host_state, steps = compiled
  it = s.data.train_iter()
  state, _ = steps.train(jax.device_put(host_state), next(it))
  before = jax.device_get(state)
  batch = next(it)
  # NaN pixels, or finite pixels so large that the activations overflow float32.
  bad = dict(batch, x=np.full_like(batch['x'], np.nan) if poison == 'nan_input'
             else batch['x'] * np.float32(1e38))
  assert np.isfinite(bad['x']).all() == (poison == 'overflowing_input')
  skipped, m_bad = steps.train(state, bad)
  after = jax.device_get(skipped)
  assert float(m_bad['skipped']) == 1.0 and not np.isfinite(float(m_bad['loss']))
  for name in ('params', 'opt_state', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
  assert (int(after.skips.run), int(after.skips.total)) == (1, 1)
  assert int(after.step) == int(before.step) + 1  # Counted as a step; the data moved on.
  # The same step on the clean batch does change the parameters: the guard is what kept them.
  clean, m_ok = steps.train(jax.device_put(before), batch)
  assert float(m_ok['skipped']) == 0.0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(clean).params, before.params)
  assert all(jax.tree.leaves(changed))
  # The next good step ends the run of skips but keeps the total.
  good, _ = steps.train(skipped, next(it))
  assert (int(good.skips.run), int(good.skips.total)) == (0, 1)


@pytest.mark.slow(reason='trains runs with NaN batches')
def test_skipped_steps_are_counted_across_a_resume(monkeypatch, tmp_path):
  """NaN batches at steps 3 and 8; interrupted at 6 (checkpoint at 5) and resumed."""
  fh.poison(monkeypatch, {3, 8})
  config = config_lib.load(fh.CNN, RUN)
  workdir = str(tmp_path / 'run')
  assert train.train_and_evaluate(config, workdir, stop_after=6) is None
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from'] == 5
  assert summary['skipped_steps'] == 2  # 1 before the checkpoint, 1 after: the count resumed.
  rows = {r['step']: r for r in fh.metrics(workdir) if 'train/loss' in r}
  assert sorted(rows) == list(range(1, 21))
  assert [s for s, r in rows.items() if r['train/skipped_steps']] == [3, 8]
  assert np.isnan(rows[3]['train/loss']) and np.isfinite(rows[4]['train/loss'])
  states = fh.checkpoint_states(workdir, fh.CNN, RUN)
  assert sorted(states) == [10, 15, 20]
  assert all(fh.all_finite(st) for st in states.values())
  assert int(states[20].skips.total) == 2


@pytest.mark.parametrize('poisoned, overrides, code', [
    ({6, 7}, ['train.max_consecutive_skips=2'], 0),  # 2 in a row: within the limit.
    ({6, 7, 8}, ['train.max_consecutive_skips=2'], 3),  # 3 in a row: stop after step 8.
    ({7}, ['train.on_nonfinite=abort'], 3),  # abort: the first stops it.
], ids=['within_limit', 'past_limit', 'abort'])
@pytest.mark.slow(reason='trains runs with NaN batches')
def test_too_many_skips_in_a_row_stop_the_run(poisoned, overrides, code, monkeypatch, capsys,
                                              tmp_path):
  fh.poison(monkeypatch, poisoned)
  workdir = tmp_path / 'run'
  got, _, err = conftest.run_cli(capsys, 'train', fh.CNN, *RUN, *overrides, '--workdir', workdir)
  assert got == code, err
  states = fh.checkpoint_states(workdir, fh.CNN, RUN + overrides)
  assert all(fh.all_finite(st) for st in states.values())
  rows = {r['step']: r for r in fh.metrics(workdir) if 'train/loss' in r}
  assert [s for s, r in rows.items() if r['train/skipped_steps']] == sorted(poisoned)
  if code == 0:
    assert sorted(states) == [10, 15, 20] and (workdir / 'summary.json').exists()
    return
  last = max(poisoned)
  line = [l for l in err.splitlines() if l.startswith('jaxbig: error: ')]
  assert len(line) == 1 and f'in a row up to step {last}' in line[0], err
  assert 'Newest checkpoint: step 5' in line[0] and 'train.max_consecutive_skips' in line[0]
  assert sorted(states) == [5]  # Nothing saved after the limit was passed (step 10 would be).
  assert not (workdir / 'summary.json').exists()
  assert max(rows) == last  # It stopped at the step that passed the limit.


@pytest.mark.slow(reason='trains runs with NaN batches')
def test_a_non_finite_state_is_never_saved(monkeypatch, tmp_path):
  """Parameters that are NaN from the start (every step skipped): the first save refuses."""
  init_state = train.init_state

  def nan_init(s):
    state = init_state(s)
    return state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))

  monkeypatch.setattr(train, 'init_state', nan_init)
  config = config_lib.load(fh.CNN, RUN)  # The limit, 25, is past the first save at step 5.
  with pytest.raises(faults.NonFiniteError, match='refusing to save step 5'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert fh.committed(tmp_path / 'run') == []
  assert fh.metrics(tmp_path / 'run')[4]['train/skipped_steps'] == 1.0
