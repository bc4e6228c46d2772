"""The workdir of a run: `config.json`, `metrics.jsonl` kept in step with the checkpoints,
`summary.json`; every file written whole (a temporary file and a rename), and by process 0.

A workdir has one owner. `owned()` takes an OS file lock, `jaxbig-<process>.lock`, for every
process of a run (the kernel releases it when the process ends, however it ends, so a killed
run never leaves it held); a second `jaxbig train` on the folder stops with one line naming
the holder's pid and host. jaxbig writes only into a folder that it creates or that holds a
jaxbig `config.json`: any other non-empty folder is refused, untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Iterator

import jax

from jaxbig import config as config_lib
from jaxbig.config import ConfigError

# Fields of config.json that may change when a run is resumed (e.g. to train longer, or to
# skip non-finite steps differently). The layout over devices may change too: checkpoints
# restore onto any mesh. Everything else is the run's fingerprint, stored with each checkpoint.
RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.eval_every', 'train.ckpt_every',
                     'train.keep_checkpoints', 'train.on_nonfinite',
                     'train.max_consecutive_skips', 'mesh.data', 'mesh.fsdp', 'mesh.tensor',
                     'mesh.context', 'mesh.slices', 'mesh.rules', 'parallel.mode',
                     # Limits on reading text: the data's identity is checked on its own.
                     'data.max_file_mb', 'data.max_total_mb',
                     # Decoding processes: the batches are the same with any number.
                     'data.workers', 'data.max_bad_images',
                     'data.verify_shards',  # A check of the shards: they are what they were.
                     'train.profile_steps', 'train.profile_start')


# Fields added since runs were first saved, with the value that reproduces what those runs
# did: a config.json or fingerprint without the field counts as holding that value.
ADDED_FIELDS = {'kernels': 'auto', 'data.pack': False, 'data.vocab_size': 0,
                'model.logits_chunk': 0, 'model.kv_heads': 0, 'model.mlp': 'gelu',
                'model.bias': False, 'model.rope_theta': 10_000.0, 'model.norm_eps': 1e-6,
                'mesh.context': 1, 'mesh.slices': 1, 'model.norm': 'rms',
                'model.mlp_dim': 0, 'model.vocab_size': 0, 'train.init_from': '',
                'lora.rank': 0, 'lora.alpha': 16.0, 'lora.targets': 'q,k,v,o'}


# Values renamed since runs were first saved: a saved run's value -> today's name for it.
RENAMED_VALUES = {'model.remat': ((False, 'none'), (True, 'full'))}


def fingerprint_config(config) -> dict:
  """The flat config fields that a resumed run must keep (an added field at its old
  behaviour left out, a renamed value in its old form, so that runs saved before still
  match)."""
  flat = config_lib.flatten(config_lib.to_dict(config))
  for key, pairs in RENAMED_VALUES.items():
    if key in flat:
      flat[key] = next((old for old, new in pairs if flat[key] == new), flat[key])
  return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES
          and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


def _rename_values(saved: dict) -> None:
  """Today's names for the renamed values of a saved config, in place."""
  for key, pairs in RENAMED_VALUES.items():
    section, _, field = key.rpartition('.')
    holder = saved.get(section) if section else saved
    if isinstance(holder, dict) and field in holder:
      value = holder[field]
      holder[field] = next((new for old, new in pairs
                            if type(old) is type(value) and old == value), value)


_LOCK = re.compile(r'jaxbig-\d+\.lock')
SECTIONS = ('seed', 'data', 'model', 'opt', 'train', 'mesh')  # What every jaxbig config has.


def check_folder(workdir: str) -> None:
  """Refuses a --workdir that cannot hold a run: a file, a folder we may not write, or a
  non-empty folder that is not a jaxbig workdir (it would get files of ours mixed in)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir}: exists and is not a folder')
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  target = workdir if os.path.isdir(workdir) else parent
  if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir {workdir}: cannot be written ({target} is not a writable '
                      'folder)')
  if os.path.isdir(workdir):
    names = [n for n in os.listdir(workdir) if not _LOCK.fullmatch(n)]
    if names and 'config.json' not in names:
      raise ConfigError(f'--workdir {workdir}: a non-empty folder that is not a jaxbig workdir '
                        '(it has no config.json); give a new folder or an earlier run\'s')
    if names:
      saved_config(workdir)  # Refuses a config.json that is not jaxbig's.


def saved_config(workdir: str) -> dict:
  """The workdir's config.json, checked to be a jaxbig config (a one-line error if not)."""
  path = os.path.join(workdir, 'config.json')
  saved = read_json(path, f'--workdir {workdir}', 'use a new --workdir')
  if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict)
                                            for k in SECTIONS if k != 'seed'):
    missing = [k for k in SECTIONS if not isinstance(saved, dict) or k not in saved]
    what = f"lacks {', '.join(missing)}" if isinstance(saved, dict) and missing else (
        'is not a config')
    raise ConfigError(f'{path}: not a jaxbig config ({what}); use a new --workdir')
  for key, value in ADDED_FIELDS.items():
    if '.' not in key:  # Section fields: check_config matches them.
      saved.setdefault(key, value)
  _rename_values(saved)
  return saved


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip() or 'unknown'
  except OSError:
    return 'unknown'


