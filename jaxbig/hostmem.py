"""Host memory: transparent huge pages for XLA:CPU's per-step buffers (a glibc tunable).

XLA:CPU allocates a program's temporaries (tens to hundreds of MiB for a train step) with
malloc at every execution and frees them after. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh mmap, so every step faults its whole temporary
buffer in again, 4 KiB at a time, in kernel time that the step waits for.

With the tunable glibc.malloc.hugetlb=1 (glibc 2.35 and later), malloc asks for transparent
huge pages on what it maps: 2 MiB per fault. What it saves, and what else was measured:
benchmarks/results/cpu-xeon/perf_cpu/README.md, "Huge pages for XLA:CPU's temporaries".

Tunables are read when a process starts, so the `jaxbig` command starts itself again with
GLIBC_TUNABLES extended (`reexec`, before anything else happens) where that helps: Linux
with glibc >= 2.35, on hosts where JAX runs on the CPU (no GPU or TPU device nodes, or
JAX_PLATFORMS=cpu). JAXBIG_MALLOC=default leaves the process alone. Library calls
(`import jaxbig`) change nothing; set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 there yourself.

The restarted interpreter keeps the first one's isolation flags and never puts the current
folder on sys.path (`-P`): it imports the jaxbig that is running now, never a `jaxbig/` or
`optax.py` that happens to lie in the folder the command was started from.

glibc's settings that end the faults altogether (no mmap, one arena) are not set: one arena
shared by every thread slows multithreaded steps and compiles.
"""

from __future__ import annotations

import glob
import os
import sys

ENV = 'JAXBIG_MALLOC'  # 'default': leave malloc as it is.
TUNABLE = 'glibc.malloc.hugetlb=1'
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, None elsewhere (musl, macOS, Windows)."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != 'glibc':
    return None
  try:
    major, minor = version.split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def tuned_environ(environ: dict[str, str], version: tuple[int, int] | None) -> dict | None:
  """The environment to restart with, or None where there is nothing to change."""
  if environ.get(ENV) == 'default' or version is None or version < MIN_GLIBC:
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:  # Set already (by us or by the user): keep it.
    return None
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{TUNABLE}' if tunables else TUNABLE}


# Device nodes of NVIDIA GPUs and of TPUs (accel: v4 and older; vfio: v5 and newer).
ACCELERATOR_NODES = ('/dev/nvidiactl', '/dev/nvidia[0-9]*', '/dev/accel[0-9]*',
                     '/dev/vfio/[0-9]*')


def cpu_only(environ: dict[str, str]) -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator is present."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def interpreter_flags() -> list[str]:
  """Flags that give a new interpreter this one's isolation, plus -P (no current folder)."""
  f = sys.flags
  if f.isolated:
    return ['-I', '-B'] if f.dont_write_bytecode else ['-I']
  flags = [flag for flag, on in (('-E', f.ignore_environment), ('-s', f.no_user_site),
                                 ('-B', f.dont_write_bytecode)) if on]
  return flags + ['-P']


def restart_argv(argv: list[str]) -> list[str]:
  """The command line of the restarted `jaxbig ARGV`.

  `-c` instead of `-m jaxbig`: `-m` searches sys.path for the package, this imports the one
  that is running (its folder is appended last, for a checkout that is not installed).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (f'import sys; sys.path.append({root!r}); from jaxbig.cli import main; '
          'sys.exit(main())')
  return [sys.executable, *interpreter_flags(), '-c', code, *argv]


def reexec(argv: list[str]) -> None:
  """Replaces this process by `jaxbig ARGV` with the tunable, where it applies."""
  env = tuned_environ(dict(os.environ), glibc_version())
  if env is None or not cpu_only(env):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, restart_argv(argv), env)
