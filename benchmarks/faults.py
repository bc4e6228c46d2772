"""Fault-injection campaign: kills, preemptions, corrupt checkpoints and NaNs against real
`jaxbig train` runs of `experiments/cnn_digits.py:smoke`, with the figures printed as Markdown.

    python benchmarks/faults.py [--kills 20] [--corruptions 8] [--nans 6] [--seed 0]

  SIGKILL     at a time drawn uniformly over an uninterrupted run's wall time (start-up,
              compile, steps, the asynchronous saves, the final evaluation); then the same
              command again. Resumed: it finished and started from the newest step that Orbax
              had committed (none: from scratch). Bit-identical: per-step losses equal to the
              uninterrupted run's, bit for bit.
  SIGTERM     to 1 process, and to 1 of 2 (the MLP smoke run): exit codes, the step each
              process saved, and for 1 process the resume against the uninterrupted run.
  corruption  of the newest checkpoint of a finished run (a bit flipped, a file cut short or
              deleted, garbage appended; file and place drawn at random); then the command
              again. Detected: a warning naming the step, the run resumed from the previous
              one and its losses bit-identical. Beside it, what Orbax's restore alone makes of
              the same damage (an error, or arrays that differ from the saved ones).
  NaN         batches injected at random steps of in-process runs: skipped steps counted,
              and every checkpoint restored and searched for non-finite values (must be 0);
              then more NaN steps in a row than allowed: the run stops with exit code 3.
  two trains  on one workdir: the second, started while the first trains, must stop at once
              with exit code 2 naming the holder; the first must finish with one metrics row
              per step.
  eval        `jaxbig eval` run back to back while a run saves every step and keeps 1
              checkpoint (each step is deleted as the next one commits): every eval must
              succeed, and the run must not notice.
Takes about 10 minutes on a 2-core CPU (most of it process start-up: each run imports JAX).
`--only concurrency` runs the last two alone (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
CACHE = tempfile.mkdtemp(prefix='jaxbig-faults-xla-cache-')  # Shared by every run below.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

CNN = 'experiments/cnn_digits.py:smoke'
MLP = 'experiments/mlp_diabetes.py:smoke'
# 200 steps with a checkpoint every 2 (saves run back to back: kills land in them), the 2
# newest kept, a metrics line per step.
RUN = ['train.steps=200', 'train.ckpt_every=2', 'train.keep_checkpoints=2',
       'train.log_every=1', 'train.eval_every=0']


def _env() -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO)}


def _start(workdir, spec=CNN, extra=(), log=None) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'jaxbig', 'train', spec, *RUN, *extra, '--workdir', str(workdir)]
  out = open(log, 'w') if log else subprocess.PIPE
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                          text=True)


def _train(workdir, extra=()) -> tuple[int, str, dict | None]:
  """Runs the command to its end: (exit code, output, the printed summary or None)."""
  proc = _start(workdir, extra=extra)
  out, _ = proc.communicate(timeout=900)
  summary = json.loads(out[out.index('{\n'):]) if '{\n' in out else None
  return proc.returncode, out, summary


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r}


def _committed(workdir) -> list[int]:
  """Steps Orbax finished (renamed from their temporary folder), whatever their manifest."""
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) \
      else []


def _temporary(workdir) -> list[str]:
  folder = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(folder) if 'orbax-checkpoint-tmp' in n] \
      if os.path.isdir(folder) else []


def _identical(reference: dict, got: dict) -> int:
  return sum(1 for step, loss in reference.items() if got.get(step) == loss)


def reference_runs(root) -> tuple[dict, float, pathlib.Path, bool]:
  """Two uninterrupted runs: the first fills the compilation cache, the second is timed.
  Returns the losses, the second's wall time, its workdir and whether the two agree."""
  code, out, _ = _train(root / 'warm-up')
  assert code == 0, out[-3000:]
  workdir = root / 'reference'
  t0 = time.perf_counter()
  code, out, _ = _train(workdir)
  assert code == 0, out[-3000:]
  return _losses(workdir), time.perf_counter() - t0, workdir, \
      _losses(workdir) == _losses(root / 'warm-up')


