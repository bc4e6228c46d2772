"""Training: the state, the jitted train and eval steps, and the loop (`train_and_evaluate`).

The state is created already laid out on the mesh: `jax.eval_shape(init)` gives the logical
axis names of every leaf, the rules turn them into shardings, and `jit(init, out_shardings)`
builds it in place. `train_step` is a pure function, jitted once with the state donated.
Shapes: B batch, K outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
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
from jaxbig import memory, metrics as metrics_lib, parallel, precision, sharding
from jaxbig import pretrained, workdir as workdir_lib
from jaxbig.config import ConfigError
from jaxbig.kernels import threefry
from jaxbig import matmul


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

  @property
  def init(self) -> Callable[[jax.Array], TrainState]:
    """The boxed fresh state as a function of the seed's Threefry key data."""
    return _init_fn(self.model, self.tx, self.data.meta, self.scaling, self.kernels)


def setup(config, devices=None) -> Setup:
  """Builds a run from its config in named steps, each raising ConfigError where it checks a
  value; nothing is compiled or written here."""
  data = _data(config)
  policy = precision.get(config)
  scaling = precision.loss_scaling(config, policy)
  skip_limit = faults.skip_limit(config, scaling is not None)
  mesh, rules, mode = _mesh(config, devices, data)
  kernels = kernels_lib.select(config.kernels, mesh.devices.flat[0].platform,
                               quantized=policy.fwd_qtype is not None)
  model = _model(config, data.meta, policy, kernels, mode, mesh.devices.flat[0].platform,
                 mesh.shape['context'])
  tx, schedule = optim.build(config.opt, config.train.steps)
  if config.get('lora') is not None and config.lora.get('rank', 0):
    tx = optim.adapters_only(tx)
  loss_fn = _loss(config, data)
  init = _init_fn(model, tx, data.meta, scaling, kernels)
  with matmul.compiling_for(mesh):  # As the steps will be traced.
    abstract_boxed = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
  shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  sharding.check_divisible(abstract_boxed, shardings)
  return Setup(config, data, mesh, model, tx, schedule, loss_fn, abstract_boxed, shardings,
               rules, mode, policy, kernels, scaling, skip_limit)


def _data(config) -> data_lib.Data:
  """The dataset, with finite float values, and a task the loss can train."""
  data = data_lib.build(config.data, config.seed)
  data_lib.check_finite(config.data, data)
  losses.check(config.train, data.meta.task, config.data.name, config.model.name)
  return data


def _mesh(config, devices, data) -> tuple[jax.sharding.Mesh, tuple, str]:
  """(the device mesh, its logical-axis rules, jit or pmap); the batches must split over it
  and fit in host memory."""
  mode = parallel.mode(config)  # Before the mesh: pmap takes a data-only mesh.
  rules = sharding.rules(config.mesh)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.data.batch_size // config.train.accum_steps, mesh,
                       'data.batch_size / train.accum_steps')
  sharding.check_batch(config.data.eval_batch_size, mesh, 'data.eval_batch_size')
  memory.check_host_batches(config, data)
  return mesh, rules, mode


def _model(config, meta, policy: precision.Policy, kernels: kernels_lib.Kernels,
           mode: str, platform: str, context: int = 1) -> nn.Module:
  """The model in the policy's compute dtype and low-precision matmuls."""
  model = models.build(config.model, meta, policy.compute_dtype, kernels, platform, context,
                       config.get('lora'))
  if mode == 'pmap' and models.has_batch_stats(config.model.name):
    model = model.clone(axis_name=parallel.AXIS)  # BatchNorm statistics over all devices.
  return precision.quantize(model, policy)


def _loss(config, data) -> Callable:
  """The loss and metric sums, with class weights where the config asks for them."""
  weights = None
  if data.meta.task == 'classification' and config.train.loss == 'xent':
    weights = losses.class_weights(config.train, data.train_labels, data.meta.num_classes)
  return losses.build(config.train, weights, config.model.get('logits_chunk', 0))


def _init_fn(model: nn.Module, tx, meta, scaling: precision.LossScaling | None,
             kernels: kernels_lib.Kernels) -> Callable[[jax.Array], TrainState]:
  return functools.partial(_init, model=model, tx=tx, input_shape=meta.input_shape,
                           tokens=meta.vocab_size > 0, scaling=scaling,
                           unrolled_bits=kernels.random_bits == 'unrolled')


