"""The optimizer and learning-rate schedule of an experiment, built from its `config.opt`.

The chain, in order: global-norm clipping, the coupled L2/L1 penalties (added to the gradient,
so they go through the optimizer's preconditioning like a loss term), the optimizer's own
scaling, decoupled weight decay, and the learning rate. Penalties and decay touch only the
leaves `decay_mask` selects (kernels and embeddings, not biases or normalisation scales).
Gradient accumulation belongs to the train step, not here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxbig.config import ConfigError

OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adagrad', 'rmsprop', 'adam', 'adamw', 'lion')
SCHEDULES = ('constant', 'cosine', 'linear')


def default_config() -> ml_collections.ConfigDict:
  """An `opt` section with every field declared; experiments override what they change."""
  c = ml_collections.ConfigDict()
  c.name = 'adamw'  # sgd | momentum | nesterov | adagrad | rmsprop | adam | adamw | lion.
  c.lr = 1e-3  # Peak learning rate (reached at the end of the warmup).
  c.momentum = 0.9  # Momentum (momentum, nesterov) or squared-gradient decay (rmsprop).
  c.b1 = 0.9  # First-moment decay (adam, adamw, lion).
  c.b2 = 0.999  # Second-moment decay (adam, adamw); lion's update-interpolation decay.
  c.eps = 1e-8  # Denominator epsilon (adam, adamw, rmsprop, adagrad).
  c.weight_decay = 1e-4  # Decoupled weight decay, scaled by the learning rate (masked leaves).
  c.l1 = 0.0  # L1 penalty: l1 * sign(w) added to the gradient (masked leaves).
  c.l2 = 0.0  # L2 penalty: l2 * w added to the gradient (masked leaves).
  c.clip_norm = 1.0  # Clip the gradient's global norm to this, first in the chain (0: off).
  c.schedule = 'cosine'  # constant | cosine | linear, after the warmup.
  c.warmup_steps = 0  # Linear warmup from 0 to lr over this many steps.
  c.end_lr_factor = 0.0  # Learning rate at the last step as a fraction of lr (cosine, linear).
  return c


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(cfg: ml_collections.ConfigDict, total_steps: int) -> None:
  """Raises a ValueError (ConfigError) naming the first bad `opt` field."""
  _require(cfg.name in OPTIMIZERS,
           f"opt.name: unknown optimizer '{cfg.name}'; choose from {', '.join(OPTIMIZERS)}")
  _require(cfg.schedule in SCHEDULES,
           f"opt.schedule: unknown schedule '{cfg.schedule}'; choose from {', '.join(SCHEDULES)}")
  _require(cfg.lr > 0, f'opt.lr must be > 0, got {cfg.lr}')
  _require(0 <= cfg.momentum < 1, f'opt.momentum must be in [0, 1), got {cfg.momentum}')
  _require(0 <= cfg.b1 < 1, f'opt.b1 must be in [0, 1), got {cfg.b1}')
  _require(0 <= cfg.b2 < 1, f'opt.b2 must be in [0, 1), got {cfg.b2}')
  _require(cfg.eps >= 0, f'opt.eps must be >= 0, got {cfg.eps}')
  for field in ('weight_decay', 'l1', 'l2', 'clip_norm', 'warmup_steps'):
    value = cfg[field]
    _require(value >= 0, f'opt.{field} must be >= 0, got {value}')
  _require(total_steps > 0, f'total_steps must be > 0, got {total_steps}')
  _require(cfg.warmup_steps <= total_steps,
           f'opt.warmup_steps must be <= total_steps ({total_steps}), got {cfg.warmup_steps}')
  _require(0 <= cfg.end_lr_factor <= 1,
           f'opt.end_lr_factor must be in [0, 1], got {cfg.end_lr_factor}')


def decay_mask(params: Any) -> Any:
  """True for leaves with ndim >= 2 (kernels, embeddings): the ones decay and penalties touch."""
  # np.ndim reads `.ndim`, so this works on arrays, tracers and ShapeDtypeStructs alike.
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Step -> learning rate: linear warmup from 0, then constant, cosine or linear decay."""
  lr, warmup = cfg.lr, cfg.warmup_steps
  end = lr * cfg.end_lr_factor
  decay_steps = total_steps - warmup
  if cfg.schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif decay_steps == 0:
    # All warmup: optax's decays reject zero steps; total_steps is still where we reach `end`.
    after = optax.constant_schedule(end)
  elif cfg.schedule == 'cosine':
    # Not warmup_cosine_decay_schedule: it raises when warmup_steps == total_steps.
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_factor)
  else:
    after = optax.linear_schedule(lr, end, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _add_l1(l1: float) -> optax.GradientTransformation:
  """Adds l1 * sign(w) to the gradient (optax has L2 as add_decayed_weights, no L1)."""
  return optax.stateless(
      lambda g, params: jax.tree.map(lambda gi, p: gi + l1 * jnp.sign(p), g, params))


def _preconditioner(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer's update direction before weight decay and the learning rate."""
  # optax's aliases for these take no weight_decay, and the decay must sit between the
  # preconditioner and the learning rate to be decoupled; so we chain their parts ourselves.
  if cfg.name == 'sgd':
    return optax.identity()
  if cfg.name in ('momentum', 'nesterov'):
    return optax.trace(decay=cfg.momentum, nesterov=cfg.name == 'nesterov')
  if cfg.name == 'adagrad':
    return optax.scale_by_rss(eps=cfg.eps)
  if cfg.name == 'rmsprop':
    return optax.scale_by_rms(decay=cfg.momentum, eps=cfg.eps)
  if cfg.name == 'adam':
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  raise AssertionError(cfg.name)  # validate() admits no other name.


def build(cfg: ml_collections.ConfigDict,
          total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) for `config.opt` over `total_steps` updates."""
  validate(cfg, total_steps)
  lr = schedule(cfg, total_steps)
  chain = []
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.l2 > 0:
    # Before the optimizer, this is the coupled penalty g + l2 * w.
    chain.append(optax.add_decayed_weights(cfg.l2, mask=decay_mask))
  if cfg.l1 > 0:
    chain.append(optax.masked(_add_l1(cfg.l1), decay_mask))
  if cfg.name == 'adamw':
    chain.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
  elif cfg.name == 'lion':
    chain.append(optax.lion(lr, b1=cfg.b1, b2=cfg.b2,
                            weight_decay=cfg.weight_decay, mask=decay_mask))
  else:
    chain += [_preconditioner(cfg),
              optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
              optax.scale_by_learning_rate(lr)]
  return optax.chain(*chain), lr


def adapters_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` for the LoRA adapters (parameters named `*_lora_a`, `*_lora_b`) only; every other
  parameter is frozen: its update is zero and it has no optimizer state."""
  from jaxbig.models.transformer import LORA  # pylint: disable=g-import-not-at-top

  def labels(params):
    def label(path, _):
      names = [str(getattr(k, 'key', '')) for k in path]
      return 'adapters' if any(LORA in n for n in names) else 'frozen'
    return jax.tree_util.tree_map_with_path(label, params)
  return optax.multi_transform({'adapters': tx, 'frozen': optax.set_to_zero()}, labels)


def unbox_masked(opt_state: Any) -> Any:
  """The optimizer state of boxed (logically named) parameters without the boxes around
  `optax.MaskedNode`s: the frozen leaves of `adapters_only` hold no state, so nothing to
  name or shard."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if box(x) and isinstance(x.value, optax.MaskedNode)
                      else x, opt_state, is_leaf=box)
