"""Training: the state, the jitted train and eval steps, and the loop (`train_and_evaluate`).

The state is created already laid out on the mesh: `jax.eval_shape(init)` gives the logical
axis names of every leaf, the rules turn them into shardings, and `jit(init, out_shardings)`
builds it in place. `train_step` is a pure function, jitted once with the state donated.
Shapes: B batch, K outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from jaxbig import checkpoint, data as data_lib, faults, kernels as kernels_lib, losses
from jaxbig import models, optim
from jaxbig import metrics as metrics_lib, parallel, precision, prng, sharding
from jaxbig import workdir as workdir_lib
from jaxbig.config import ConfigError
from jaxbig.models import init as inits


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed."""
  step: jax.Array
  params: Any
  batch_stats: Any  # BatchNorm running statistics; {} for models without them.
  opt_state: Any
  rng: jax.Array
  loss_scale: Any  # precision.LossScale under loss scaling (fp16); {} otherwise.
  skips: Any  # faults.Skips: steps skipped because a value was not finite.


@dataclasses.dataclass
class Setup:
  """What a run is built from, all validated before anything is compiled or written."""
  config: Any
  data: data_lib.Data
  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_fn: Callable
  abstract_boxed: Any  # TrainState of ShapeDtypeStructs with logical-axis boxes.
  shardings: Any  # TrainState of NamedShardings.
  rules: tuple  # Logical axis name -> mesh axes (`sharding.rules`).
  mode: str  # parallel.mode: jit or pmap.
  policy: precision.Policy  # Compute dtype, matmul precision and low-precision matmuls.
  kernels: kernels_lib.Kernels  # Which fast paths the steps use (jaxbig/kernels).
  scaling: precision.LossScaling | None  # Loss scaling (fp16), or None.
  skip_limit: int  # Non-finite steps in a row that a run may skip (0: none).


def _init(rng: jax.Array, *, model: nn.Module, tx, input_shape: tuple, tokens: bool,
          scaling: precision.LossScaling | None, unrolled_bits: bool) -> TrainState:
  # The train step's key type: Threefry's bits, compiled faster on CPUs (see prng.py).
  key = prng.wrap(rng, unrolled_bits)
  params_key, dropout_key, key = jax.random.split(key, 3)
  x = jnp.zeros((1, *input_shape), jnp.int32 if tokens else jnp.float32)
  variables = model.init({'params': params_key, 'dropout': dropout_key, 'sample': dropout_key},
                         x, train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(key),
                    loss_scale=scaling.init_state() if scaling else {},
                    skips=faults.init_skips())


def class_weights(train_cfg, labels: np.ndarray, num_classes: int) -> jnp.ndarray | None:
  """Per-class loss weights: declared, 'balanced' from label frequencies, or None."""
  if train_cfg.balance_classes:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return jnp.asarray(len(labels) / (num_classes * np.maximum(counts, 1)), jnp.float32)
  if train_cfg.class_weights:
    if len(train_cfg.class_weights) != num_classes:
      raise ConfigError(f'train.class_weights has {len(train_cfg.class_weights)} entries but the '
                        f'data has {num_classes} classes')
    return jnp.asarray(train_cfg.class_weights, jnp.float32)
  return None


