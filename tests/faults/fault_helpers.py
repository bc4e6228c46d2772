"""What the fault tests share: the smoke experiment, per-step losses, poisoned batches,
subprocess runs of the command, and a look at what a workdir's checkpoints hold."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from jaxbig import checkpoint, config as config_lib, data as data_lib, train

REPO = pathlib.Path(__file__).resolve().parents[2]
CNN = str(REPO / 'experiments' / 'cnn_digits.py') + ':smoke'
MLP = str(REPO / 'experiments' / 'mlp_diabetes.py') + ':smoke'


# A metrics line per step and a checkpoint every 5: a 20-step smoke run keeps 10, 15 and 20.
RESUMABLE = ['train.log_every=1', 'train.ckpt_every=5', 'train.eval_every=0']


def finished_run(tmp_path_factory) -> pathlib.Path:
  """The workdir of a finished smoke run with RESUMABLE settings."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  train.train_and_evaluate(config_lib.load(CNN, RESUMABLE), str(workdir))
  assert committed(workdir) == [10, 15, 20]
  return workdir


def copy_run(workdir, tmp_path, summary: bool = True) -> pathlib.Path:
  """A copy of the workdir to damage; without summary.json if not `summary` (as if killed
  just before writing it: the same command then resumes from its newest step)."""
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  if not summary:
    (copy / 'summary.json').unlink()
  return copy


def losses(workdir) -> dict[int, float]:
  """{step: train/loss} of metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


class _Poisoned:
  """A training iterator whose batches of the given (1-based) steps hold NaN inputs."""

  def __init__(self, it, steps):
    self._it, self._steps = it, set(steps)

  def __iter__(self):
    return self

  def __next__(self):
    step = self._it.get_state()['next_index'] + 1  # The step this batch is for.
    batch = next(self._it)
    if step in self._steps:
      batch = {**batch, 'x': np.full_like(batch['x'], np.nan)}
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def poison(monkeypatch, steps) -> None:
  """Makes the training batches of `steps` NaN in every run started after this."""
  original = data_lib.Data.train_iter
  monkeypatch.setattr(data_lib.Data, 'train_iter',
                      lambda self, rows=None: _Poisoned(original(self, rows), steps))


def snapshot(path) -> dict | bytes | None:
  """What `path` holds: None if nothing, a file's bytes, a folder's files (bytes) and folders
  (None) by relative path; the lock's holder line (rewritten by each run that takes it) left
  out."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  if path.is_file():
    return path.read_bytes()
  return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
          for p in sorted(path.rglob('*')) if not re.fullmatch(r'jaxbig-\d+\.lock', p.name)}


def forbid_compiling(monkeypatch) -> None:
  """Makes reaching the state's init or the steps' compile fail the test."""
  def compiled(*args, **kwargs):
    raise AssertionError('reached compilation')

  monkeypatch.setattr(train, 'init_state', compiled)
  monkeypatch.setattr(train, 'compile_steps', compiled)


def committed(workdir) -> list[int]:
  """Steps in the workdir that Orbax committed and that have our manifest."""
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit() and
                os.path.exists(os.path.join(folder, n, checkpoint.MANIFEST)))


def checkpoint_states(workdir, spec: str, overrides=()) -> dict[int, train.TrainState]:
  """Every committed checkpoint of the workdir, restored."""
  s = train.setup(config_lib.load(spec, list(overrides)))
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  out = {step: train.restore(s, ckpts, step)[0] for step in ckpts.steps()}
  ckpts.close()
  return out


def all_finite(state) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def env(**extra) -> dict:
  path = [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(path), 'JAX_PLATFORMS': 'cpu', **extra}


def start(*args, log: pathlib.Path) -> subprocess.Popen:
  """`python -m jaxbig ARGS` in the background; stdout and stderr go to `log`."""
  with open(log, 'w') as f:
    return subprocess.Popen([sys.executable, '-m', 'jaxbig', *map(str, args)], cwd=REPO,
                            env=env(), stdout=f, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, every: float = 0.003):
  """Polls `predicate()` until it is truthy and returns its value; fails if `proc` ends first."""
  t0 = time.monotonic()
  while time.monotonic() - t0 < timeout:
    value = predicate()
    if value:
      return value
    assert proc.poll() is None, f'the run ended (exit {proc.returncode}) before the fault'
    time.sleep(every)
  raise AssertionError('timed out waiting for the run')


def logged_steps(workdir) -> int:
  """How many lines metrics.jsonl has (0 before it exists)."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]
