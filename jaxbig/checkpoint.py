"""Orbax checkpoints of a run: the train state, the data iterator's position and the data's meta.

Each step directory holds three items: `state` (params, batch statistics, optimizer state,
step, RNG), `data` (the grain iterator state, JSON) and `meta` (`DataMeta`, JSON, so that
`eval` and `predict` need nothing but the workdir). Saves are asynchronous.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'meta')


def abstract_like(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: restore straight onto the mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


class Checkpoints:
  """A thin wrapper over `ocp.CheckpointManager` for this run's three items."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               create_dirs: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=create_dirs)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts an asynchronous save of `step` (returns once the arrays are copied off-device)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data iterator state, meta) of `step`, the state laid out like `abstract_state`.

    A checkpoint written before a field of the state existed restores when the field is
    empty (`{}`, e.g. `loss_scale` without loss scaling): it keeps the empty value.
    """
    restore = lambda target: self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    try:
      out = restore(abstract_state)
      state = out['state']
    except ValueError as e:
      fields = {f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state)}
      absent = [k for k, v in fields.items()
                if isinstance(v, dict) and not v and f'\n{k}:\n' in f'\n{e}']
      if not absent:
        raise
      out = restore({k: v for k, v in fields.items() if k not in absent})
      state = abstract_state.replace(**out['state'])
    return state, out['data'], out['meta']

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