def _init(rng: jax.Array, *, model: nn.Module, tx, input_shape: tuple, tokens: bool,
          scaling: precision.LossScaling | None, unrolled_bits: bool) -> TrainState:
  """The boxed fresh state: parameters, optimizer state, the key the steps fold in (drawn
  by the policy's Threefry implementation), loss scale and skip counts."""
  key = threefry.wrap(rng, unrolled_bits)
  params_key, dropout_key, key = jax.random.split(key, 3)
  x = jnp.zeros((1, *input_shape), jnp.int32 if tokens else jnp.float32)
  variables = model.init({'params': params_key, 'dropout': dropout_key, 'sample': dropout_key},
                         x, train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=optim.unbox_masked(tx.init(params)),
                    rng=jax.random.key_data(key),
                    loss_scale=scaling.init_state() if scaling else {},
                    skips=faults.init_skips())


def init_state(s: Setup) -> TrainState:
  """A fresh state, each leaf created directly with its sharding."""
  init_unboxed = lambda rng: nn.meta.unbox(s.init(rng))
  rng = jax.random.key_data(jax.random.key(s.config.seed))
  state = jax.jit(init_unboxed, out_shardings=s.shardings)(rng)
  return jax.block_until_ready(state)


def restore(s: Setup, ckpts: checkpoint.Checkpoints, step: int, reader: bool = False
            ) -> tuple[TrainState, dict, dict]:
  """(state, data iterator state, meta) of checkpoint `step`, laid out on this run's mesh
  (whatever the mesh that saved it); checkpoints from before the skip counts start at 0.

  A `reader` (eval, generate, export) gets no optimizer state (None). A step saved without
  one (import-hf's step 0) resumes with a fresh one. A LoRA run's steps hold the adapters,
  and the base parameters are read again from its `train.init_from`."""
  fresh = {'skips': jax.device_put(faults.init_skips(), s.shardings.skips)}
  abstract = abstract_state(s)
  base = base_source(s)
  if base and any(pretrained.LORA not in p for p in ckpts.saved_params(step)):
    base = ''  # Saved with its base (by a jaxbig before adapter-only checkpoints).
  base_step = None
  if base:
    pretrained.check_source(s, base)  # One line where it is gone or another model.
    abstract = abstract.replace(params=pretrained.adapters(abstract.params))
    recorded = ckpts.saved_fingerprint(step).get('base')
    base_step = (recorded or {}).get('step')
    if recorded is not None and not pretrained.same_base(
        recorded, pretrained.identity(base, base_step)):
      raise ConfigError(f'train.init_from: {base} is not the base that LoRA checkpoint step '
                        f'{step} was trained on (its weights or steps changed since); the '
                        'checkpoint holds the adapters only: restore that base')
  with_opt = not reader and 'opt_state' in ckpts.saved_fields(step)
  state, data_state, meta = ckpts.restore(step, abstract, fresh,
                                          skip=() if with_opt else ('opt_state',))
  if base:
    state = state.replace(params=pretrained.load_params(s, base, state.params,
                                                        fresh_wins=True, step=base_step))
  if not reader and not with_opt:
    state = state.replace(opt_state=init_opt_state(s, state.params))
  return state, data_state, meta


def base_source(s: Setup) -> str:
  """The base model that a LoRA run's checkpoints refer to instead of holding it (its
  `train.init_from`); '' for other runs, whose checkpoints hold every parameter."""
  lora = s.config.get('lora')
  if lora is None or not lora.get('rank', 0):
    return ''
  return s.config.train.get('init_from', '')


def checkpointed(s: Setup, state: TrainState) -> TrainState:
  """What a checkpoint of the run holds: the state, less a LoRA run's frozen base."""
  if base_source(s):
    return state.replace(params=pretrained.adapters(state.params))
  return state


def init_opt_state(s: Setup, params) -> Any:
  """A fresh optimizer state for `params`, laid out with the run's shardings."""
  init = lambda p: optim.unbox_masked(s.tx.init(p))
  return jax.jit(init, out_shardings=s.shardings.opt_state)(params)


