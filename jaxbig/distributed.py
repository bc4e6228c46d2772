"""Multi-host runs: JAX's multi-controller runtime (`jax.distributed`), one process per host.

Every process runs the same `jaxbig train` command. Each one sees all devices of the run
(`jax.devices()`), builds the same mesh over them, reads only its rows of each batch, and
takes part in every collective and in Orbax's checkpoint saves; only process 0 writes the
logs, config.json and summary.json.

Three ways to start:
  explicit   --coordinator HOST:PORT --num-processes N --process-id I (any machines, and
             several processes on one machine for tests);
  detected   under SLURM (srun, more than one task) or Open MPI (mpirun) the cluster's
             variables say it all, and `jax.distributed.initialize()` reads them;
  requested  --distributed: `jax.distributed.initialize()` finds the cluster itself (Cloud
             TPU VM pod slices, GKE, and the above).

Once started, JAX's preemption service owns SIGTERM: a notice to any process reaches all of
them, and they save and stop at one agreed step (jaxbig/faults.py). A single process without
these flags handles SIGTERM itself and needs no coordinator.
"""

from __future__ import annotations

import os
import re

import jax

from jaxbig.config import ConfigError


def detected() -> str | None:
  """The cluster manager whose variables say this process is one of several, if any."""
  if 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'openmpi'
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Joins the run's other processes when asked to or when a cluster is detected.

  Must run before anything touches a device. Returns whether the runtime was started.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError('--coordinator, --num-processes and --process-id go together: give '
                        'all three (or none, under SLURM/MPI, or --distributed)')
    if not re.fullmatch(r'[\w.\-\[\]:]+:\d+', coordinator):
      raise ConfigError(f"--coordinator: expected HOST:PORT, got '{coordinator}'")
    if num_processes < 1:
      raise ConfigError(f'--num-processes must be >= 1, got {num_processes}')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process-id must be in [0, {num_processes}), got {process_id}')
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
  if auto or detected():
    try:
      jax.distributed.initialize()
    except ValueError as e:  # Nothing detected: say what to pass instead.
      raise ConfigError(f'--distributed: no cluster found ({str(e).splitlines()[0]}); pass '
                        '--coordinator, --num-processes and --process-id') from None
    return True
  return False
