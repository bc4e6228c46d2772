"""Where metrics go: `metrics.jsonl`, TensorBoard (tensorboardX), a progress line, and
profiles.

Only process 0 writes metrics. On a terminal the progress line is a bar with ETA redrawn in
place; otherwise (CI, log files) it prints a plain line at each log step. A profile
(`train.profile_steps`) is a `jax.profiler` trace of every process, in
`WORKDIR/tb/plugins/profile/<time>/`, where TensorBoard's profile plugin (xprof) shows it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Iterator

import jax


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  Where torch is installed, tensorboardX's writer module imports it only to name a type in
  its annotations: 1.2 s instead of 0.2 s for the import, at every `jaxbig train` start
  (torch 2.13 CPU, 2-core Xeon). Scalars never need torch. While tensorboardX is imported,
  a None entry in sys.modules makes `import torch` fail, so tensorboardX takes its path
  without torch. The entry is removed at once, and torch imports normally afterwards.
  A process that has loaded either one already imports as usual.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if 'torch' in sys.modules and sys.modules['torch'] is None:
      del sys.modules['torch']
  return SummaryWriter


class Writer:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      self._tb = summary_writer_class()(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Logs `scalars` (names like 'train/loss') at `step`."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **clean}) + '\n')
    self._jsonl.flush()
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """A bar with ETA on a TTY; plain periodic lines elsewhere."""

  def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.enabled = enabled and jax.process_index() == 0
    self.t0 = time.perf_counter()
    self.text = ''  # The newest metrics text, kept on the bar between log steps.

  def update(self, step: int, text: str = '', force: bool = False) -> None:
    """Shows progress at `step` (plain mode prints only when `force`: at log steps)."""
    if not self.enabled or not (self.tty or force):
      return
    self.text = text or self.text
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float('nan')
    eta_s = f'{eta:5.0f}s' if math.isfinite(eta) else '    ?'
    if self.tty:
      width = 24
      filled = int(width * step / max(self.total, 1))
      bar = '#' * filled + '.' * (width - filled)
      self.stream.write(f'\r[{bar}] {step}/{self.total} eta {eta_s} {self.text}\x1b[K')
    else:
      self.stream.write(f'step {step}/{self.total} eta {eta_s.strip()} {text}\n')
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write('\n')
      self.stream.flush()


class Profile:
  """Traces steps `start + 1` .. `start + steps` with jax.profiler, each step annotated."""

  def __init__(self, workdir: str, steps: int, start: int):
    self.folder = os.path.join(workdir, 'tb')
    self.first, self.last = start + 1, start + steps
    self.running = False

  @contextlib.contextmanager
  def step(self, step: int) -> Iterator[None]:
    """Around one train step: starts the trace at the first, annotates those traced."""
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.folder)
      self.running = True
    if not self.running:
      yield
      return
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      yield

  def after(self, step: int, outputs) -> None:
    """Ends the trace after the last traced step, once its outputs are computed."""
    if self.running and step >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.running:
      self.running = False
      jax.profiler.stop_trace()
      if jax.process_index() == 0:
        print(f'jaxbig: profile of steps {self.first}-{self.last} -> {self.folder} '
              '(tensorboard --logdir, Profile tab)', file=sys.stderr, flush=True)
