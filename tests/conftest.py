"""Settings for the whole test session, applied before any test module imports JAX, and the
background workers that some modules hand their training runs to."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# JAX on the CPU. With libtpu installed (the [tpu] extra, for `jaxbig plan --topology`) JAX
# would otherwise look for TPU chips at every start and take libtpu's machine-wide lock,
# which the test's own subprocesses then could not get.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent compilation cache for this session (and its subprocesses): many tests compile
# the same smoke programs. It starts empty, so every program is still compiled once; this
# halves tests/test_train.py's time (98 s -> 52 s). pytest-xdist workers inherit the
# controller's (one cache for all: the suite took 840 s with one per worker, 697 s with one
# shared; 934 s with JAX's file lock on, which a size limit turns on); its creator removes
# it. A read of an entry still being written is a cache miss with a warning in JAX.
_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='jaxbig-tests-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# XLA:CPU's LLVM optimisation of the tests' small programs costs more than running them.
# Level 0 leaves the HLO passes (fusion, buffer assignment, memory figures) as they are and
# makes the machine code less optimised: a cnn_digits smoke run took 12.8 s of CPU instead
# of 19.2. For this process, its xdist workers and its subprocesses.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / 'tests' / 'mesh_worker.py'
WORKERS = pytest.StashKey()  # Module name -> (process, results file, log file).


def start_worker(folder: pathlib.Path, jobs: list[dict]):
  """Starts tests/mesh_worker.py (8 fake CPU devices) on `jobs`; returns it, its results
  file and its log. Its exit code lands in `rc` beside them (for other xdist workers)."""
  folder.mkdir(parents=True, exist_ok=True)
  jobs_file, out, log = folder / 'jobs.json', folder / 'results.json', folder / 'worker.log'
  jobs_file.write_text(json.dumps(jobs))
  script = '"$0" "$@"; echo $? > "$RC.tmp" && mv "$RC.tmp" "$RC"'
  with open(log, 'w') as f:
    proc = subprocess.Popen(['sh', '-c', script, sys.executable, str(WORKER), str(jobs_file),
                             str(out)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, 'RC': str(folder / 'rc')},
                            start_new_session=True)  # Its own group: killed with its child.
  return proc, out, log


def _xdist_folder(config) -> pathlib.Path | None:
  """Under pytest-xdist, the folder all workers of this run share for the mesh workers (the
  parent of each worker's own temporary folder): the first xdist worker (gw0) starts them,
  whichever worker runs a module waits on them."""
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return None
  return config._tmp_path_factory.getbasetemp().parent / 'mesh'  # pylint: disable=protected-access


def pytest_collection_modifyitems(config, items):
  """Every slow test says why it is slow (`@pytest.mark.slow(reason=...)`)."""
  del config
  for item in items:
    for mark in item.iter_markers('slow'):
      if not mark.kwargs.get('reason'):
        raise pytest.UsageError(f'{item.nodeid}: pytest.mark.slow needs a reason=')


def pytest_collection_finish(session):
  """Starts the worker of each collected module that has `worker_jobs()` as soon as the tests
  are known, so that it runs on the second core beside the other test files."""
  modules = {item.module for item in session.items if hasattr(item.module, 'worker_jobs')}
  started = session.config.stash.setdefault(WORKERS, {})
  shared = _xdist_folder(session.config)
  if shared is not None and os.environ.get('PYTEST_XDIST_WORKER') != 'gw0':
    return  # Every xdist worker collects every module; gw0 starts their workers.
  for module in modules:
    folder = (shared / module.__name__ if shared is not None else
              session.config._tmp_path_factory.mktemp(module.__name__))  # pylint: disable=protected-access
    started[module.__name__] = start_worker(folder, module.worker_jobs())


def worker_results(request, tmp_path_factory) -> list[dict]:
  """The results of the calling module's `worker_jobs()`, in order (waits for them)."""
  module = request.module
  started = request.config.stash.get(WORKERS, {}).get(module.__name__)
  shared = _xdist_folder(request.config)
  if started is None and shared is not None:  # Started by gw0: wait for its exit code.
    folder = shared / module.__name__
    deadline = time.monotonic() + 900
    while not (folder / 'rc').exists():
      assert time.monotonic() < deadline, f'{folder}: the mesh worker did not finish'
      time.sleep(0.5)
    log = folder / 'worker.log'
    assert (folder / 'rc').read_text().strip() == '0', log.read_text()[-3000:]
    return json.loads((folder / 'results.json').read_text())
  proc, out, log = started or start_worker(tmp_path_factory.mktemp(module.__name__),
                                           module.worker_jobs())
  assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
  return json.loads(out.read_text())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `jaxbig ARGV` run in this process."""
  from jaxbig import cli  # pylint: disable=g-import-not-at-top
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def pytest_sessionfinish(session, exitstatus):
  """Stops the workers whose results no test collected (under xdist, waits for them: another
  xdist worker may still need them); removes the compilation cache."""
  shared = (_xdist_folder(session.config) is not None and not session.shouldstop
            and exitstatus != pytest.ExitCode.INTERRUPTED)
  for proc, _, _ in session.config.stash.get(WORKERS, {}).values():
    try:
      proc.wait(timeout=900 if shared else 0)
    except subprocess.TimeoutExpired:
      pass
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:  # It ended meanwhile.
        pass
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