def setup(config, devices=None) -> Setup:
  """Builds data, mesh, model, optimizer and the abstract state; raises ConfigError on bad input."""
  data = data_lib.build(config.data, config.seed)
  _check_finite_data(config, data)
  meta = data.meta
  losses.check(config.train, meta.task, config.data.name, config.model.name)
  mode = parallel.mode(config)
  policy = precision.get(config)
  scaling = precision.loss_scaling(config, policy)
  skip_limit = faults.skip_limit(config, scaling is not None)
  rules = sharding.rules(config.mesh)
  mesh = sharding.make_mesh(config.mesh, devices)
  kernels = kernels_lib.select(config.kernels, mesh.devices.flat[0].platform)
  sharding.check_batch(config.data.batch_size // config.train.accum_steps, mesh,
                       'data.batch_size / train.accum_steps')
  sharding.check_batch(config.data.eval_batch_size, mesh, 'data.eval_batch_size')
  _check_host_batches(config, data)
  try:
    model = models.build(config.model, meta, policy.compute_dtype, kernels)
    tx, schedule = optim.build(config.opt, config.train.steps)
  except ValueError as e:  # The builders name the field; make it a one-line config error.
    raise ConfigError(str(e)) from None
  if mode == 'pmap' and models.has_batch_stats(config.model.name):
    model = model.clone(axis_name=parallel.AXIS)  # BatchNorm statistics over all devices.
  model = precision.quantize(model, policy)  # fp8, int8: low-precision matmuls.
  weights = None
  if meta.task == 'classification' and config.train.loss == 'xent':
    weights = class_weights(config.train, data.splits['train'][1], meta.num_classes)
  loss_fn = losses.build(config.train, weights)
  init = functools.partial(_init, model=model, tx=tx, input_shape=meta.input_shape,
                           tokens=meta.vocab_size > 0, scaling=scaling,
                           unrolled_bits=kernels.random_bits == 'unrolled')
  try:
    with inits.compiling_for(mesh):  # As the steps will be traced.
      abstract_boxed = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
  except (TypeError, ValueError) as e:
    first = str(e).splitlines()[0]
    if re.match(r'(model|data|opt|train)\.', first):  # Already names its field.
      raise ConfigError(first) from None
    # The model cannot take this data's shape (e.g. a CNN on flat features): say so in a line.
    raise ConfigError(f'model.name={config.model.name} cannot take inputs of shape '
                      f'{meta.input_shape} from data.name={config.data.name}: {first}') from None
  shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  sharding.check_divisible(abstract_boxed, shardings)
  return Setup(config, data, mesh, model, tx, schedule, loss_fn, abstract_boxed, shardings,
               rules, mode, policy, kernels, scaling, skip_limit)


def host_memory_bytes() -> int:
  """This machine's physical memory."""
  return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def device_memory_bytes(device) -> int:
  """What one device can hold: its allocator's limit, or on CPUs the host's memory."""
  stats = device.memory_stats() or {}
  return int(stats.get('bytes_limit') or host_memory_bytes())


def _gib(n: float) -> str:
  return f'{n / 2**30:.3g} GiB'


def _check_host_batches(config, data) -> None:
  """A training or evaluation batch must fit in half the host's memory: the host builds it
  whole (padding included) before it goes to the devices."""
  limit = host_memory_bytes() // 2
  for field, size, masked in (('data.batch_size', config.data.batch_size, False),
                              ('data.eval_batch_size', config.data.eval_batch_size, True)):
    spec = data.batch_spec(size, with_mask=masked)
    need = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in spec.values())
    if need > limit:
      raise ConfigError(f'{field}={size}: one batch takes {_gib(need)} of host memory, more '
                        f'than half of the {_gib(2 * limit)} this machine has')


def check_step_memory(s: 'Setup', steps: parallel.Steps) -> None:
  """The compiled steps must fit on a device, by XLA's memory analysis (jit only)."""
  local = [d for d in s.mesh.devices.flat if d.process_index == jax.process_index()]
  limit = device_memory_bytes(local[0])
  c = s.config
  for field, value, need in (('data.batch_size', c.data.batch_size, steps.train_bytes),
                             ('data.eval_batch_size', c.data.eval_batch_size, steps.eval_bytes)):
    if need is not None and need > limit:
      raise ConfigError(f'{field}={value}: the compiled step needs {_gib(need)} per device, '
                        f'more than the {_gib(limit)} a device has; use a smaller batch, '
                        'train.accum_steps or more devices')


def _check_finite_data(config, data) -> None:
  """Float inputs and targets must be finite: a NaN in the data would poison every epoch."""
  for split, arrays in getattr(data, 'splits', {}).items():
    for name, a in zip(('x', 'y'), arrays if isinstance(arrays, tuple) else ()):  # Not text.
      a = np.asarray(a)
      if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        source = f'data.path: {config.data.path}' if config.data.name == 'npz' else 'data.name'
        raise ConfigError(f'{source}: {name} of the {split} split holds non-finite values in '
                          f'{len(bad)} examples (the first: {bad[0]}); clean the data')