def lock(workdir: str, process: int) -> int | None:
  """Takes process `process`'s lock of the workdir; returns its file descriptor (the lock
  lasts while it is open). A one-line ConfigError if another process holds it; None, with a
  warning, on a file system without locks."""
  path = os.path.join(workdir, f'jaxbig-{process}.lock')
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise ConfigError(f'--workdir {workdir}: in use by another jaxbig train ({_holder(path)}); '
                      'wait for it to end or use another --workdir') from None
  except OSError as e:  # ENOLCK: e.g. an NFS mount without a lock service.
    os.close(fd)
    print(f'jaxbig: warning: --workdir {workdir}: cannot be locked ({e.strerror}); make sure '
          'no other run uses it', file=sys.stderr, flush=True)
    return None
  os.ftruncate(fd, 0)
  os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}, since '
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
  return fd


@contextlib.contextmanager
def owned(workdir: str) -> Iterator[None]:
  """Holds the workdir for this process of a run (see the module docstring). A folder made
  here and left holding nothing but the lock (the run was refused) is removed again."""
  check_folder(workdir)
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  process = jax.process_index()
  path = os.path.join(workdir, f'jaxbig-{process}.lock')
  new_lock = not os.path.exists(path)
  fd = lock(workdir, process)
  try:
    yield
  except BaseException:
    if created and process == 0 and all(_LOCK.fullmatch(n) for n in os.listdir(workdir)):
      shutil.rmtree(workdir, ignore_errors=True)
    elif new_lock and fd is not None:
      os.remove(path)  # A refused run leaves the folder as it found it.
    raise
  finally:
    if fd is not None:
      os.close(fd)


def read_json(path: str, where: str, fix: str) -> Any:
  """The JSON in `path`; a one-line ConfigError (`where`: the flag and folder; `fix`: what
  to do) when it does not parse."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    raise ConfigError(f'{where}: {os.path.basename(path)} is not valid JSON; restore it or '
                      f'{fix}') from None


def check_config(workdir: str, config) -> None:
  """A resumed run must keep the saved config, but for RESUMABLE_CHANGES; writes nothing."""
  check_folder(workdir)
  if os.path.exists(os.path.join(workdir, 'config.json')):
    saved, new = saved_config(workdir), config_lib.to_dict(config)
    flat_saved, flat_new = config_lib.flatten(saved), config_lib.flatten(new)
    added = lambda k: (k in ADDED_FIELDS and k not in flat_saved
                       and flat_new.get(k) == ADDED_FIELDS[k])
    changed = [k for k in config_lib.diff(saved, new)
               if k not in RESUMABLE_CHANGES and not added(k)]
    if changed:
      raise ConfigError(f"--workdir {workdir} holds a run with a different config "
                        f"({', '.join(changed)}); use a new --workdir")


def write_config(workdir: str, config) -> None:
  """Writes the resolved config.json (process 0), once the run has passed every check."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, 'config.json'), config_lib.to_dict(config))


def prepare(workdir: str, config) -> None:
  """Creates the workdir and its config.json; a resumed run must keep the same config."""
  check_config(workdir, config)
  write_config(workdir, config)


def finished(workdir: str, steps: int) -> dict | None:
  """The summary of a run that finished `steps` steps in this workdir, else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None  # Cut short or damaged: the run writes it again.
  return summary if isinstance(summary, dict) and summary.get('step') == steps else None


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


def truncate_metrics(workdir: str, step: int, final: bool = False) -> None:
  """Drops lines logged after `step` (and any line cut short): the run logs them again.
  `final`: the run resumes only for its final evaluation, whose line at `step` goes too."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path) or jax.process_index() != 0:
    return
  evaluated = lambda row: any(k.startswith(('eval/', 'test/')) for k in row)
  lines = [line for line, row in _rows(path) if row.get('step', step + 1) < step or (
      row.get('step') == step and not (final and evaluated(row)))]
  with open(path + '.tmp', 'w') as f:
    f.writelines(lines)
  os.replace(path + '.tmp', path)


def last_logged(workdir: str) -> dict[str, float]:
  """The newest train/* values in metrics.jsonl."""
  out = {}
  for _, row in _rows(os.path.join(workdir, 'metrics.jsonl')):
    out.update({k: v for k, v in row.items() if k.startswith('train/')})
  return out
