"""Orbax checkpoints of a run, and what makes them safe to resume from.

Each step folder holds three Orbax items: `state` (params, batch statistics, optimizer state,
step, RNG, loss scale, skip counts), `data` (the grain iterator state, JSON) and `meta`
(`DataMeta`, JSON, so that `eval` and `predict` need nothing but the workdir). Saves are
asynchronous.

A step is trusted once it is committed twice over:
  1. by Orbax, which writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when every
     item is complete (on object stores it writes `commit_success.txt` instead);
     `ocp.step.is_path_finalized` tells which. A new run removes the temporary folders that a
     killed save left behind. (Orbax's own `latest_step()` also counts a save that is still
     running or failed, so we list the folders ourselves.)
  2. by our manifest, `<step>/jaxbig_manifest.json`, written by process 0 once Orbax's commit
     is done: the size and SHA-256 of every file of the step, and the run's fingerprint (the
     config fields that may not change on resume, and the shape and dtype of every leaf).
Before a restore the newest step's files are checked against its manifest. A step that fails
(truncated, bit-flipped, a file missing) is moved to `checkpoints_corrupt/` with a warning on
stderr and the next older one is tried; with none left the run stops rather than start over.
A committed step without a manifest (killed between the two commits, or saved by a jaxbig
from before manifests) is adopted: its manifest is written then, without a fingerprint.

Old steps are deleted here, not by Orbax: after each manifest, all but the newest `keep`
steps that have manifests. A step still being written never counts, and a corrupt step is
moved away before any save, so neither can get the last good step deleted. Paths are those
of a (shared) POSIX file system.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbig.config import ConfigError

ITEMS = ('state', 'data', 'meta')
MANIFEST = 'jaxbig_manifest.json'


def abstract_like(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: restore straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def fingerprint(config: dict, abstract_state) -> dict:
  """What a checkpoint must match to be resumed: flat config fields and the leaves' shapes."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  shapes = {jax.tree_util.keystr(p): f'{np.dtype(x.dtype).name}{list(x.shape)}'
            for p, x in leaves}
  return {'config': config, 'shapes': shapes}


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _files(path: str) -> list[str]:
  """The files of a step folder, relative to it, without our manifest."""
  out = []
  for root, _, names in os.walk(path):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), path)
      if not rel.startswith(MANIFEST):
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 23), b''):
      h.update(block)
  return h.hexdigest()


