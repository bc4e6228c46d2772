"""Signals sent to real `jaxbig train` processes: SIGKILL in the middle of an asynchronous
save, SIGTERM (preemption) to one process and to one of two."""

import json
import os
import signal

import pytest

import fault_helpers as fh
from jaxbig import config as config_lib, train
from orbax.checkpoint import step as ocp_step

pytestmark = pytest.mark.slow(reason='signals sent to real jaxbig train processes')

# A metrics line per step. Long enough that the signal always lands before the end.
STEPS = 100
RUN = ['train.log_every=1', 'train.eval_every=0', f'train.steps={STEPS}']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Per-step losses of the same run uninterrupted (in this process, on the same device)."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.ckpt_every=0']), str(workdir))
  return fh.losses(workdir)


def _temporary(ckpt_dir) -> list[str]:
  try:
    return [n for n in os.listdir(ckpt_dir) if ocp_step.TMP_DIR_SUFFIX in n]
  except FileNotFoundError:
    return []


def test_sigkill_during_an_async_save_resumes_bit_identically(reference, tmp_path, capfd):
  """A checkpoint every step, so that saves run back to back; killed the moment one of them
  has its temporary folder (Orbax is writing it) after step 5."""
  for attempt in range(3):  # The save may commit between our look and the kill: try again.
    workdir = tmp_path / f'run{attempt}'
    proc = fh.start('train', fh.CNN, *RUN, 'train.ckpt_every=1', 'train.keep_checkpoints=1',
                    '--workdir', workdir, log=tmp_path / f'log{attempt}.txt')
    fh.wait_for(lambda: fh.logged_steps(workdir) >= 5, proc)
    fh.wait_for(lambda: _temporary(workdir / 'checkpoints'), proc, every=0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if _temporary(workdir / 'checkpoints'):
      break
  left = _temporary(workdir / 'checkpoints')
  assert left, 'no kill landed in a save'
  unfinished = int(left[0].partition('.')[0])
  done = sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  assert done and max(done) < unfinished  # keep=1: the previous step was not collected.
  # Resumed without the checkpoint per step (a change that resuming allows), to be quick.
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.ckpt_every=0']),
                                     str(workdir))
  assert 'a save that did not finish' in capfd.readouterr().err
  assert summary['resumed_from'] == max(done)
  assert _temporary(workdir / 'checkpoints') == []
  got = fh.losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == reference  # Bit for bit: exact equality of every step's loss.


def test_sigterm_saves_the_current_step_and_exits_0(reference, tmp_path):
  workdir = tmp_path / 'run'
  log = tmp_path / 'log.txt'
  proc = fh.start('train', fh.CNN, *RUN, 'train.ckpt_every=0', '--workdir', workdir, log=log)
  fh.wait_for(lambda: fh.logged_steps(workdir) >= 5, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
  out = log.read_text()
  printed = json.loads(out[out.index('{\n'):out.index('\n}') + 2])
  step = printed['step']
  assert printed['preempted'] and 5 <= step < STEPS
  assert f'preempted (SIGTERM): saved step {step}' in out
  assert fh.committed(workdir) == [step]  # ckpt_every=0: only the preemption saved.
  assert max(fh.losses(workdir)) == step
  # The saved step resumes the run exactly.
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.ckpt_every=0']),
                                     str(workdir))
  assert summary['resumed_from'] == step
  assert fh.losses(workdir) == reference


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
  """The small MLP: two processes compile and step slowly on two cores. JAX agrees on the
  step to stop at a moment after the signal, so the run is long."""
  workdir = tmp_path / 'run'
  port = fh.free_port()
  logs = [tmp_path / f'log{i}.txt' for i in range(2)]
  run = ['train.log_every=1', 'train.eval_every=0', 'train.steps=5000']
  procs = [fh.start('train', fh.MLP, *run, 'train.ckpt_every=0', '--workdir', workdir,
                    '--coordinator', f'localhost:{port}', '--num-processes', 2,
                    '--process-id', i, log=logs[i]) for i in range(2)]
  fh.wait_for(lambda: fh.logged_steps(workdir) >= 5, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # Only process 1 is told; JAX tells process 0.
  codes = [p.wait(timeout=120) for p in procs]
  assert codes == [0, 0], [l.read_text()[-2000:] for l in logs]
  saved = []
  for i, log in enumerate(logs):
    line = [l for l in log.read_text().splitlines() if f'process {i}: preempted' in l]
    assert len(line) == 1, log.read_text()[-2000:]
    saved.append(int(line[0].split('saved step ')[1].split(';')[0]))
  assert saved[0] == saved[1] and 5 <= saved[0] < 5000
  assert fh.committed(workdir) == [saved[0]]
