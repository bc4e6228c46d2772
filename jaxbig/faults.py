"""What a run does when something goes wrong: preemption, non-finite steps, and the errors
that stop it.

Preemption (SIGTERM) and Ctrl-C (SIGINT). The loop asks `Preemption.reached(step)` after
every step; when it is true it saves that step, waits for the save to commit and returns;
`jaxbig train` exits 0 after a SIGTERM, 130 after a SIGINT. With one process Python handlers
set a flag (no `jax.distributed` needed, and it works the same when `train_and_evaluate` is
called from a notebook or a test); a second SIGINT ends the process at once, with one line
(the newest committed checkpoint stays). When `jax.distributed` runs, JAX's preemption
service owns SIGTERM instead: the first notice any process receives reaches all of them, and
`reached_preemption_sync_point` is true on every process at the same step, so that they all
save that one step together; SIGINT keeps Python's default there (one line, exit 130).

Non-finite steps. `train_step` checks each step's loss and the norm of its gradients; a step
where either is not finite keeps the old parameters, optimizer state and BatchNorm statistics
bit for bit and counts itself in `Skips`, which is part of the checkpointed state, so that a
resumed run counts on where it stopped. The host reads the counts only where it fetches
metrics anyway (log steps, saves, the end): `train.on_nonfinite=skip` goes on until more than
`train.max_consecutive_skips` steps in a row were skipped, `abort` stops at the first. Either
way the run stops with `NonFiniteError` without saving a step after the limit was passed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxbig.config import ON_NONFINITE, ConfigError


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row: the run stops (exit code 3) without saving them."""


@struct.dataclass
class Skips:
  """Steps skipped because a value was not finite; checkpointed with the state."""
  run: jax.Array  # int32: skipped steps in a row, ending at the newest step (0 after a good one).
  total: jax.Array  # int32: skipped steps in the whole run.


def init_skips() -> Skips:
  return Skips(run=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.int32))


def count(skips: Skips, finite: jax.Array) -> Skips:
  """The counts after a step that was finite (`finite` true) or skipped."""
  skipped = (~finite).astype(jnp.int32)
  return Skips(run=jnp.where(finite, 0, skips.run + 1), total=skips.total + skipped)


def skip_limit(config, scaling: bool) -> int:
  """How many non-finite steps in a row a run may skip (0: abort at the first); checked.

  Configs saved before the fields existed skip, with a limit of 25.
  """
  t = config.train
  mode = t.get('on_nonfinite', 'skip')
  limit = t.get('max_consecutive_skips', 25)
  if mode not in ON_NONFINITE:
    raise ConfigError(f"train.on_nonfinite: unknown mode '{mode}'; choose from "
                      f"{', '.join(ON_NONFINITE)}")
  if limit < 0:
    raise ConfigError(f'train.max_consecutive_skips must be >= 0, got {limit}')
  if mode == 'abort' and scaling:
    raise ConfigError('train.on_nonfinite=abort: loss scaling (precision=fp16 or '
                      'loss_scale.mode) skips overflowing steps by design; use skip, with '
                      'train.max_consecutive_skips')
  return 0 if mode == 'abort' else int(limit)


def check_runs(runs: Sequence, first_step: int, limit: int, last_saved: int | None) -> None:
  """Raises NonFiniteError if any of the consecutive-skip counts of steps `first_step`,
  `first_step + 1`, ... (fetched from the device) passed `limit`."""
  for i, run in enumerate(runs):
    run = int(run)
    if run > limit:
      step = first_step + i
      saved = f'step {last_saved}' if last_saved is not None else 'none'
      raise NonFiniteError(
          f'train: {run} non-finite step{"s" * (run > 1)} in a row up to step {step} (loss or '
          f'gradients not finite), more than train.max_consecutive_skips={limit} '
          '(0 under train.on_nonfinite=abort); stopped without saving them. Newest '
          f'checkpoint: {saved}')


INTERRUPTED = 130  # The exit code of a process ended by SIGINT (128 + 2), as shells use.


class Preemption:
  """Whether the run was asked to stop (SIGTERM, SIGINT), asked once per step by every
  process; `signal` names the first signal ('SIGTERM' under jax.distributed)."""

  def __init__(self):
    self._flag = False
    self._previous = {}
    self.signal = 'SIGTERM'
    # Under jax.distributed the preemption service has its own SIGTERM handler; a Python one
    # would replace it, and the processes would no longer agree on the step.
    self.collective = (jax.distributed.is_initialized()
                       and bool(getattr(jax.config, 'jax_enable_preemption_service', True)))

  def __enter__(self) -> 'Preemption':
    if not self.collective and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self._flag and signum == signal.SIGINT:
      sys.stderr.write('\njaxbig: interrupted again: stopped at once (the newest committed '
                       'checkpoint is kept)\n')
      sys.stderr.flush()
      os._exit(INTERRUPTED)  # pylint: disable=protected-access
    if not self._flag:
      self.signal = signal.Signals(signum).name
    self._flag = True

  def reached(self, step: int) -> bool:
    """True at the step to save and stop at (the same step on every process)."""
    if self.collective:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