def init_fn(s: Setup) -> Callable[[jax.Array], TrainState]:
  """The boxed fresh state as a function of the seed's Threefry key data."""
  return functools.partial(_init, model=s.model, tx=s.tx, input_shape=s.data.meta.input_shape,
                           tokens=s.data.meta.vocab_size > 0, scaling=s.scaling,
                           unrolled_bits=s.kernels.random_bits == 'unrolled')


def init_state(s: Setup) -> TrainState:
  """A fresh state, each leaf created directly with its sharding."""
  init = init_fn(s)
  init_unboxed = lambda rng: nn.meta.unbox(init(rng))
  rng = jax.random.key_data(jax.random.key(s.config.seed))
  state = jax.jit(init_unboxed, out_shardings=s.shardings)(rng)
  # Compiling the init without LLVM's optimisations (xla_backend_optimization_level=0) saved
  # seconds on CPU, but XLA:CPU (jax 0.10.2) then hung now and then while running it or the
  # first steps: 3 of 4 processes within 12 inits of seq_digits:gru,smoke, none at the default.
  return jax.block_until_ready(state)


def restore(s: Setup, ckpts: checkpoint.Checkpoints, step: int) -> tuple[TrainState, dict, dict]:
  """(state, data iterator state, meta) of checkpoint `step`, laid out on this run's mesh
  (whatever the mesh that saved it); checkpoints from before the skip counts start at 0."""
  fresh = {'skips': jax.device_put(faults.init_skips(), s.shardings.skips)}
  return ckpts.restore(step, abstract_state(s), fresh)


def num_params(s: Setup) -> int:
  """Parameters of the model (from the abstract state: nothing is allocated)."""
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(s.abstract_boxed).params))


def abstract_state(s: Setup) -> TrainState:
  """The unboxed state's shapes and dtypes with their shardings (a restore target)."""
  return checkpoint.abstract_like(nn.meta.unbox(s.abstract_boxed), s.shardings)


