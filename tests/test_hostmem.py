"""jaxbig/hostmem.py: the `jaxbig` command restarts itself with glibc's huge-page tunable,
and the tunable does what it is there for: a program's large temporary buffer is faulted
in 2 MiB at a time instead of 4 KiB."""

import os
import pathlib
import subprocess
import sys

import pytest

from jaxbig import cli, hostmem

# A jitted program with a temporary buffer of about 32 MiB (XLA's fusion decides; at or
# above glibc's largest mmap threshold), run 5 times after a warm-up; prints the minor page
# faults per run.
_PROBE = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.tanh(x)[None] * jnp.arange(1.0, 4.0)[:, None, None]).sum(0).sum())
x = jnp.ones((4096, 2048), jnp.float32)
for _ in range(2): f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5): f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _thp_mode() -> str:
  try:
    text = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text()
  except OSError:
    return 'absent'
  return text.split('[')[1].split(']')[0] if '[' in text else text.strip()


def test_tuned_environ_adds_the_tunable_once_and_respects_opt_out():
  assert hostmem.tuned_environ({}, (2, 36)) == {'GLIBC_TUNABLES': hostmem.TUNABLE}
  extended = hostmem.tuned_environ({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=8'}, (2, 36))
  assert extended['GLIBC_TUNABLES'] == f'glibc.malloc.tcache_count=8:{hostmem.TUNABLE}'
  assert hostmem.tuned_environ(extended, (2, 36)) is None  # Restarted already: no loop.
  assert hostmem.tuned_environ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36)) is None
  assert hostmem.tuned_environ({hostmem.ENV: 'default'}, (2, 36)) is None
  assert hostmem.tuned_environ({}, (2, 34)) is None  # The tunable is new in glibc 2.35.
  assert hostmem.tuned_environ({}, None) is None  # Not glibc.


def test_the_command_restarts_itself_and_a_python_call_does_not(monkeypatch):
  calls = []
  monkeypatch.setattr(os, 'execve', lambda *a: calls.append(a) or sys.exit(0))
  monkeypatch.setattr(hostmem, 'glibc_version', lambda: (2, 36))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.delenv(hostmem.ENV, raising=False)
  monkeypatch.setattr(sys, 'argv', ['jaxbig', 'report', 'somewhere'])
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  with pytest.raises(SystemExit):
    cli.main()
  (path, argv, env), = calls
  assert path == sys.executable and argv[-2:] == ['report', 'somewhere']
  assert '-P' in argv or '-I' in argv  # Never the current folder on sys.path.
  assert env['GLIBC_TUNABLES'] == hostmem.TUNABLE
  assert cli.main(['report', '/nonexistent/folder']) == 2  # No restart: an error instead.
  assert len(calls) == 1


@pytest.mark.skipif(hostmem.glibc_version() is None or
                    hostmem.glibc_version() < hostmem.MIN_GLIBC,
                    reason='needs glibc >= 2.35 (the hugetlb tunable)')
@pytest.mark.skipif(_thp_mode() not in ('always', 'madvise'),
                    reason=f'transparent huge pages are {_thp_mode()} on this kernel')
@pytest.mark.slow(reason='starts jaxbig processes')
def test_the_tunable_cuts_page_faults_of_a_large_temporary():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('GLIBC_TUNABLES', None)
  faults = {}
  for name, run_env in (('plain', env), ('tuned', hostmem.tuned_environ(env, (2, 35)))):
    out = subprocess.run([sys.executable, '-c', _PROBE], env=run_env, capture_output=True,
                         text=True, timeout=120, check=True)
    faults[name] = float(out.stdout.split()[-1])
  # 32 MiB in 4 KiB pages is 8,192 faults per run; in 2 MiB pages, 16.
  assert faults['plain'] > 4_000, faults
  assert faults['tuned'] < faults['plain'] / 10, faults


def test_no_restart_where_jax_runs_on_an_accelerator(monkeypatch):
  monkeypatch.setattr(hostmem.glob, 'glob', lambda pattern: [])
  assert hostmem.cpu_only({}) and hostmem.cpu_only({'JAX_PLATFORMS': 'cpu'})
  assert not hostmem.cpu_only({'JAX_PLATFORMS': 'cuda'})
  assert not hostmem.cpu_only({'JAX_PLATFORMS': 'tpu,cpu'})
  monkeypatch.setattr(hostmem.glob, 'glob',
                      lambda pattern: ['/dev/nvidia0'] if 'nvidia[' in pattern else [])
  assert not hostmem.cpu_only({})  # A GPU is there: JAX takes it, leave malloc alone.
  assert hostmem.cpu_only({'JAX_PLATFORMS': 'cpu'})


_DECOY = 'import pathlib; pathlib.Path({marker!r}).write_text("decoy ran")\n'


@pytest.mark.parametrize('how', ['command', 'python -m'])
@pytest.mark.slow(reason='starts jaxbig processes')
def test_code_in_the_current_folder_never_runs(how, tmp_path):
  """A folder holding a decoy `jaxbig/` package and an `optax.py`: the command (which
  restarts itself on glibc >= 2.35) and `python -m jaxbig` run the real jaxbig."""
  marker = tmp_path / 'marker.txt'
  folder = tmp_path / 'here'
  (folder / 'jaxbig').mkdir(parents=True)
  for name in ('jaxbig/__init__.py', 'jaxbig/__main__.py', 'jaxbig/cli.py', 'optax.py'):
    (folder / name).write_text(_DECOY.format(marker=str(marker)))
  if how == 'command':
    command = [str(pathlib.Path(sys.executable).parent / 'jaxbig')]
    if not os.path.exists(command[0]):
      pytest.skip(f'no jaxbig command beside {sys.executable} (package not pip-installed)')
  else:
    (folder / 'jaxbig').rename(tmp_path / 'moved')  # `-m` itself takes ./jaxbig first.
    command = [sys.executable, '-m', 'jaxbig']
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.ENV)}
  env['JAX_PLATFORMS'] = 'cpu'
  if how == 'python -m':
    env[hostmem.ENV] = 'default'  # No restart: the module itself must drop the folder.
  env['PYTHONPATH'] = str(pathlib.Path(__file__).resolve().parents[1])
  # `eval` imports optax (through jaxbig.train) before it finds that the workdir is missing.
  out = subprocess.run([*command, 'eval', str(tmp_path / 'missing')], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=300)
  assert not marker.exists(), 'code from the current folder ran'
  assert out.returncode == 2 and 'not a jaxbig workdir' in out.stderr, out.stderr
