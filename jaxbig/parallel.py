"""How the steps run over the devices: `jax.jit` with shardings (the default) or `jax.pmap`.

`parallel.mode=jit` compiles one program for the whole (data, fsdp, tensor) mesh; XLA inserts
the collectives that the shardings imply. `parallel.mode=pmap` replicates the state on every
device and runs the step per device with explicit `psum`s over the 'batch' axis: plain data
parallelism, the way many JAX codebases still do it (JAX keeps pmap in maintenance mode).

Either way the loop sees the same `Steps`: it feeds each process's rows of a batch and keeps
the state in the layout `place` made; `unplace` gives back the mesh layout that checkpoints
hold, so a run saved under one mode or mesh resumes under another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from flax import jax_utils

from jaxbig import matmul, precision, sharding
from jaxbig.models import axes
from jaxbig.config import ConfigError

MODES = ('jit', 'pmap')
AXIS = 'batch'  # The pmap axis name the steps reduce over.


def mode(config) -> str:
  """`parallel.mode`, checked; configs saved before the field existed run under jit."""
  m = config.parallel.mode if 'parallel' in config else 'jit'
  if m not in MODES:
    raise ConfigError(f"parallel.mode: unknown mode '{m}'; choose from {', '.join(MODES)}")
  if m == 'pmap' and (config.mesh.fsdp != 1 or config.mesh.tensor != 1 or
                      config.mesh.get('context', 1) != 1 or config.mesh.get('slices', 1) != 1):
    raise ConfigError('parallel.mode=pmap is data parallel only: set mesh.fsdp, mesh.tensor, '
                      'mesh.context and mesh.slices to 1 (or use parallel.mode=jit)')
  return m


@dataclasses.dataclass
class Steps:
  """Compiled steps that take this process's share of a batch."""
  train: Callable  # (state, this process's rows of a batch) -> (state, metric sums)
  eval: Callable  # (state, the whole padded eval batch) -> metric sums
  place: Callable  # mesh-laid-out state -> the state the steps take
  unplace: Callable  # the steps' state -> mesh layout (what checkpoints hold)
  rows: Callable  # global batch size -> (lo, hi): this process's rows
  compile_s: float
  train_bytes: int | None = None  # XLA's memory analysis of the train step (jit), `memory`.
  eval_bytes: int | None = None  # The same for the eval step.


def memory(compiled) -> dict[str, int | None]:
  """XLA's memory analysis of a compiled step, in bytes (`total_bytes`: what it needs)."""
  m = compiled.memory_analysis()
  args, outs = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
  peak = getattr(m, 'peak_memory_in_bytes', 0) or None
  return {
      'arguments_bytes': int(args),
      'outputs_bytes': int(outs),
      'aliased_bytes': int(alias),  # Outputs written into donated arguments (the new state).
      'temporaries_bytes': int(temp),
      'code_bytes': int(m.generated_code_size_in_bytes),
      # The state is donated, so the new state reuses the old one's buffers: an aliased output
      # is counted once, as an argument. The usual AOT sum (MaxText's, too).
      'total_bytes': int(args + outs - alias + temp),
      # XLA's own peak of live buffers. On TPU it may exceed the total (small programs) or fall
      # below it; `fits` takes the larger. On CPU it leaves out the temporaries.
      'peak_bytes': None if peak is None else int(peak),
      # Host memory the program keeps temporaries in: what remat offloads (model.remat).
      'host_temporaries_bytes': int(getattr(m, 'host_temp_size_in_bytes', 0) or 0),
  }


@contextlib.contextmanager
def tracing(s):
  """The context in which to trace a jitted step of setup `s`: activations' logical
  constraints apply, the precision policy's matmul precision, and the models see the mesh's
  platform (`matmul.platform`)."""
  with (jax.set_mesh(s.mesh), axes.activation_rules(s.rules), precision.tracing(s.policy),
        matmul.compiling_for(s.mesh)):
    yield


def for_eval(state):
  """The part of a state (or of its shardings) that the jit eval step takes: no optimizer
  state."""
  return state.replace(opt_state=None)


def jit_steps(s, train_c, eval_c, compile_s: float) -> Steps:
  """`train_c`/`eval_c`: the compiled jit steps (or None: not needed), traced in `tracing(s)`
  for the global batch."""
  batch_sh = sharding.batch_sharding(s.mesh)
  rows = lambda size: sharding.process_rows(batch_sh, size)

  def train(state, local):
    return train_c(state, sharding.to_global(local, batch_sh, s.config.data.batch_size))

  def evaluate(state, batch):
    size = len(batch['mask'])
    lo, hi = rows(size)
    local = {k: v[lo:hi] for k, v in batch.items()}
    return eval_c(for_eval(state), sharding.to_global(local, batch_sh, size))

  same = lambda state: state
  train_bytes = memory(train_c)['total_bytes'] if train_c is not None else None
  eval_bytes = memory(eval_c)['total_bytes'] if eval_c is not None else None
  return Steps(train, evaluate, same, same, rows, compile_s, train_bytes, eval_bytes)


def pmap_steps(s, state, train_step: Callable | None, eval_step: Callable | None) -> Steps:
  """`train_step`/`eval_step`: per-device functions (or None: not needed); the train step
  reduces over `AXIS` itself."""
  n_local, n_proc = jax.local_device_count(), jax.process_count()

  def rows(size):
    per = size // n_proc
    return jax.process_index() * per, (jax.process_index() + 1) * per

  per_device = lambda local: jax.tree.map(lambda a: a.reshape(n_local, -1, *a.shape[1:]), local)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)

  def place(mesh_state):
    return jax_utils.replicate(jax.device_get(mesh_state))

  def unplace(state):
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_process_local_data(sh, np.asarray(x[0]), x.shape[1:]),
        state, s.shardings)

  def zeros(size, with_mask):
    lo, hi = rows(size)
    spec = s.data.batch_spec(hi - lo, with_mask)
    return per_device({k: np.zeros(v.shape, v.dtype) for k, v in spec.items()})

  t0 = time.perf_counter()
  placed = place(state)
  train_c = eval_c = None
  with precision.tracing(s.policy):
    if train_step is not None:
      p_train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=0)
      train_c = p_train.lower(placed, zeros(s.config.data.batch_size, False)).compile()
    if eval_step is not None:
      p_eval = jax.pmap(lambda st, b: jax.lax.psum(eval_step(st, b), AXIS), axis_name=AXIS)
      eval_c = p_eval.lower(placed, zeros(s.config.data.eval_batch_size, True)).compile()
  compile_s = time.perf_counter() - t0
  del placed

  def train(state, local):
    state, sums = train_c(state, per_device(local))
    return state, first(sums)

  def evaluate(state, batch):
    lo, hi = rows(len(batch['mask']))
    return first(eval_c(state, per_device({k: v[lo:hi] for k, v in batch.items()})))

  return Steps(train, evaluate, place, unplace, rows, compile_s)