def _forward(model, params, batch_stats, x, *, train: bool, rng=None):
  """Model outputs and (in training) the updated BatchNorm statistics.

  `rng` drives dropout and a VAE's latent samples; without it (evaluation) samples come
  from a fixed key, so evaluation is deterministic.
  """
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  if rng is None:
    rngs = {'sample': jax.random.key(0)}
  else:
    rngs = {'dropout': rng, 'sample': jax.random.fold_in(rng, 1)}
  if train and batch_stats:
    out, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])
    return out, updates['batch_stats']
  return model.apply(variables, x, train=train, rngs=rngs), batch_stats


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx, loss_fn: Callable,
               accum_steps: int, axis_name: str | None = None,
               scaling: precision.LossScaling | None = None,
               kernels: kernels_lib.Kernels = kernels_lib.REFERENCE) -> tuple[TrainState, dict]:
  """One optimizer update; with `accum_steps` > 1 the batch is split into micro-batches.

  Under `jax.jit` the batch is global and the mean is over all of it. Under `jax.pmap`
  (`axis_name`) each device holds a slice: it divides its loss sum by the global count and
  the gradients and metric sums are summed over devices, which gives the same update.
  Under loss `scaling` the loss is multiplied by the scale before differentiation and the
  gradients divided by it after. A step whose loss or gradients are not finite (an fp16
  overflow, a NaN in a batch, a diverging model) keeps the old parameters, optimizer state
  and BatchNorm statistics bit for bit, changes the loss scale, and counts as skipped in
  `state.skips` (see jaxbig/faults.py). `kernels` picks the random bits' and the guard's
  form (the same values; the guard's two forms round differently in the last bits: over
  800 steps cnn_digits' test accuracy was 0.9889 with the select, 0.9944 with the branch).
  """
  scale = state.loss_scale.scale if scaling else None
  rng = jax.random.fold_in(prng.wrap(state.rng, kernels.random_bits == 'unrolled'),
                           state.step)
  total = lambda x: x
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # Own dropout per device.
    total = lambda x: jax.lax.psum(x, axis_name)

  def loss_and_sums(params, batch_stats, micro, micro_rng):
    micro = {**micro, 'mask': jnp.ones(micro['x'].shape[0], jnp.float32)}
    out, batch_stats = _forward(model, params, batch_stats, micro['x'], train=True,
                                rng=micro_rng)
    loss_sum, sums = loss_fn(out, micro)
    # Mean per counted example, or per position for a language model.
    loss = loss_sum / total(sums['count'])
    return (loss if scale is None else loss * scale), (sums, batch_stats)

  grad_fn = jax.value_and_grad(loss_and_sums, has_aux=True)
  if accum_steps == 1:
    (_, (sums, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
  else:
    # Micro-batch i takes every accum_steps-th example: each device keeps its own rows.
    micro_batches = jax.tree.map(
        lambda a: a.reshape(-1, accum_steps, *a.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, inputs):
      grads_acc, batch_stats, sums_acc = carry
      micro, i = inputs
      (_, (sums, batch_stats)), grads = grad_fn(state.params, batch_stats, micro,
                                                jax.random.fold_in(rng, i))
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (add(grads_acc, grads), batch_stats, add(sums_acc, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sums0 = jax.eval_shape(lambda: grad_fn(state.params, state.batch_stats,
                                           jax.tree.map(lambda a: a[0], micro_batches),
                                           rng)[0][1][0])
    sums0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums0)
    (grads, batch_stats, sums), _ = jax.lax.scan(
        body, (zeros, state.batch_stats, sums0), (micro_batches, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
  if axis_name is not None:
    grads, sums = total(grads), total(sums)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  if scaling is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
  # One rule for every precision: a step whose loss or gradients are not finite keeps the old
  # values. The gradients' norm (needed anyway) is not finite if any element is not. Against
  # no check, CPU steps of cnn_digits / mlp_diabetes took 3-10% / 19-22% longer with this
  # test, about 12% / 40% checking every gradient element, 27% / 57% adding the new values.
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  old = (state.params, state.batch_stats, state.opt_state)

  def update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), batch_stats, opt_state

  if kernels.guard == 'branch':  # No copy of the optimizer state on XLA:CPU.
    kept = jax.lax.cond(finite, update, lambda: old)
  else:
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), update(), old)
  skips = faults.count(state.skips, finite)
  new_state = state.replace(step=state.step + 1, params=kept[0], batch_stats=kept[1],
                            opt_state=kept[2], skips=skips)
  metrics = {'skipped': (~finite).astype(jnp.float32), 'skip_run': skips.run}
  if scaling is not None:
    new_state = new_state.replace(loss_scale=scaling.update(state.loss_scale, finite))
    metrics['loss_scale'] = scale
  return new_state, {**sums, **metrics, 'grad_norm': grad_norm}


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, loss_fn: Callable) -> dict:
  """Metric sums of one (padded, masked) evaluation batch."""
  out, _ = _forward(model, state.params, state.batch_stats, batch['x'], train=False)
  return loss_fn(out, batch)[1]


def _train_fn(s: Setup, axis_name: str | None = None) -> Callable:
  return functools.partial(train_step, model=s.model, tx=s.tx, loss_fn=s.loss_fn,
                           accum_steps=s.config.train.accum_steps, axis_name=axis_name,
                           scaling=s.scaling, kernels=s.kernels)


def jit_train_step(s: Setup):
  """The train step under `jax.jit` with the state's and the batch's shardings (state donated)."""
  return jax.jit(
      _train_fn(s), in_shardings=(s.shardings, sharding.batch_sharding(s.mesh)),
      out_shardings=(s.shardings, sharding.replicated(s.mesh)), donate_argnums=0)


def lower_train_step(s: Setup):
  """The lowered (not yet compiled) jit train step for the config's global batch."""
  batch = s.data.batch_spec(s.config.data.batch_size, with_mask=False)
  with parallel.tracing(s):
    return jit_train_step(s).lower(abstract_state(s), batch)


def _lower_eval_step(s: Setup, evaluate_fn: Callable):
  """The lowered jit eval step for the padded eval batch."""
  eval_jit = jax.jit(evaluate_fn, in_shardings=(s.shardings, sharding.batch_sharding(s.mesh)),
                     out_shardings=sharding.replicated(s.mesh))
  batch = s.data.batch_spec(s.config.data.eval_batch_size, with_mask=True)
  with parallel.tracing(s):
    return eval_jit.lower(abstract_state(s), batch)


def compile_steps(s: Setup, state: TrainState, with_train: bool = True,
                  with_eval: bool = True) -> parallel.Steps:
  """Compiles the train and eval steps (those asked for) once for `s.mode`."""
  evaluate_fn = functools.partial(eval_step, model=s.model, loss_fn=s.loss_fn)
  if s.mode == 'pmap':
    return parallel.pmap_steps(s, state, _train_fn(s, parallel.AXIS) if with_train else None,
                               evaluate_fn if with_eval else None)
  t0 = time.perf_counter()
  train_c = lower_train_step(s).compile() if with_train else None
  eval_c = _lower_eval_step(s, evaluate_fn).compile() if with_eval else None
  return parallel.jit_steps(s, train_c, eval_c, time.perf_counter() - t0)


def evaluate(s: Setup, steps: parallel.Steps, state: TrainState, split: str) -> dict[str, float]:
  """Metrics of `split` (one host transfer at the end)."""
  if s.data.meta.sizes.get(split, 0) == 0:
    return {}
  sums = [steps.eval(state, b) for b in s.data.eval_batches(split)]
  totals = {k: float(sum(np.asarray(x[k]) for x in jax.device_get(sums))) for k in sums[0]}
  out = losses.finalize(totals, s.data.meta.task, s.data.meta.y_std)
  if s.data.meta.task == 'lm':
    out['unigram_bits_per_byte'] = s.data.unigram_bits_per_byte(split)
  if s.data.meta.task == 'regression':
    out['mse_vs_mean'] = out['mse'] / s.data.baseline_mse(split)
    out['mse_vs_linear'] = out['mse'] / s.data.baseline_linear_mse(split)
  return out


_write_json = workdir_lib.write_json  # For jaxbig/quantize.py; the workdir's files live there.


def _train_scalars(fetched: list[dict], task: str) -> dict[str, float]:
  """Means over a log interval of the per-step metric sums (fetched from the device), over
  the steps that were not skipped, and the number skipped."""
  kept = [m for m in fetched if not float(np.asarray(m['skipped']))]
  out = {'train/loss': float('nan')}  # Every step of the interval skipped.
  if kept:
    totals = {k: float(sum(np.asarray(m[k]) for m in kept)) for k in kept[0]}
    out = {f'train/{k}': v for k, v in losses.finalize(totals, task).items()
           if k in ('loss', 'accuracy', 'bits_per_byte', 'elbo')}
    out['grad_norm'] = totals['grad_norm'] / len(kept)
  out['train/skipped_steps'] = float(len(fetched) - len(kept))
  if 'loss_scale' in fetched[-1]:  # Loss scaling: the interval's last scale.
    out['loss_scale'] = float(np.asarray(fetched[-1]['loss_scale']))
  return out


def run_fingerprint(s: Setup) -> dict:
  """What every checkpoint of this run stores and a resumed run must match."""
  return checkpoint.fingerprint(workdir_lib.fingerprint_config(s.config),
                                nn.meta.unbox(s.abstract_boxed), s.data.identity())


def resume_point(s: Setup, workdir: str, ckpts: checkpoint.Checkpoints
                 ) -> tuple[int | None, list[int]]:
  """(the step a run in `workdir` continues from, None for a fresh start; the corrupt steps
  newer than it). Refuses, writing nothing, a run that cannot continue exactly from there:
  another config, a checkpoint past train.steps, other data."""
  workdir_lib.check_config(workdir, s.config)
  start, corrupt = ckpts.find_newest()
  if start is not None:
    if start > s.config.train.steps:
      raise ConfigError(f'train.steps={s.config.train.steps}: {workdir} holds a checkpoint of '
                        f'step {start}, past it; give train.steps >= {start} or a new --workdir')
    ckpts.check_fingerprint(start, data_lib.describe_change)
  ahead = [n for n in ckpts.foreign_steps() if (start or 0) < n <= s.config.train.steps]
  if ahead:  # Orbax would refuse to save into it, mid-run.
    raise ConfigError(f'{ckpts.directory}/{ahead[0]}: a folder jaxbig did not write, named like '
                      'a step this run will save; move it away')
  return start, corrupt


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       devices=None) -> dict | None:
  """Trains (resuming from the newest intact checkpoint in `workdir`), evaluates, writes the
  summary and returns it.

  The run holds the workdir (`workdir.owned`) and checks everything before it writes a file:
  a refused run leaves the workdir as it was. A run that finished its train.steps already
  returns its summary (with 'finished_already') and does nothing else. On SIGTERM or a
  first SIGINT (see jaxbig/faults.py) it saves the step it is at and returns
  {'preempted': True, 'step': ..., 'signal': ...} without evaluating. More non-finite steps
  in a row than `train.max_consecutive_skips` raise faults.NonFiniteError. `stop_after` ends
  the loop early at that step without the final save (an interruption, for tests) and
  returns None.
  """
  t_start = time.perf_counter()
  with faults.Preemption() as preemption:  # From here on a SIGTERM is noted, not fatal.
    s = setup(config, devices)  # Validates everything before the workdir is touched.
    with workdir_lib.owned(workdir):
      ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                     config.train.keep_checkpoints, fingerprint=run_fingerprint(s))
      try:
        start, corrupt = resume_point(s, workdir, ckpts)
        done = workdir_lib.finished(workdir, start) if start == config.train.steps else None
        if done is not None:
          if jax.process_index() == 0:
            print(f'jaxbig: {workdir} has finished its {start} steps already; nothing to do '
                  '(a larger train.steps trains on)', file=sys.stderr, flush=True)
          return {**done, 'finished_already': True}
        if start is None:
          state, iter_state = init_state(s), None
        else:
          state, iter_state, _ = restore(s, ckpts, start)
        steps = compile_steps(s, state)
        check_step_memory(s, steps)
        # Every check passed: from here on the run writes into the workdir.
        workdir_lib.write_config(workdir, config)
        ckpts.open_for_writing(corrupt)
        workdir_lib.truncate_metrics(workdir, start or 0, final=start == config.train.steps)
        return _train(s, workdir, ckpts, preemption, stop_after, t_start, start, state,
                      iter_state, steps)
      finally:
        ckpts.close()


