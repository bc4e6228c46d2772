"""Host memory: transparent huge pages for XLA:CPU's per-step buffers (a glibc tunable).

XLA:CPU allocates a program's temporaries (tens to hundreds of MiB for a train step) with
malloc at every execution and frees them after. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh mmap, so every step faults its whole temporary
buffer in again, 4 KiB at a time. For the small GPT of benchmarks/suites/perf_cpu.py on a
2-core Xeon that is 75,600 minor faults (295 MiB) and 113-124 ms of kernel time per step
(getrusage around 10 steps).

With the tunable glibc.malloc.hugetlb=1 (glibc 2.35 and later), malloc asks for transparent
huge pages on what it maps: 2 MiB per fault. In `jaxbig bench benchmarks/suites/perf_cpu.py`
with and without it, back to back (benchmarks/results/cpu-xeon/perf_cpu/hugepages*), the GPT
step took 243 ms instead of 289 ms and the char LSTM 85.8 ms instead of 96.9 ms; the digits
CNN's step (6.19 and 6.13 ms) and the digits run's compile did not change measurably.

Tunables are read when a process starts, so the `jaxbig` command starts itself again with
GLIBC_TUNABLES extended (`reexec`, before anything else happens) where that helps: Linux
with glibc >= 2.35. JAXBIG_MALLOC=default leaves the process alone. Library calls
(`import jaxbig`) change nothing; set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 there yourself.

Not done, measured: glibc's other settings that end the faults altogether (no mmap, one
arena, no trimming: 232 ms for the GPT) make every thread share one arena, which cost the
digits CNN 5-8% per step and its compile 47%.
"""

from __future__ import annotations

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


def reexec(argv: list[str]) -> None:
  """Replaces this process by `python -m jaxbig ARGV` with the tunable, where it applies."""
  env = tuned_environ(dict(os.environ), glibc_version())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', 'jaxbig', *argv], env)
