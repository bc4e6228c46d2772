"""A family of runs as one experiment: `jaxbig sweep EXPERIMENT[:variant] [--out DIR] [k=v ...]`.

A sweep file is an experiment file (`get_config(arg)`) that also defines `sweep(arg)`: a list
of (member name, overrides), e.g. the sizes of a scaling study (experiments/scaling_gpt.py).
Every member is validated before anything is written. Then each one trains in its own
workdir OUT/<member> with `train.train_and_evaluate`: a member whose summary.json is there
(for its step count) is finished and skipped, an unfinished one resumes from its newest
checkpoint, so the same command continues an interrupted sweep. OUT/sweep.json records the
experiment, the members with their sizes (parameters, analytic FLOPs per step) and what was
measured around each run (peak device memory, energy where a meter exists), and the command.
`jaxbig report OUT` renders it (jaxbig/tools/sweep/report.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Sequence

import jax
from flax import linen as nn

from jaxbig import config as config_lib, train, workdir as workdir_lib
from jaxbig.config import ConfigError
from jaxbig.tools.sweep.report import FILE

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')  # A member's name is a folder name.
EMBEDDINGS = ('embed', 'pos_embed')  # Parameter tables left out of non-embedding counts.


def members(spec: str) -> list[tuple[str, list[str]]]:
  """The (name, overrides) that `sweep(arg)` of the file named by `spec` returns, checked."""
  path, _, arg = spec.partition(':')
  module = config_lib.load_module(path)
  if not callable(getattr(module, 'sweep', None)):
    raise ConfigError(f'{path}: has no sweep() function (a sweep file lists its members)')
  try:
    out = module.sweep(arg) if arg else module.sweep()
  except Exception as e:
    raise ConfigError(f'{spec}: sweep() failed: {type(e).__name__}: {e}') from e
  if not isinstance(out, (list, tuple)) or not out:
    raise ConfigError(f'{spec}: sweep() must return a non-empty list of (name, overrides)')
  seen = set()
  for item in out:
    ok = (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
          and isinstance(item[1], (list, tuple)) and all(isinstance(o, str) for o in item[1]))
    if not ok:
      raise ConfigError(f'{spec}: sweep() item {item!r} is not (name, [key=value, ...])')
    if not _NAME.match(item[0]) or item[0] in seen:
      raise ConfigError(f"{spec}: member name '{item[0]}' is not a unique folder name")
    seen.add(item[0])
  return [(name, list(overrides)) for name, overrides in out]


def non_embedding_params(params) -> int:
  """Parameters outside the token and position tables (the usual size axis of scaling laws)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = {str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path}
    if not names & set(EMBEDDINGS):
      total += leaf.size
  return total


def describe(s: train.Setup) -> dict:
  """A member's sizes from its setup (nothing allocated): parameters, FLOPs, units per step."""
  from jaxbig.tools.bench import flops  # pylint: disable=g-import-not-at-top
  c, meta = s.config, s.data.meta
  lm = meta.task == 'lm'
  per_step = c.data.batch_size * (meta.input_shape[0] if lm else 1)
  return {
      'params': train.num_params(s),
      'non_embedding_params': non_embedding_params(nn.meta.unbox(s.abstract_boxed).params),
      'flops_per_step': flops.train_flops(c.model, meta, c.data.batch_size),
      'unit': 'tokens' if lm else 'examples',
      'units_per_step': per_step,
      'steps': c.train.steps,
  }


def finished(workdir: str, steps: int) -> bool:
  """Whether `workdir` holds the summary of a run that reached `steps`."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    return False
  try:
    with open(path) as f:
      return json.load(f).get('step') == steps
  except ValueError:
    return False


def _check_out(out: str, head: dict) -> dict | None:
  """The sweep.json already in `out` (None for a new folder); refuses another sweep's folder."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f'--out {out}: exists and is not a folder')
  path = os.path.join(out, FILE)
  if not os.path.isfile(path):
    if os.path.isdir(out) and os.listdir(out):
      raise ConfigError(f'--out {out}: a folder that holds no {FILE} (not a sweep); choose '
                        'another --out')
    return None
  saved = workdir_lib.read_json(path, f'--out {out}', 'choose another --out')
  for key in ('experiment', 'variant', 'overrides'):
    if saved.get(key) != head[key]:
      raise ConfigError(f"--out {out}: holds a sweep of {saved.get('experiment')}"
                        f"{':' + saved['variant'] if saved.get('variant') else ''} with "
                        f"overrides {saved.get('overrides')} ({key} differs); use a new --out")
  return saved


def _measure() -> tuple[object, object]:
  """The energy meter of the local devices and its first reading."""
  from jaxbig.tools.bench import energy  # pylint: disable=g-import-not-at-top
  m = energy.meter(jax.local_devices())
  return m, m.read()


def _peak_bytes() -> int | None:
  """Device 0's peak bytes in use since the process started, where the backend counts them."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def run_sweep(spec: str, out: str, overrides: Sequence[str] = (), command: str | None = None,
              stop_after: tuple[str, int] | None = None) -> dict:
  """Trains every unfinished member of the sweep `spec` under `out`; returns sweep.json's dict.

  `overrides` apply to every member, after its own. `stop_after=(member, step)` ends that
  member's training at `step` without its final save and stops the sweep there (an
  interruption, for tests). After a SIGTERM the member saves, the sweep stops and the dict
  has 'preempted': the member's name.
  """
  path, _, variant = spec.partition(':')
  found = members(spec)
  head = {'experiment': path, 'variant': variant, 'overrides': list(overrides)}
  saved = _check_out(out, head)
  # Validate and size every member before anything is written.
  configs, entries = {}, []
  for name, own in found:
    try:
      configs[name] = config_lib.load(spec, [*own, *overrides])
    except ConfigError as e:
      raise ConfigError(f'member {name}: {e}') from None
    entry = {'name': name, 'overrides': own, **describe(train.setup(configs[name]))}
    entries.append(entry)
  old = {m['name']: m for m in (saved or {}).get('members', [])}
  for entry in entries:  # A member trained under other overrides is not silently reused.
    before = old.get(entry['name'], {}).get('overrides')
    if before is not None and before != entry['overrides'] and os.path.isdir(
        os.path.join(out, entry['name'])):
      changed = sorted(set(entry['overrides']) ^ set(before))
      raise ConfigError(f"--out {out}: member {entry['name']} was trained with other "
                        f"overrides ({', '.join(changed)} differ: the sweep file changed); "
                        'use a new --out')
  for entry in entries:  # What earlier invocations measured.
    for key in ('peak_bytes', 'energy_j', 'energy_note'):
      if key in old.get(entry['name'], {}):
        entry[key] = old[entry['name']][key]
  state = {**head, 'command': command or (saved or {}).get('command'), 'members': entries}
  os.makedirs(out, exist_ok=True)
  workdir_lib.write_json(os.path.join(out, FILE), state)
  for entry in entries:
    name = entry['name']
    workdir = os.path.join(out, name)
    if finished(workdir, entry['steps']):
      print(f'jaxbig: sweep: {name} finished already; skipped', file=sys.stderr, flush=True)
      continue
    print(f'jaxbig: sweep: training {name}', file=sys.stderr, flush=True)
    stop = stop_after[1] if stop_after and stop_after[0] == name else None
    meter, start = _measure()
    t0 = time.perf_counter()
    summary = train.train_and_evaluate(configs[name], workdir, stop_after=stop)
    end = meter.read()
    if summary is None or summary.get('preempted'):
      state['preempted'] = name
      break
    entry['peak_bytes'] = _peak_bytes()
    if summary.get('resumed_from'):
      entry.pop('energy_j', None)
      entry['energy_note'] = 'resumed: the meter saw only the last part of the run'
    elif start is None:
      entry['energy_note'] = meter.reason
    else:
      entry['energy_j'] = meter.joules(start, end)
      entry['energy_note'] = f'{meter.method} over {time.perf_counter() - t0:.0f} s'
    workdir_lib.write_json(os.path.join(out, FILE), {k: v for k, v in state.items()
                                                      if k != 'preempted'})
  return state


def default_out(spec: str) -> str:
  """runs/sweep/<experiment>[-<variant>]-<timestamp>."""
  path, _, variant = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0] + (f"-{variant.replace(',', '-')}"
                                                         if variant else '')
  return os.path.join('runs', 'sweep', f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