class _Log:
  """Per-step metrics on the device, written one step late: a log step's interval is
  fetched after the next step is dispatched (`flush`), so the host never waits for the
  device at a log step. The checks of non-finite steps run on what is fetched."""

  def __init__(self, s: Setup, writer: metrics_lib.Writer, progress: metrics_lib.Progress):
    self.s, self.writer, self.progress = s, writer, progress
    self.pending = []  # Metrics of the steps after the newest closed interval.
    self.closed = None  # (last step, its metrics): an interval waiting to be fetched.
    self.t_last = time.perf_counter()  # When the previous interval was fetched.
    self.scalars = {}  # The newest interval's scalars (the summary's train values).

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
    out = _train_scalars(fetched, self.s.data.meta.task)
    now = time.perf_counter()
    out['steps_per_s'] = len(fetched) / (now - self.t_last)
    out['lr'] = float(self.s.schedule(step - 1))
    self.writer.write(step, out)  # Also when the check below stops the run: the log shows why.
    self.progress.update(step, f"loss {out['train/loss']:.4f}", force=True)
    faults.check_runs([m['skip_run'] for m in fetched], step - len(fetched) + 1,
                      self.s.skip_limit, saved)
    self.t_last, self.scalars = now, out

  def paused(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the training rate."""
    self.t_last += seconds

  def check_unlogged(self, step: int, saved: int | None) -> None:
    """Raises if the steps not yet in an interval passed the skip limit (before a save)."""
    runs = jax.device_get([m['skip_run'] for m in self.pending])
    faults.check_runs(runs, step - len(self.pending) + 1, self.s.skip_limit, saved)


_all_finite = jax.jit(precision.all_finite)


def _save(s: Setup, steps: parallel.Steps, ckpts: checkpoint.Checkpoints, log: _Log,
          state: TrainState, train_iter, step: int, saved: int | None) -> int:
  """Starts the save of `step` (after the skip checks of every step before it); returns it."""
  log.flush(saved)
  log.check_unlogged(step, saved)
  mesh_state = steps.unplace(state)
  if not bool(_all_finite(mesh_state)):  # Never reached while train_step guards each step.
    raise faults.NonFiniteError(f'train: refusing to save step {step}: the state holds '
                                'non-finite values')
  ckpts.save(step, mesh_state, data_lib.save_iter_state(train_iter), s.data.meta.to_json())
  return step


def _train(s: Setup, workdir: str, ckpts: checkpoint.Checkpoints,
           preemption: faults.Preemption, stop_after: int | None, t_start: float,
           start: int | None, state: TrainState, iter_state: dict | None,
           steps: parallel.Steps) -> dict | None:
  config, cfg = s.config, s.config.train
  # Each process reads only the rows of a batch that its devices hold.
  train_iter = s.data.train_iter(steps.rows(config.data.batch_size))
  if start is not None:
    train_iter.set_state(iter_state)
  saved, start = start, start or 0
  state = steps.place(state)
  writer = metrics_lib.Writer(workdir)
  progress = metrics_lib.Progress(cfg.steps, start)
  log = _Log(s, writer, progress)
  eval_s, preempted = 0.0, None
  t_loop = time.perf_counter()
  last = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
  profile = metrics_lib.Profile(workdir, cfg.profile_steps, cfg.profile_start)
  try:
    for step in range(start + 1, last + 1):
      batch = next(train_iter)
      with profile.step(step):
        state, step_metrics = steps.train(state, batch)
      profile.after(step, step_metrics)
      log.flush(saved)  # The previous log step's, while this step runs.
      log.add(step, step_metrics, step % cfg.log_every == 0 or step == cfg.steps)
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
        t_eval = time.perf_counter()
        log.flush(saved)  # Evaluating waits for the device anyway; rows stay in step order.
        writer.write(step, {f'eval/{k}': v for k, v in evaluate(s, steps, state, 'val').items()})
        eval_s += time.perf_counter() - t_eval
        log.paused(time.perf_counter() - t_eval)
      stop = preemption.reached(step)  # Every process, every step.
      if stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != cfg.steps):
        saved = _save(s, steps, ckpts, log, state, train_iter, step, saved)
      if stop:
        if log.pending:  # The partial interval, so that a resumed run misses no step.
          log.add(step, log.pending.pop(), True)
        log.flush(saved)
        preempted = step
        break
    log.flush(saved)
  except BaseException:
    writer.close()
    raise
  finally:
    profile.close()
    progress.close()
  if preempted is not None or (stop_after is not None and last < cfg.steps):
    writer.close()
  if preempted is not None:
    ckpts.wait()
    who = f'process {jax.process_index()}: ' if jax.process_count() > 1 else ''
    how = 'interrupted' if preemption.signal == 'SIGINT' else 'preempted'
    print(f'jaxbig: {who}{how} ({preemption.signal}): saved step {preempted}; the same '
          'command resumes from it', file=sys.stderr, flush=True)
    return {'preempted': True, 'step': preempted, 'resumed_from': start or None,
            'signal': preemption.signal}
  if stop_after is not None and last < cfg.steps:
    return None
  train_s = time.perf_counter() - t_loop - eval_s
  if saved != cfg.steps:
    saved = _save(s, steps, ckpts, log, state, train_iter, cfg.steps, saved)
  val = evaluate(s, steps, state, 'val')
  test = evaluate(s, steps, state, 'test')
  writer.write(cfg.steps, {**{f'eval/{k}': v for k, v in val.items()},
                           **{f'test/{k}': v for k, v in test.items()}})
  ckpts.wait()
  writer.close()
  scalars = log.scalars
  if not scalars:  # Nothing left to train: report the last logged training metrics.
    scalars = workdir_lib.last_logged(workdir)
  devices = s.mesh.devices.flatten()
  summary = {
      'step': cfg.steps,
      'train_loss': scalars.get('train/loss'),
      'train_accuracy': scalars.get('train/accuracy'),
      'eval': test,
      'val': val,
      'wall_s': time.perf_counter() - t_start,
      'compile_s': steps.compile_s,
      # XLA's memory analysis of the compiled train step (jit): state, batch, temporaries.
      'train_step_bytes': steps.train_bytes,
      'steps_per_s': (cfg.steps - start) / train_s if cfg.steps > start else None,
      'resumed_from': start or None,
      'num_params': num_params(s),
      'precision': s.policy.name,
      # One device's copy: a scalar under jit, a one-element slice under pmap.
      'skipped_steps': int(np.ravel(state.skips.total.addressable_data(0))[0]),
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
  }
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary
