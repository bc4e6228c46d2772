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

Only what jaxbig wrote counts: a step is a folder named by its number holding our manifest or
Orbax's `_CHECKPOINT_METADATA`. Anything else in `checkpoints/` (a user's `2023/`, an empty
`30/`) is left alone and reported once.

Old steps are deleted here, not by Orbax: after each manifest, all but the newest `keep`
steps that have manifests, each first renamed out of the way and then removed. A step still
being written never counts, and a corrupt step is moved away before any save, so neither can
get the last good step deleted.

Readers (`eval`, `predict`, `generate`, `quantize`) never read a step in place while a run
may delete it: `pinned()` hard-links the step's files into `WORKDIR/.readers/<id>/` and reads
the links, which keep the data alive whatever the run deletes meanwhile; a rename that
happens while linking makes it fail, and it tries the newest step again. Training never
waits for a reader. Paths are those of a (shared) POSIX file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbig.config import ConfigError

ITEMS = ('state', 'data', 'meta')
MANIFEST = 'jaxbig_manifest.json'
ORBAX_METADATA = '_CHECKPOINT_METADATA'  # Orbax writes it into every step it saves.
DELETING = '.jaxbig-deleting'  # A step renamed for deletion: `<step>.jaxbig-deleting`.
READERS = '.readers'  # WORKDIR/.readers/<id>/: a reader's hard links to the step it reads.
# What jaxbig (through Orbax) names inside checkpoints/: steps, Orbax's temporary folders of
# a save in progress, and steps being deleted.
_OURS = re.compile(r'\d+(' + re.escape(ocp.step.TMP_DIR_SUFFIX) + r'.*|' + re.escape(DELETING)
                   + r')?')


def abstract_like(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: restore straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def fingerprint(config: dict, abstract_state, data: dict | None = None) -> dict:
  """What a checkpoint must match to be resumed: flat config fields, the leaves' shapes and
  the data's identity (files, sizes, hashes: `jaxbig.data`)."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  shapes = {jax.tree_util.keystr(p): f'{np.dtype(x.dtype).name}{list(x.shape)}'
            for p, x in leaves}
  return {'config': config, 'shapes': shapes, 'data': data}


def bound_gb(abstract_tree, gb: float = 1.0) -> float:
  """A bound (GB) on the bytes Orbax holds in flight: `gb`, or twice the largest array of
  `abstract_tree` where that is more (Orbax refuses an array as large as its bound)."""
  largest = max((x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_tree)),
                default=0)
  return max(gb, 2 * largest / 1e9)


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


def is_step(path: str) -> bool:
  """Whether `path` is a step folder that jaxbig wrote (not just a folder with a number)."""
  return (os.path.basename(path).isdigit() and os.path.isdir(path) and
          (os.path.exists(os.path.join(path, MANIFEST)) or
           os.path.exists(os.path.join(path, ORBAX_METADATA))))


def _link_tree(src: str, dest: str) -> None:
  """Hard-links every file of `src` into `dest` (made here); FileNotFoundError if `src` is
  renamed or removed meanwhile."""
  os.makedirs(dest)
  for root, dirs, names in os.walk(src):
    rel = os.path.relpath(root, src)
    for d in dirs:
      os.makedirs(os.path.join(dest, rel, d), exist_ok=True)
    for name in names:
      os.link(os.path.join(root, name), os.path.join(dest, rel, name))
  if not os.path.isdir(src):  # Renamed away before the walk started: it saw nothing.
    raise FileNotFoundError(src)


def _remove_dead_readers(readers: str) -> None:
  """Removes the link folders of readers that ended without removing them (killed)."""
  if not os.path.isdir(readers):
    return
  for name in os.listdir(readers):
    path = os.path.join(readers, name, 'lock')
    try:
      with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Fails while its reader lives.
    except OSError:
      continue
    shutil.rmtree(os.path.join(readers, name), ignore_errors=True)


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
               fingerprint: dict | None = None, read_only: bool = False,
               concurrent_gb: float | None = None, compress: bool = True):
    """Touches nothing: a writer's folder is made and tidied by `open_for_writing()`.
    `concurrent_gb` (from `bound_gb`) bounds the bytes a save copies to the host and writes
    at once, and a restore reads at once (Orbax's defaults: every device-to-host copy at
    once, 96 GB in flight).
    `compress=False` writes the arrays uncompressed (zstd buffers a compressed copy of what
    it writes; readers read either)."""
    self.directory = os.path.abspath(directory)
    self.keep, self.fingerprint, self.read_only = keep, fingerprint, read_only
    self.async_save, self.concurrent_gb, self.compress = async_save, concurrent_gb, compress
    self.primary = jax.process_index() == 0
    self._thread, self._error, self._manager, self._reported = None, None, None, False

  @property
  def manager(self) -> ocp.CheckpointManager:
    """Orbax's manager, made on first use (it creates nothing: see `open_for_writing`)."""
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, enable_async_checkpointing=self.async_save, create=False,
          read_only=self.read_only)
      # PyTree (not Standard) handler: its restore reads a part of the state (`skip`).
      bound = {} if self.concurrent_gb is None else dict(
          save_concurrent_gb=self.concurrent_gb, restore_concurrent_gb=self.concurrent_gb,
          save_device_host_concurrent_gb=self.concurrent_gb)
      handlers = {'state': ocp.PyTreeCheckpointHandler(use_compression=self.compress, **bound),
                  'data': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=handlers)
    return self._manager

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def open_for_writing(self, corrupt: list[int] = ()) -> None:
    """Makes the folder, moves the `corrupt` steps away and removes what killed saves and
    readers left behind. Called once a run has passed every check (process 0 writes)."""
    if self.read_only:
      raise ValueError('read-only checkpoints')
    if self.primary:
      os.makedirs(self.directory, exist_ok=True)
      for step in corrupt:
        if os.path.isdir(self._path(step)):
          _warn(f'checkpoint step {step} is corrupt; moved to {self._quarantine(step)}')
      self._remove_temporary()
      _remove_dead_readers(os.path.join(os.path.dirname(self.directory), READERS))
    else:
      os.makedirs(self.directory, exist_ok=True)
    self.manager.reload()

  def _remove_temporary(self) -> None:
    """Removes what killed saves left: Orbax's temporary folders, unfinished steps, steps
    half deleted, our .tmp files."""
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if not os.path.isdir(path) or not _OURS.fullmatch(name):
        continue
      if name.endswith(DELETING):
        shutil.rmtree(path, ignore_errors=True)
      elif not name.isdigit():  # Orbax's temporary folder.
        _warn(f'removing {path}: a save that did not finish')
        shutil.rmtree(path, ignore_errors=True)
      elif is_step(path) and not ocp.step.is_path_finalized(path):
        _warn(f'removing {path}: a save that did not finish')
        shutil.rmtree(path, ignore_errors=True)
      elif os.path.exists(os.path.join(path, MANIFEST + '.tmp')):
        os.remove(os.path.join(path, MANIFEST + '.tmp'))

  def steps(self) -> list[int]:
    """Steps that Orbax committed, oldest first (whether or not their files are intact).

    Folders jaxbig did not write are left out, and reported once on stderr.
    """
    if not os.path.isdir(self.directory):
      return []
    names = os.listdir(self.directory)
    found = sorted(int(n) for n in names if is_step(os.path.join(self.directory, n))
                   and ocp.step.is_path_finalized(self._path(int(n))))
    foreign = sorted(n for n in names if not _OURS.fullmatch(n) or
                     (n.isdigit() and int(n) not in found and
                      not is_step(os.path.join(self.directory, n))))
    if foreign and not self._reported and self.primary:
      self._reported = True
      shown = ', '.join(foreign[:5]) + (' ...' if len(foreign) > 5 else '')
      _warn(f'{self.directory}: ignoring {len(foreign)} entr{"y" if len(foreign) == 1 else "ies"}'
            f' that jaxbig did not write ({shown}); they are left as they are')
    return found

  def foreign_steps(self) -> list[int]:
    """Numbers of folders in `checkpoints/` named like steps that jaxbig did not write."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and not is_step(os.path.join(self.directory, n)))

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

  def find_newest(self) -> tuple[int | None, list[int]]:
    """(the newest intact step or None, the corrupt steps newer than it), changing nothing
    but the manifest of an adopted step. Process 0 decides for all."""
    step, bad = -1, []
    if self.primary:
      found = self.steps()
      for candidate in reversed(found):
        problem = self.check(candidate)
        if problem is None:
          step = candidate
          break
        bad.append(candidate)
        _warn(f'checkpoint step {candidate} is corrupt ({problem}); falling back to the '
              'previous one')
      if found and step < 0:
        step = -2
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    if step == -2:
      listed = f" (corrupt: {', '.join(map(str, bad))})" if bad else ''
      raise ConfigError(f'{self.directory}: no checkpoint passes its checksums{listed}; move '
                        'the folder away to start over')
    return (None if step < 0 else step), bad

  @contextlib.contextmanager
  def pinned(self, step: int | None = None) -> Iterator[tuple['Checkpoints', int]]:
    """(read-only checkpoints holding hard links to `step`, or to the newest intact step;
    that step), for readers of a folder a run may be writing: nothing they read is deleted
    under them. Where links cannot be made (a read-only or foreign file system) it reads in
    place."""
    readers = os.path.join(os.path.dirname(self.directory), READERS)
    try:
      os.makedirs(readers, exist_ok=True)
      folder = tempfile.mkdtemp(prefix=f'{os.getpid()}-', dir=readers)
    except OSError:
      yield self, self._pick(step)
      return
    lock = open(os.path.join(folder, 'lock'), 'w')
    try:
      fcntl.flock(lock, fcntl.LOCK_SH)  # Held while reading: the owner removes it after.
      view = Checkpoints(folder, read_only=True, fingerprint=self.fingerprint,
                         concurrent_gb=self.concurrent_gb)
      picked = self._link_newest(view, step)
      if picked is None:  # No hard links on this file system.
        yield self, self._pick(step)
        return
      try:
        yield view, picked
      finally:
        view.close()
    finally:
      lock.close()
      shutil.rmtree(folder, ignore_errors=True)
      with contextlib.suppress(OSError):
        os.rmdir(readers)  # Only when no other reader is in it.

  def _link_newest(self, view: 'Checkpoints', step: int | None) -> int | None:
    """Links `step` (or the newest intact step) into `view`'s folder and returns it; None
    where hard links cannot be made."""
    workdir = os.path.dirname(self.directory)
    for _ in range(100):  # Each retry follows a step the run deleted while we linked it.
      found = self._listed(step)
      bad = []
      for candidate in [step] if step is not None else reversed(found):
        dest = view._path(candidate)
        try:
          _link_tree(self._path(candidate), dest)
        except FileNotFoundError:  # Deleted by the run meanwhile: list the steps again.
          shutil.rmtree(dest, ignore_errors=True)
          break
        except OSError:
          shutil.rmtree(dest, ignore_errors=True)
          return None
        problem = view.check(candidate)
        if problem is None:
          return candidate
        if step is not None:
          raise ConfigError(f'{workdir}: checkpoint step {step} is corrupt ({problem})')
        _warn(f'checkpoint step {candidate} is corrupt ({problem}); falling back to the '
              'previous one')
        bad.append(candidate)
        shutil.rmtree(dest, ignore_errors=True)
      else:
        raise ConfigError(f"{self.directory}: no checkpoint passes its checksums (corrupt: "
                          f"{', '.join(map(str, bad))})")
    raise ConfigError(f'{workdir}: its checkpoints were deleted faster than they could be read')

  def _listed(self, step: int | None) -> list[int]:
    """The committed steps; a ConfigError if there are none, or `step` is not among them."""
    workdir, found = os.path.dirname(self.directory), self.steps()
    if not found:
      raise ConfigError(f'{workdir}: has no checkpoint to load')
    if step is not None and step not in found:
      raise ConfigError(f'{workdir}: has no checkpoint of step {step} (it has '
                        f"{', '.join(map(str, found))})")
    return found

  def _pick(self, step: int | None) -> int:
    """`step` if it is there and intact, else the newest intact step; a ConfigError if none."""
    workdir = os.path.dirname(self.directory)
    self._listed(step)
    if step is None:
      return self.find_newest()[0]
    problem = self.check(step)
    if problem is not None:
      raise ConfigError(f'{workdir}: checkpoint step {step} is corrupt ({problem})')
    return step

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
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
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
    """Deletes all but the newest `keep` steps that have manifests: each is renamed first, so
    that a reader linking its files fails at once instead of reading half of it."""
    done = [s for s in self.steps() if read_manifest(self._path(s)) is not None]
    for old in done[:-self.keep]:
      gone = self._path(old) + DELETING
      shutil.rmtree(gone, ignore_errors=True)
      os.replace(self._path(old), gone)
      shutil.rmtree(gone, ignore_errors=True)

  def restore(self, step: int, abstract_state: Any, fresh: dict | None = None,
              skip: tuple[str, ...] = ()) -> tuple[Any, dict, dict]:
    """(state, data iterator state, meta) of `step`, the state laid out like `abstract_state`.

    The step's fingerprint must match this run's (a ConfigError names what changed). A field
    of the state that the checkpoint lacks (saved before the field existed) keeps its empty
    value (`{}`, e.g. `loss_scale` without loss scaling) or takes its value from `fresh`.
    Fields named in `skip` are not read and come back as None (readers need no optimizer
    state). Only the leaves of `abstract_state` are read: a checkpoint holding more (the
    optimizer state of the adapters alone, say) restores into a smaller tree.
    """
    self.check_fingerprint(step)
    saved = self.saved_fields(step)
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
              if f.name not in skip}
    absent = [k for k in fields if k not in saved]
    for k in absent:
      if not (_empty(fields[k]) or k in (fresh or {})):
        raise ValueError(f"checkpoint step {step} has no '{k}' in its state, which this run "
                         'needs')
    target = {k: v for k, v in fields.items() if k not in absent}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    # partial_restore leaves a leaf the step lacks as the target's ShapeDtypeStruct.
    lacking = [jax.tree_util.keystr(p) for p, x in
               jax.tree_util.tree_leaves_with_path(out['state'])
               if isinstance(x, jax.ShapeDtypeStruct)]
    if lacking:
      raise ValueError(f'checkpoint step {step} has no {lacking[0]} in its state, which this '
                       'run needs')
    filled = {k: fields[k] if _empty(fields[k]) else fresh[k] for k in absent}
    state = abstract_state.replace(**out['state'], **filled, **{k: None for k in skip})
    return state, out['data'], out['meta']

  def _saved_state(self, step: int) -> dict:
    """Orbax's metadata tree of step `step`'s state item (field -> subtree)."""
    saved = self.manager.item_metadata(step)['state']
    return dict(getattr(saved, 'tree', saved) or {})

  def saved_params(self, step: int) -> list[str]:
    """The paths ('a/b/c') of the parameters that step `step` holds."""
    out = []
    def walk(node, prefix):
      for k, v in node.items():
        if isinstance(v, dict):
          walk(v, f'{prefix}{k}/')
        else:
          out.append(prefix + k)
    walk(dict(self._saved_state(step).get('params') or {}), '')
    return out

  def saved_fields(self, step: int) -> set[str]:
    """The fields of the state that step `step` holds (a None field, as import-hf saves the
    optimizer state, is not held)."""
    return {k for k, v in self._saved_state(step).items() if v is not None}

  def check_fingerprint(self, step: int, describe_data: Callable | None = None) -> None:
    """Raises a ConfigError naming what differs between `step`'s fingerprint and this run's:
    config fields, else state leaves, else the data (`describe_data(saved, new)` names it).
    Steps saved without a fingerprint, or without the data's, are not checked for them."""
    manifest = read_manifest(self._path(step)) or {}
    saved, new = manifest.get('fingerprint'), self.fingerprint
    if saved is None or new is None or _digest(saved) == _digest(new):
      return
    keys = sorted(set(saved['config']) | set(new['config']))
    changed = [f"{k} ({saved['config'].get(k)!r} -> {new['config'].get(k)!r})" for k in keys
               if saved['config'].get(k) != new['config'].get(k)]
    if not changed:  # Same config, other shapes: the code changed under the checkpoint.
      keys = sorted(set(saved['shapes']) | set(new['shapes']))
      changed = [f"state leaf {k} ({saved['shapes'].get(k)} -> {new['shapes'].get(k)})"
                 for k in keys if saved['shapes'].get(k) != new['shapes'].get(k)]
    if changed:
      raise ConfigError(f'checkpoint step {step} in {self.directory} was saved by a run with a '
                        f"different config: {', '.join(changed[:5])}; resume with the old "
                        'config or use a new --workdir')
    if saved.get('data') is not None and describe_data is not None:
      change = describe_data(saved['data'], new.get('data'))
      if change:
        raise ConfigError(f'{change} since checkpoint step {step} in {self.directory} was '
                          'saved; resume with the same data or use a new --workdir')

  def saved_fingerprint(self, step: int) -> dict:
    """The fingerprint step `step` was saved with ({} for none)."""
    return (read_manifest(self._path(step)) or {}).get('fingerprint') or {}

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
      if self._manager is not None:
        self._manager.close()
