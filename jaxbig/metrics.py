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
import numpy as np

from jaxbig import faults, losses
from jaxbig.config import ConfigError


def note(text: str) -> None:
  """One line on stderr that narrates a run (from process 0 only)."""
  if jax.process_index() == 0:
    print(f'jaxbig: {text}', file=sys.stderr, flush=True)


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  Where torch is installed, tensorboardX's writer module imports it only to name a type in
  its annotations, which makes the import several times slower at every `jaxbig train`
  start. Scalars never need torch. While tensorboardX is imported,
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


def train_scalars(fetched: list[dict], task: str, tokens_per_byte: float = 1.0
                  ) -> dict[str, float]:
  """Means over a log interval of the per-step metric sums (fetched from the device), over
  the steps that were not skipped, and the number skipped; a language model's bits per
  byte of the training text (bits per token x `tokens_per_byte`)."""
  kept = [m for m in fetched if not float(np.asarray(m['skipped']))]
  out = {'train/loss': float('nan')}  # Every step of the interval skipped.
  if kept:
    totals = {k: float(sum(np.asarray(m[k]) for m in kept)) for k in kept[0]}
    out = {f'train/{k}': v for k, v in losses.finalize(totals, task).items()
           if k in ('loss', 'accuracy', 'bits_per_byte', 'elbo')}
    if 'train/bits_per_byte' in out:
      out['train/bits_per_byte'] *= tokens_per_byte
    out['grad_norm'] = totals['grad_norm'] / len(kept)
  out['train/skipped_steps'] = float(len(fetched) - len(kept))
  if 'bad_images' in fetched[0]:
    out['train/bad_images'] = float(sum(np.asarray(m['bad_images']) for m in fetched))
  if 'loss_scale' in fetched[-1]:  # Loss scaling: the interval's last scale.
    out['loss_scale'] = float(np.asarray(fetched[-1]['loss_scale']))
  return out


class BadImages:
  """The run's count of skipped training images, from the steps' metrics (so every process
  holds the same count and stops at the same step), kept in the iterator's state."""

  def __init__(self, limit: int, train_iter):
    self.limit, self.train_iter = limit, train_iter

  def add(self, metrics: list[dict], *, logged: bool = True) -> None:
    """Counts the fetched steps' skipped images; ConfigError past the limit. Steps not yet
    in a logged interval (`logged=False`, before a save) go into the iterator's state as
    `unlogged`, and into the count once their interval is logged."""
    n = int(sum(float(np.asarray(m['bad_images'])) for m in metrics))
    it = self.train_iter
    if logged:
      it.bad, it.unlogged = it.bad + n, 0
    else:
      it.unlogged = n
    if it.bad + it.unlogged > self.limit:
      last = it.last_bad or 'data.path: (none in the rows this process decodes)'
      raise ConfigError(f'{last}: {it.bad + it.unlogged} bad images, more than '
                        f'data.max_bad_images ({self.limit})')


class TrainLog:
  """Per-step metrics on the device, written one step late: a log step's interval is
  fetched after the next step is dispatched (`flush`), so the host never waits for the
  device at a log step. The checks of non-finite steps run on what is fetched."""

  def __init__(self, writer: Writer, progress: Progress, task: str, schedule,
               skip_limit: int, tokens_per_byte: float = 1.0):
    self.writer, self.progress, self.task = writer, progress, task
    self.tokens_per_byte = tokens_per_byte
    self.schedule, self.skip_limit = schedule, skip_limit
    self.pending = []  # Metrics of the steps after the newest closed interval.
    self.closed = None  # (last step, its metrics): an interval waiting to be fetched.
    self.t_last = time.perf_counter()  # When the previous interval was fetched.
    self.input_s = 0.0  # Seconds the loop waited for batches since then.
    self.scalars = {}  # The newest interval's scalars (the summary's train values).
    self.bad_images = None  # A BadImages where the data skips bad images.

  def add(self, step: int, metrics: dict, log_step: bool) -> None:
    self.pending.append(metrics)
    if log_step:
      self.closed, self.pending = (step, self.pending), []
    else:
      self.progress.update(step)

  def flush(self, saved: int | None) -> None:
    """Fetches and writes the closed interval, if any; raises if it passed the skip limit."""
    if self.closed is None:
      return
    (step, metrics), self.closed = self.closed, None
    fetched = jax.device_get(metrics)
    out = train_scalars(fetched, self.task, self.tokens_per_byte)
    now = time.perf_counter()
    out['steps_per_s'] = len(fetched) / (now - self.t_last)
    # The share of the interval the loop spent waiting for its batches: near 0 while the
    # input keeps ahead of the step, near the whole interval when input bounds it.
    out['input_wait'] = min(self.input_s / (now - self.t_last), 1.0)
    out['lr'] = float(self.schedule(step - 1))
    self.writer.write(step, out)  # Also when the check below stops the run: the log shows why.
    self.progress.update(step, f"loss {out['train/loss']:.4f}", force=True)
    faults.check_runs([m['skip_run'] for m in fetched], step - len(fetched) + 1,
                      self.skip_limit, saved)
    if self.bad_images is not None:
      self.bad_images.add(fetched)
    self.t_last, self.scalars, self.input_s = now, out, 0.0

  def waited(self, seconds: float) -> None:
    """Counts `seconds` spent waiting for the next batch."""
    self.input_s += seconds

  def paused(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the training rate."""
    self.t_last += seconds

  def check_unlogged(self, step: int, saved: int | None) -> None:
    """Raises if the steps not yet in an interval passed the skip limit (before a save)."""
    runs = jax.device_get([m['skip_run'] for m in self.pending])
    faults.check_runs(runs, step - len(self.pending) + 1, self.skip_limit, saved)
    if self.bad_images is not None:
      self.bad_images.add(jax.device_get(self.pending), logged=False)
