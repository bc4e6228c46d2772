"""Memory: what the host and a device hold, the checks that a run fits before it starts,
and the one byte formatter the reports share."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxbig.config import ConfigError


def fmt_bytes(n: int | float | None, digits: int = 2, missing: str = '-') -> str:
  """`n` bytes in the largest binary unit it reaches, e.g. '1.50 GiB'; `missing` for None."""
  if n is None:
    return missing
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.{digits}f} {unit}'
  return f'{int(n)} B'


def host_bytes() -> int:
  """This machine's physical memory."""
  return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def device_bytes(device) -> int:
  """What one device can hold: its allocator's limit, or on CPUs the host's memory."""
  stats = device.memory_stats() or {}
  return int(stats.get('bytes_limit') or host_bytes())


def check_host_batches(config, data) -> None:
  """A training or evaluation batch must fit in half the host's memory: the host builds it
  whole (padding included) before it goes to the devices."""
  limit = host_bytes() // 2
  for field, size, masked in (('data.batch_size', config.data.batch_size, False),
                              ('data.eval_batch_size', config.data.eval_batch_size, True)):
    spec = data.batch_spec(size, with_mask=masked)
    need = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in spec.values())
    if need > limit:
      raise ConfigError(f'{field}={size}: one batch takes {fmt_bytes(need)} of host memory, '
                        f'more than half of the {fmt_bytes(2 * limit)} this machine has')


def check_step_bytes(config, mesh, train_bytes: int | None, eval_bytes: int | None) -> None:
  """The compiled steps must fit on a device, by XLA's memory analysis (None: not known)."""
  import jax  # Here: the reports import this module for fmt_bytes alone.
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  limit = device_bytes(local[0])
  for field, value, need in (('data.batch_size', config.data.batch_size, train_bytes),
                             ('data.eval_batch_size', config.data.eval_batch_size, eval_bytes)):
    if need is not None and need > limit:
      raise ConfigError(f'{field}={value}: the compiled step needs {fmt_bytes(need)} per '
                        f'device, more than the {fmt_bytes(limit)} a device has; use a smaller '
                        'batch, train.accum_steps or more devices')