def kills(root, n: int, rng: random.Random, reference: dict, wall: float) -> list[str]:
  resumed = identical = during_save = fresh = finished = 0
  total_steps = 0
  for i in range(n):
    workdir = root / f'kill{i}'
    proc = _start(workdir, log=root / f'kill{i}.log')
    time.sleep(rng.uniform(0.0, wall))
    finished += proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    during_save += bool(_temporary(workdir))
    expected = max(_committed(workdir), default=None)
    fresh += expected is None
    code, out, summary = _train(workdir)
    if summary and summary.get('finished_already'):  # Killed after the run had ended.
      ok = code == 0 and expected == len(reference)
    else:
      ok = code == 0 and summary['resumed_from'] == expected and not _temporary(workdir)
    resumed += ok
    got = _losses(workdir) if code == 0 else {}
    identical += _identical(reference, got)
    total_steps += len(reference)
    if not ok:
      print(f'kill {i}: exit {code}, expected resume from {expected}: {out[-1500:]}',
            file=sys.stderr)
  return [f'| SIGKILL at a random time | {n} | resumed from the newest committed step: '
          f'{resumed}/{n} ({during_save} killed during an asynchronous save, {fresh} before '
          f'the first commit, {finished} after the run had ended) | bit-identical steps: '
          f'{identical}/{total_steps} |']


def _wait_logged(workdir, proc, lines: int) -> None:
  path = os.path.join(workdir, 'metrics.jsonl')
  while not (os.path.exists(path) and sum(1 for _ in open(path)) >= lines):
    assert proc.poll() is None, 'the run ended before the signal'
    time.sleep(0.003)


def sigterm_one(root, rng: random.Random, reference: dict) -> list[str]:
  workdir = root / 'term1'
  proc = _start(workdir, log=root / 'term1.log')
  _wait_logged(workdir, proc, rng.randint(5, 100))
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=300)
  text = (root / 'term1.log').read_text()
  summary = json.loads(text[text.index('{\n'):text.index('\n}') + 2])
  step = summary['step']
  saved = max(_committed(workdir))
  code2, _, resumed = _train(workdir)
  same = _identical(reference, _losses(workdir))
  return [f'| SIGTERM, 1 process | 1 | exit code {code}; saved step {step} (newest on disk: '
          f'{saved}) | resumed from {resumed["resumed_from"]} (exit {code2}); bit-identical '
          f'steps: {same}/{len(reference)} |']


def sigterm_two(root) -> list[str]:
  workdir = root / 'term2'
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  extra = ['train.steps=5000', 'train.ckpt_every=0', '--coordinator', f'localhost:{port}',
           '--num-processes', '2']
  logs = [root / f'term2-{i}.log' for i in range(2)]
  procs = [_start(workdir, MLP, [*extra, '--process-id', str(i)], logs[i]) for i in range(2)]
  _wait_logged(workdir, procs[0], 5)
  procs[1].send_signal(signal.SIGTERM)  # Only process 1 is told.
  codes = [p.wait(timeout=300) for p in procs]
  steps = []
  for i, log in enumerate(logs):
    line = [l for l in log.read_text().splitlines() if f'process {i}: preempted' in l]
    steps.append(line[0].split('saved step ')[1].split(';')[0] if line else 'none')
  same = 'yes' if steps[0] == steps[1] != 'none' else 'NO'
  return [f'| SIGTERM to process 1 of 2 (`{MLP}`) | 1 | exit codes {codes[0]}, {codes[1]}; '
          f'saved steps {steps[0]}, {steps[1]} (on disk: {_committed(workdir)}) | both saved '
          f'the same step: {same} |']


def _damage(path: pathlib.Path, kind: str, rng: random.Random) -> None:
  data = bytearray(path.read_bytes())
  if kind == 'bit flip' and data:
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
  elif kind == 'truncated':
    data = data[:rng.randrange(len(data))] if data else data
  elif kind == 'garbage appended':
    data += bytes(rng.randrange(256) for _ in range(16))
  if kind == 'deleted':
    path.unlink()
  else:
    path.write_bytes(bytes(data))