def params_state(s: Setup, params) -> TrainState:
  """A state holding `params` and no optimizer state (what `jaxbig import-hf` saves at step
  0); the other leaves are the seed's, computed without materialising the initial
  parameters (XLA drops what is not returned)."""
  def small(rng):
    return nn.meta.unbox(s.init(rng)).replace(params={}, opt_state=None)
  out_shardings = s.shardings.replace(params={}, opt_state=None)
  rng = jax.random.key_data(jax.random.key(s.config.seed))
  return jax.jit(small, out_shardings=out_shardings)(rng).replace(params=params)


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
  gradients divided by it after. A step whose loss or gradients are not finite keeps the
  old parameters, optimizer state and BatchNorm statistics bit for bit, changes the loss
  scale, and counts as skipped in `state.skips` (jaxbig/faults.py). `kernels` picks the
  random bits' and the guard's form.
  """
  scale = state.loss_scale.scale if scaling else None
  rng = jax.random.fold_in(threefry.wrap(state.rng, kernels.random_bits == 'unrolled'),
                           state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # Own dropout per device.
  loss = functools.partial(_scaled_loss, model=model, loss_fn=loss_fn, axis_name=axis_name,
                           scale=scale)
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  grads, batch_stats, sums = _accumulate(grad_fn, state, batch, rng, accum_steps)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  if scaling is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
  # The gradients' norm (needed anyway) is not finite if any element is not.
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  params, batch_stats, opt_state = _update_if_finite(tx, state, grads, batch_stats, finite,
                                                     kernels.guard)
  skips = faults.count(state.skips, finite)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, skips=skips)
  metrics = {'skipped': (~finite).astype(jnp.float32), 'skip_run': skips.run}
  if 'bad' in batch:  # Rows standing in for skipped images (image folders), all processes'.
    bad = jnp.sum(batch['bad'])
    metrics['bad_images'] = bad if axis_name is None else jax.lax.psum(bad, axis_name)
  if scaling is not None:
    new_state = new_state.replace(loss_scale=scaling.update(state.loss_scale, finite))
    metrics['loss_scale'] = scale
  return new_state, {**sums, **metrics, 'grad_norm': grad_norm}


def _scaled_loss(params, batch_stats, micro: dict, rng, *, model: nn.Module,
                 loss_fn: Callable, axis_name: str | None, scale):
  """(the mean loss, times the loss scale if any; (metric sums, new BatchNorm statistics))."""
  micro = {**micro, 'mask': jnp.ones(micro['x'].shape[0], jnp.float32)}
  out, batch_stats = _forward(model, params, batch_stats, micro['x'], train=True, rng=rng)
  loss_sum, sums = loss_fn(out, micro)
  count = sums['count'] if axis_name is None else jax.lax.psum(sums['count'], axis_name)
  loss = loss_sum / count  # Per counted example, or per position for a language model.
  return (loss if scale is None else loss * scale), (sums, batch_stats)


def _accumulate(grad_fn: Callable, state: TrainState, batch: dict, rng,
                accum_steps: int) -> tuple[Any, Any, dict]:
  """(mean gradients, BatchNorm statistics, metric sums) over `accum_steps` micro-batches;
  micro-batch i takes every accum_steps-th example, so each device keeps its own rows."""
  if accum_steps == 1:
    (_, (sums, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    return grads, batch_stats, sums
  micro_batches = jax.tree.map(
      lambda a: a.reshape(-1, accum_steps, *a.shape[1:]).swapaxes(0, 1), batch)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)

  def body(carry, inputs):
    grads_acc, batch_stats, sums_acc = carry
    micro, i = inputs
    (_, (sums, batch_stats)), grads = grad_fn(state.params, batch_stats, micro,
                                              jax.random.fold_in(rng, i))
    return (add(grads_acc, grads), batch_stats, add(sums_acc, sums)), None

  first = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), micro_batches)
  sums_shape = jax.eval_shape(grad_fn, state.params, state.batch_stats, first, rng)[0][1][0]
  carry = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats,
           jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums_shape))
  (grads, batch_stats, sums), _ = jax.lax.scan(
      body, carry, (micro_batches, jnp.arange(accum_steps)))
  return jax.tree.map(lambda g: g / accum_steps, grads), batch_stats, sums


def _update_if_finite(tx, state: TrainState, grads, batch_stats, finite: jax.Array,
                      guard: str) -> tuple[Any, Any, Any]:
  """(params, BatchNorm statistics, optimizer state): updated where `finite`, else the old
  values bit for bit. `guard` 'branch' (lax.cond) spares XLA:CPU a copy of the optimizer
  state; 'select' (jnp.where) is the reference."""
  old = (state.params, state.batch_stats, state.opt_state)

  def update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), batch_stats, opt_state

  if guard == 'branch':
    return jax.lax.cond(finite, update, lambda: old)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), update(), old)


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, loss_fn: Callable) -> dict:
  """Metric sums of one (padded, masked) evaluation batch."""
  out, _ = _forward(model, state.params, state.batch_stats, batch['x'], train=False)
  return loss_fn(out, batch)[1]


def _train_fn(s: Setup, axis_name: str | None = None) -> Callable:
  """train_step with the setup's model, optimizer, loss and policies bound."""
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
  # Without the optimizer state, which evaluation never reads (readers do not restore it).
  eval_jit = jax.jit(evaluate_fn, in_shardings=(parallel.for_eval(s.shardings),
                                                sharding.batch_sharding(s.mesh)),
                     out_shardings=sharding.replicated(s.mesh))
  batch = s.data.batch_spec(s.config.data.eval_batch_size, with_mask=True)
  with parallel.tracing(s):
    return eval_jit.lower(parallel.for_eval(abstract_state(s)), batch)


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
  if s.data.meta.task == 'lm':  # Per token from the loss; per byte of the split's text.
    out['bits_per_token'] = out['bits_per_byte']
    out['bits_per_byte'] *= s.data.tokens_per_byte(split)
    out['unigram_bits_per_byte'] = s.data.unigram_bits_per_byte(split)
  if s.data.meta.task == 'regression':
    out['mse_vs_mean'] = out['mse'] / s.data.baseline_mse(split)
    out['mse_vs_linear'] = out['mse'] / s.data.baseline_linear_mse(split)
  return out


def describe(s: Setup) -> list[str]:
  """What a run is made of, in two lines: its data, and its model on its devices."""
  c, meta = s.config, s.data.meta
  unit = 'bytes' if meta.task == 'lm' else 'examples'
  sizes = ', '.join(f'{split} {meta.sizes[split]:,}' for split in data_lib.SPLITS
                    if split in meta.sizes)
  devices = s.mesh.devices
  mesh = ' x '.join(f'{name} {n}' for name, n in s.mesh.shape.items())
  return [f'data {c.data.name}: {sizes} {unit}; batch {c.data.batch_size}',
          f'model {c.model.name}: {num_params(s):,} parameters; precision {s.policy.name}, '
          f'kernels {s.kernels.name}; {s.mode} over {devices.size} '
          f'{devices.flat[0].platform} device(s) ({mesh})']


def run_fingerprint(s: Setup) -> dict:
  """What every checkpoint of this run stores and a resumed run must match."""
  out = checkpoint.fingerprint(workdir_lib.fingerprint_config(s.config),
                               nn.meta.unbox(s.abstract_boxed), s.data.identity())
  if base_source(s):  # What a LoRA run's checkpoints refer to (they hold the adapters only).
    out['base'] = pretrained.identity(base_source(s))
  return out


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
    if not getattr(s.data, 'trains', True):
      s.data.train_iter()  # Its one-line error: nothing to train on.
    if config.train.get('init_from', ''):
      pretrained.check_source(s, config.train.init_from)
    with workdir_lib.owned(workdir):
      ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                     config.train.keep_checkpoints, fingerprint=run_fingerprint(s))
      try:
        start, corrupt = resume_point(s, workdir, ckpts)
        done = workdir_lib.finished(workdir, start) if start == config.train.steps else None
        if done is not None:
          metrics_lib.note(f'{workdir} has finished its {start} steps already; nothing to do '
                           '(a larger train.steps trains on)')
          return {**done, 'finished_already': True}
        for line in describe(s):
          metrics_lib.note(line)
        if start is None:
          state, iter_state = init_state(s), None
          metrics_lib.note(f'initialised a fresh state from seed {config.seed}')
          source = config.train.get('init_from', '')
          if source:
            # A LoRA run's base: the step its checkpoints record (ckpts' fingerprint).
            base_step = (ckpts.fingerprint.get('base') or {}).get('step')
            state = state.replace(params=pretrained.load_params(s, source, state.params,
                                                                step=base_step))
            metrics_lib.note(f'parameters from {source} (train.init_from)')
        else:
          state, iter_state, _ = restore(s, ckpts, start)
          metrics_lib.note(f'restored step {start} from {ckpts.directory}')
        metrics_lib.note('compiling the train and eval steps')
        steps = compile_steps(s, state)
        memory.check_step_bytes(config, s.mesh, steps.train_bytes, steps.eval_bytes)
        left = (f'training steps {(start or 0) + 1}-{config.train.steps}'
                if (start or 0) < config.train.steps else 'the final evaluation is left')
        metrics_lib.note(f'compiled in {steps.compile_s:.1f} s; {left}')
        # Every check passed: from here on the run writes into the workdir.
        workdir_lib.write_config(workdir, config)
        ckpts.open_for_writing(corrupt)
        workdir_lib.truncate_metrics(workdir, start or 0, final=start == config.train.steps)
        return _train(s, workdir, ckpts, preemption, stop_after, t_start, start, state,
                      iter_state, steps)
      finally:
        ckpts.close()


