"""The workdir of a run: `config.json`, `metrics.jsonl` kept in step with the checkpoints,
`summary.json`; every file written whole (a temporary file and a rename), and by process 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from jaxbig import config as config_lib
from jaxbig.config import ConfigError

# Fields of config.json that may change when a run is resumed (e.g. to train longer, or to
# skip non-finite steps differently). The layout over devices may change too: checkpoints
# restore onto any mesh. Everything else is the run's fingerprint, stored with each checkpoint.
RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.eval_every', 'train.ckpt_every',
                     'train.keep_checkpoints', 'train.on_nonfinite',
                     'train.max_consecutive_skips', 'mesh.data', 'mesh.fsdp', 'mesh.tensor',
                     'mesh.rules', 'parallel.mode')


def fingerprint_config(config) -> dict:
  """The flat config fields that a resumed run must keep."""
  flat = config_lib.flatten(config_lib.to_dict(config))
  return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}


def check_folder(workdir: str) -> None:
  """Refuses a --workdir that cannot hold a run (a file, or a folder we may not write)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir}: exists and is not a folder')
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  target = workdir if os.path.isdir(workdir) else parent
  if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir {workdir}: cannot be written ({target} is not a writable '
                      'folder)')


def read_json(path: str, where: str, fix: str) -> Any:
  """The JSON in `path`; a one-line ConfigError (`where`: the flag and folder; `fix`: what
  to do) when it does not parse."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    raise ConfigError(f'{where}: {os.path.basename(path)} is not valid JSON; restore it or '
                      f'{fix}') from None


def prepare(workdir: str, config) -> None:
  """Creates the workdir and its config.json; a resumed run must keep the same config."""
  check_folder(workdir)
  path = os.path.join(workdir, 'config.json')
  resolved = config_lib.to_dict(config)
  if os.path.exists(path):
    saved = read_json(path, f'--workdir {workdir}', 'use a new --workdir')
    changed = [k for k in config_lib.diff(saved, resolved) if k not in RESUMABLE_CHANGES]
    if changed:
      raise ConfigError(f"--workdir {workdir} holds a run with a different config "
                        f"({', '.join(changed)}); use a new --workdir")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json(path, resolved)


def write_json(path: str, obj: Any) -> None:
  """Writes via a temporary file and a rename, so a crash never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def _rows(path: str) -> list[tuple[str, dict]]:
  """(line, object) of each whole line; a line cut short by a killed process is dropped."""
  out = []
  with open(path) as f:
    for line in f:
      if not line.endswith('\n'):
        continue
      try:
        out.append((line, json.loads(line)))
      except ValueError:
        continue
  return out


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops lines logged after `step` (and any line cut short): the run logs them again."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path) or jax.process_index() != 0:
    return
  lines = [line for line, row in _rows(path) if row.get('step', step + 1) <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(lines)
  os.replace(path + '.tmp', path)


def last_logged(workdir: str) -> dict[str, float]:
  """The newest train/* values in metrics.jsonl."""
  out = {}
  for _, row in _rows(os.path.join(workdir, 'metrics.jsonl')):
    out.update({k: v for k, v in row.items() if k.startswith('train/')})
  return out