def _orbax_alone(step_dir: pathlib.Path, original) -> str:
  """What restoring the damaged step with Orbax alone (no checksums) gives."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(step_dir / 'state')
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored),
                                                      jax.tree.leaves(original)))
    return 'restored unchanged' if same else 'restored different values, silently'
  except Exception:  # pylint: disable=broad-except
    return 'raised an error'


def corruptions(root, n: int, rng: random.Random, reference: dict,
                finished: pathlib.Path) -> list[str]:
  import orbax.checkpoint as ocp
  from jaxbig import checkpoint
  newest = max(_committed(finished))
  with ocp.StandardCheckpointer() as ckptr:
    original = ckptr.restore(finished / 'checkpoints' / str(newest) / 'state')
  kinds = ['bit flip', 'truncated', 'deleted', 'garbage appended']
  detected = identical = 0
  orbax = {}
  for i in range(n):
    workdir = root / f'corrupt{i}'
    shutil.copytree(finished, workdir)
    step_dir = workdir / 'checkpoints' / str(newest)
    files = sorted(p for p in step_dir.rglob('*') if p.is_file() and
                   p.name != checkpoint.MANIFEST)
    kind = kinds[i % len(kinds)]
    target = rng.choice(files)
    _damage(target, kind, rng)
    outcome = _orbax_alone(step_dir, original)
    orbax[outcome] = orbax.get(outcome, 0) + 1
    code, out, summary = _train(workdir)
    ok = (code == 0 and f'checkpoint step {newest} is corrupt' in out
          and summary['resumed_from'] == newest - 2)
    detected += ok
    identical += _identical(reference, _losses(workdir)) == len(reference)
    if not ok:
      print(f'corruption {i} ({kind}, {target}): exit {code}: {out[-1500:]}', file=sys.stderr)
  alone = ', '.join(f'{v} {k}' for k, v in sorted(orbax.items()))
  return [f'| corrupt newest checkpoint ({", ".join(kinds)}) | {n} | detected and fell back: '
          f'{detected}/{n}; runs bit-identical after it: {identical}/{n} | Orbax alone: {alone} |']


def nans(root, n: int, rng: random.Random) -> list[str]:
  """In-process runs with NaN batches (the iterator is wrapped: no hooks in jaxbig)."""
  import jax
  import numpy as np
  from jaxbig import checkpoint, config as config_lib, data as data_lib, faults, train
  original = data_lib.Data.train_iter
  poisoned: set[int] = set()

  class Poisoned:
    def __init__(self, it):
      self.it = it

    def __iter__(self):
      return self

    def __next__(self):
      step = self.it.get_state()['next_index'] + 1
      batch = next(self.it)
      return {**batch, 'x': np.full_like(batch['x'], np.nan)} if step in poisoned else batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  data_lib.Data.train_iter = lambda self, rows=None: Poisoned(original(self, rows))

  def nonfinite_checkpoints(workdir, config) -> tuple[int, int]:
    s = train.setup(config)
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
    bad = 0
    for step in ckpts.steps():
      state = train.restore(s, ckpts, step)[0]
      bad += not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)
                     if np.issubdtype(np.asarray(x).dtype, np.floating))
    return bad, len(ckpts.steps())

  steps = 200
  poisoned = set(rng.sample(range(1, steps + 1), n))
  config = config_lib.load(CNN, RUN[:1] + ['train.ckpt_every=10', 'train.keep_checkpoints=20',
                                           'train.log_every=1', 'train.eval_every=0'])
  summary = train.train_and_evaluate(config, str(root / 'nan-skip'))
  logged = sum(r.get('train/skipped_steps', 0) for r in map(json.loads,
                                                             open(root / 'nan-skip' /
                                                                  'metrics.jsonl')))
  bad, total = nonfinite_checkpoints(root / 'nan-skip', config)
  rows = [f'| NaN batches at {n} random steps (skip) | {n} | skipped steps: '
          f'{summary["skipped_steps"]} (logged: {int(logged)}) | non-finite checkpoints: '
          f'{bad}/{total} |']
  limit = 3
  first = rng.randint(20, 150)
  poisoned = set(range(first, first + limit + 1))
  config = config_lib.load(CNN, RUN[:1] + ['train.ckpt_every=10', 'train.keep_checkpoints=20',
                                           'train.log_every=1', 'train.eval_every=0',
                                           f'train.max_consecutive_skips={limit}'])
  try:
    train.train_and_evaluate(config, str(root / 'nan-abort'))
    stopped = 'did not stop'
  except faults.NonFiniteError as e:
    stopped = f'stopped (exit code 3 from the command): "{str(e)[:60]}..."'
  bad, total = nonfinite_checkpoints(root / 'nan-abort', config)
  rows.append(f'| {limit + 1} NaN batches in a row from step {first}, limit {limit} | 1 | '
              f'{stopped} | non-finite checkpoints: {bad}/{total} |')
  data_lib.Data.train_iter = original
  return rows


def two_trains(root, n: int) -> list[str]:
  refused = finished = unique = 0
  for i in range(n):
    workdir = root / f'two{i}'
    first = _start(workdir, log=root / f'two{i}-a.log')
    _wait_logged(workdir, first, 5)
    second = subprocess.run(
        [sys.executable, '-m', 'jaxbig', 'train', CNN, *RUN, '--workdir', str(workdir)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    lines = second.stderr.strip().splitlines()
    refused += (second.returncode == 2 and len(lines) == 1 and
                f'pid {first.pid}' in lines[0])
    finished += first.wait(timeout=300) == 0
    steps = [r['step'] for r in map(json.loads, open(workdir / 'metrics.jsonl'))
             if 'train/loss' in r]
    unique += steps == list(range(1, len(steps) + 1)) and len(steps) == 200
  return [f'| a second `jaxbig train` on a workdir in use | {n} | refused at once (exit 2, '
          f'one line naming the holder\'s pid): {refused}/{n} | first run finished: '
          f'{finished}/{n}; one row per step: {unique}/{n} |']


def eval_during_training(root) -> list[str]:
  workdir = root / 'eval-during'
  train_proc = _start(workdir, extra=['train.ckpt_every=1', 'train.keep_checkpoints=1',
                                      'train.steps=400'], log=root / 'eval-during.log')
  _wait_logged(workdir, train_proc, 3)
  evals = ok = 0
  while train_proc.poll() is None:
    out = subprocess.run([sys.executable, '-m', 'jaxbig', 'eval', str(workdir)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    if train_proc.poll() is not None and out.returncode == 0:
      break  # Finished while evaluating: only evals that overlapped training count.
    evals += 1
    ok += out.returncode == 0
    if out.returncode:
      print(f'eval {evals}: exit {out.returncode}: {out.stderr[-1500:]}', file=sys.stderr)
  code = train_proc.wait()
  left = sorted(os.listdir(workdir / 'checkpoints'))
  return [f'| `jaxbig eval` back to back during a run saving every step, keeping 1 | {evals} | '
          f'succeeded: {ok}/{evals} | the run: exit {code}; checkpoints left: {left}; reader '
          f'folders left: {int((workdir / ".readers").exists())} |']


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--kills', type=int, default=20)
  p.add_argument('--corruptions', type=int, default=8)
  p.add_argument('--nans', type=int, default=6)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--two-trains', type=int, default=3)
  p.add_argument('--only', choices=['concurrency'], help='run only these faults')
  args = p.parse_args()
  rng = random.Random(args.seed)
  root = pathlib.Path(tempfile.mkdtemp(prefix='jaxbig-faults-'))
  t0 = time.perf_counter()
  reference, wall, finished, repeatable = reference_runs(root)
  rows = []
  if args.only is None:
    rows += kills(root, args.kills, rng, reference, wall)
    rows += sigterm_one(root, rng, reference)
    rows += sigterm_two(root)
    rows += corruptions(root, args.corruptions, rng, reference, finished)
    rows += nans(root, args.nans, rng)
  rows += two_trains(root, args.two_trains)
  rows += eval_during_training(root)
  import jax
  import orbax.checkpoint as ocp
  command = shlex.join(['python', 'benchmarks/faults.py', *sys.argv[1:]])
  print('# Fault injection\n')
  print(f'Reproduce:\n\n    {command}\n')
  print(f'`{CNN}` with `{" ".join(RUN)}` ({len(reference)} steps; an uninterrupted run takes '
        f'{wall:.1f} s here, start-up included; two of them gave '
        f'{"bit-identical" if repeatable else "DIFFERENT"} losses); jax {jax.__version__}, '
        f'orbax-checkpoint {ocp.__version__}, Python {sys.version.split()[0]}, '
        f'{os.cpu_count()} CPU cores; campaign {time.perf_counter() - t0:.0f} s.\n')
  print('| fault | trials | outcome | check |')
  print('| --- | --- | --- | --- |')
  print('\n'.join(rows))
  shutil.rmtree(root, ignore_errors=True)
  shutil.rmtree(CACHE, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