def _train(s: Setup, workdir: str, ckpts: checkpoint.Checkpoints,
           preemption: faults.Preemption, stop_after: int | None, t_start: float,
           start: int | None, state: TrainState, iter_state: dict | None,
           steps: parallel.Steps) -> dict | None:
  """The loop from `start` (None: a fresh state) to train.steps or `stop_after`, then the
  final save, evaluation and summary; see `train_and_evaluate` for what it returns."""
  config, cfg = s.config, s.config.train
  # Each process reads only the rows of a batch that its devices hold.
  train_iter = s.data.train_iter(steps.rows(config.data.batch_size))
  if start is not None:
    train_iter.set_state(iter_state)
  saved, start = start, start or 0
  state = steps.place(state)
  writer = metrics_lib.Writer(workdir)
  progress = metrics_lib.Progress(cfg.steps, start)
  per_byte = s.data.tokens_per_byte('train') if s.data.meta.task == 'lm' else 1.0
  log = metrics_lib.TrainLog(writer, progress, s.data.meta.task, s.schedule, s.skip_limit,
                             per_byte)
  if hasattr(train_iter, 'last_bad'):  # Skipped images: counted from the steps' metrics.
    log.bad_images = metrics_lib.BadImages(config.data.max_bad_images, train_iter)
  eval_s, preempted = 0.0, None
  t_loop = time.perf_counter()
  last = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
  profile = metrics_lib.Profile(workdir, cfg.profile_steps, cfg.profile_start)
  try:
    for step in range(start + 1, last + 1):
      t_input = time.perf_counter()
      batch = next(train_iter)
      log.waited(time.perf_counter() - t_input)
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
    if hasattr(train_iter, 'close'):  # Decoding worker processes (data.workers).
      train_iter.close()
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
  scalars = log.scalars or workdir_lib.last_logged(workdir)  # Or nothing was left to train.
  summary = _summary(s, steps, state, scalars, val, test,
                     wall_s=time.perf_counter() - t_start,
                     steps_per_s=(cfg.steps - start) / train_s if cfg.steps > start else None,
                     resumed_from=start or None)
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary


_all_finite = jax.jit(precision.all_finite)


def _save(s: Setup, steps: parallel.Steps, ckpts: checkpoint.Checkpoints,
          log: metrics_lib.TrainLog, state: TrainState, train_iter, step: int,
          saved: int | None) -> int:
  """Starts the save of `step` (after the skip checks of every step before it); returns it."""
  log.flush(saved)
  log.check_unlogged(step, saved)  # Also brings the skipped images' count up to `step`.
  mesh_state = steps.unplace(state)
  if not bool(_all_finite(mesh_state)):  # Never reached while train_step guards each step.
    raise faults.NonFiniteError(f'train: refusing to save step {step}: the state holds '
                                'non-finite values')
  ckpts.save(step, checkpointed(s, mesh_state), data_lib.save_iter_state(train_iter),
             s.data.meta.to_json())
  return step


def _summary(s: Setup, steps: parallel.Steps, state: TrainState, scalars: dict, val: dict,
             test: dict, *, wall_s: float, steps_per_s: float | None,
             resumed_from: int | None) -> dict:
  """summary.json: the final metrics, the run's timings and what it ran on."""
  devices = s.mesh.devices.flatten()
  return {
      'step': s.config.train.steps,
      'train_loss': scalars.get('train/loss'),
      'train_accuracy': scalars.get('train/accuracy'),
      'eval': test,
      'val': val,
      'wall_s': wall_s,
      'compile_s': steps.compile_s,
      # XLA's memory analysis of the compiled train step (jit): state, batch, temporaries.
      'train_step_bytes': steps.train_bytes,
      'steps_per_s': steps_per_s,
      'resumed_from': resumed_from,
      'num_params': num_params(s),
      'precision': s.policy.name,
      # One device's copy: a scalar under jit, a one-element slice under pmap.
      'skipped_steps': int(np.ravel(state.skips.total.addressable_data(0))[0]),
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
  }