def write_manifest(path: str, step: int, print_: dict | None) -> None:
  """Writes the manifest of the committed step folder `path` (via a rename: never half)."""
  files = {rel: {'size': os.path.getsize(os.path.join(path, rel)),
                 'sha256': _sha256(os.path.join(path, rel))} for rel in _files(path)}
  manifest = {'step': step, 'files': files, 'fingerprint': print_,
              'fingerprint_sha256': _digest(print_) if print_ is not None else None}
  tmp = os.path.join(path, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict | None:
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {'files': None}  # Unreadable: fails verification.


def verify(path: str) -> str | None:
  """None if the step folder matches its manifest, else what is wrong."""
  manifest = read_manifest(path)
  if manifest is None:
    return 'no manifest'
  if not isinstance(manifest.get('files'), dict):
    return f'{MANIFEST} is unreadable'
  present = set(_files(path))
  for rel, want in sorted(manifest['files'].items()):
    full = os.path.join(path, rel)
    if rel not in present:
      return f'{rel} is missing'
    size = os.path.getsize(full)
    if size != want['size']:
      return f'{rel} has {size} bytes, {want["size"]} when saved'
    if _sha256(full) != want['sha256']:
      return f'{rel} does not match its SHA-256'
  extra = sorted(present - set(manifest['files']))
  return f'{extra[0]} was not part of the save' if extra else None


def _empty(value) -> bool:
  return isinstance(value, dict) and not value


def _warn(message: str) -> None:
  print(f'jaxbig: warning: {message}', file=sys.stderr, flush=True)


class Checkpoints:
  """The run's checkpoints: Orbax saves plus manifests, verified restores, our own GC.

  `fingerprint` (from `fingerprint()`) is stored with every step and compared on restore.
  `read_only` (eval, predict) never writes, moves or deletes anything.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               create_dirs: bool = True, fingerprint: dict | None = None,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.keep, self.fingerprint, self.read_only = keep, fingerprint, read_only
    self.primary = jax.process_index() == 0
    self._thread, self._error = None, None
    if self.primary and not read_only and os.path.isdir(self.directory):
      self._remove_temporary()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, enable_async_checkpointing=async_save,
        create=create_dirs and not read_only, read_only=read_only)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _remove_temporary(self) -> None:
    """Removes what killed saves left: Orbax's temporary folders, unfinished steps, our .tmp."""
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if not os.path.isdir(path):
        continue
      leftover = ocp.step.TMP_DIR_SUFFIX in name or (
          name.isdigit() and not ocp.step.is_path_finalized(path))
      if leftover:
        _warn(f'removing {path}: a save that did not finish')
        shutil.rmtree(path, ignore_errors=True)
      elif name.isdigit() and os.path.exists(os.path.join(path, MANIFEST + '.tmp')):
        os.remove(os.path.join(path, MANIFEST + '.tmp'))

  def steps(self) -> list[int]:
    """Steps that Orbax committed, oldest first (whether or not their files are intact)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and ocp.step.is_path_finalized(self._path(int(n))))

  def check(self, step: int) -> str | None:
    """None if `step` is intact (adopting it if it has no manifest), else what is wrong."""
    path = self._path(step)
    if read_manifest(path) is None:
      if self.read_only:
        return None  # Nothing to check against, and nothing may be written.
      _warn(f'{path} was committed without a manifest (interrupted right after saving, or '
            'saved by an older jaxbig): adopting it unchecked')
      write_manifest(path, step, None)
      return None
    return verify(path)

  def newest(self) -> int | None:
    """The newest intact step (None: nothing saved yet). Corrupt newer steps are moved to
    `<directory>_corrupt/` (read-only: skipped) with a warning. Process 0 decides for all."""
    step, bad = -1, []
    if self.primary:
      found = self.steps()
      for candidate in reversed(found):
        problem = self.check(candidate)
        if problem is None:
          step = candidate
          break
        bad.append(candidate)
        where = '' if self.read_only else f'; moved to {self._quarantine(candidate)}'
        _warn(f'checkpoint step {candidate} is corrupt ({problem}){where}; falling back to '
              'the previous one')
      if found and step < 0:
        step = -2
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    if not self.read_only:
      self.manager.reload()  # It listed the folder before any corrupt step was moved away.
    if step == -2:
      listed = f" (corrupt: {', '.join(map(str, bad))})" if bad else ''
      raise ConfigError(f'{self.directory}: no checkpoint passes its checksums{listed}; move '
                        'the folder away to start over')
    return None if step < 0 else step

  def _quarantine(self, step: int) -> str:
    folder = self.directory + '_corrupt'
    os.makedirs(folder, exist_ok=True)
    dest, n = os.path.join(folder, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(folder, f'{step}-{n}'), n + 1
    shutil.move(self._path(step), dest)
    return dest

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts an asynchronous save of `step` (returns once the arrays are copied off-device);
    a background thread writes its manifest once Orbax has committed it."""
    self.wait()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._thread = threading.Thread(target=self._commit, args=(step,), daemon=True,
                                    name=f'jaxbig-commit-{step}')
    self._thread.start()

  def _commit(self, step: int) -> None:
    try:
      self.manager.wait_until_finished()
      if self.primary:
        write_manifest(self._path(step), step, self.fingerprint)
        self._collect()
    except BaseException as e:  # pylint: disable=broad-except  # Raised by wait().
      self._error = e

  def _collect(self) -> None:
    """Deletes all but the newest `keep` steps that have manifests."""
    done = [s for s in self.steps() if read_manifest(self._path(s)) is not None]
    for old in done[:-self.keep]:
      shutil.rmtree(self._path(old), ignore_errors=True)

  def restore(self, step: int, abstract_state: Any, fresh: dict | None = None
              ) -> tuple[Any, dict, dict]:
    """(state, data iterator state, meta) of `step`, the state laid out like `abstract_state`.

    The step's fingerprint must match this run's (a ConfigError names what changed). A field
    of the state that the checkpoint lacks (saved before the field existed) keeps its empty
    value (`{}`, e.g. `loss_scale` without loss scaling) or takes its value from `fresh`.
    """
    if self.fingerprint is not None:
      self._check_fingerprint(step)
    saved = self.manager.item_metadata(step)['state']
    saved = set(getattr(saved, 'tree', saved) or {})
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    absent = [k for k in fields if k not in saved]
    for k in absent:
      if not (_empty(fields[k]) or k in (fresh or {})):
        raise ValueError(f"checkpoint step {step} has no '{k}' in its state, which this run "
                         'needs')
    target = {k: v for k, v in fields.items() if k not in absent}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    filled = {k: fields[k] if _empty(fields[k]) else fresh[k] for k in absent}
    state = abstract_state.replace(**out['state'], **filled)
    return state, out['data'], out['meta']

  def _check_fingerprint(self, step: int) -> None:
    manifest = read_manifest(self._path(step)) or {}
    saved = manifest.get('fingerprint')
    if saved is None or _digest(saved) == _digest(self.fingerprint):
      return
    new = self.fingerprint
    keys = sorted(set(saved['config']) | set(new['config']))
    changed = [f"{k} ({saved['config'].get(k)!r} -> {new['config'].get(k)!r})" for k in keys
               if saved['config'].get(k) != new['config'].get(k)]
    if not changed:  # Same config, other shapes: the code changed under the checkpoint.
      keys = sorted(set(saved['shapes']) | set(new['shapes']))
      changed = [f"state leaf {k} ({saved['shapes'].get(k)} -> {new['shapes'].get(k)})"
                 for k in keys if saved['shapes'].get(k) != new['shapes'].get(k)]
    raise ConfigError(f'checkpoint step {step} in {self.directory} was saved by a run with a '
                      f"different config: {', '.join(changed[:5])}; resume with the old "
                      'config or use a new --workdir')

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    """Waits for the running save and its manifest; raises what went wrong in either."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
