"""Losses that return sums and counts, so metrics add up exactly across batches and devices.

Shapes: B batch, K outputs (classes, or regression targets), L positions of a sequence
(language models predict a class, the next byte, at every position), Z latent features.
`mask_B` marks real examples (0 on the padding of the last evaluation batch).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbig import matmul
from jaxbig.config import ConfigError
from jaxbig.models import vae

Metrics = dict[str, jnp.ndarray]


def _per_position(mask_B: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """The example mask broadcast over the extra (position) axes of `like`."""
  return jnp.broadcast_to(mask_B.reshape(mask_B.shape + (1,) * (like.ndim - 1)), like.shape)


def argmax_is(logits_BxK: jnp.ndarray, labels_B: jnp.ndarray) -> jnp.ndarray:
  """`argmax(logits, -1) == labels` (ties go to the first index) without the argmax: the
  label is a class, its logit is the largest and no earlier logit reaches it. XLA:CPU's
  argmax, a reduction over value-index pairs, is several times slower than these two
  reductions. Where argmax picks a NaN, this counts as wrong."""
  classes = logits_BxK.shape[-1]
  label_logit = jnp.take_along_axis(logits_BxK, labels_B[..., None], -1)[..., 0]
  before_label = jnp.arange(classes) < labels_B[..., None]
  tied_before = jnp.any(before_label & (logits_BxK >= label_logit[..., None]), -1)
  is_class = (labels_B >= 0) & (labels_B < classes)
  return is_class & (label_logit == jnp.max(logits_BxK, -1)) & ~tied_before


def cross_entropy(logits_BxK: jnp.ndarray, labels_B: jnp.ndarray, mask_B: jnp.ndarray, *,
                  label_smoothing: float = 0.0,
                  class_weights_K: jnp.ndarray | None = None) -> tuple[jnp.ndarray, Metrics]:
  """Softmax cross-entropy in float32; returns (weighted loss sum, metric sums).

  Also takes logits_BxLxK with labels_BxL (a language model): every position counts.
  """
  logits_BxK = logits_BxK.astype(jnp.float32)
  num_classes = logits_BxK.shape[-1]
  targets_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets_BxK = optax.smooth_labels(targets_BxK, label_smoothing)
  per_example_B = optax.softmax_cross_entropy(logits_BxK, targets_BxK)
  mask = _per_position(mask_B, per_example_B)
  weights_B = mask if class_weights_K is None else mask * class_weights_K[labels_B]
  loss_sum = jnp.sum(per_example_B * weights_B)
  correct = jnp.sum(argmax_is(logits_BxK, labels_B) * mask)
  return loss_sum, {'loss': loss_sum, 'correct': correct, 'count': jnp.sum(mask)}


def chunked_cross_entropy(hidden_BxLxE: jnp.ndarray, table_VxE: jnp.ndarray,
                          labels_BxL: jnp.ndarray, mask_B: jnp.ndarray, chunk: int, *,
                          label_smoothing: float = 0.0) -> tuple[jnp.ndarray, Metrics]:
  """`cross_entropy` of the logits hidden @ table.T, made `chunk` positions at a time.

  Neither the float32 logits nor a one-hot of the whole batch exist at once: a scan over
  position chunks makes each chunk's logits (float32 accumulation), reduces them to the
  log-normaliser, the label's logit and the argmax test, and (`jax.checkpoint`) makes them
  again in the backward pass. Peak memory is about B x chunk x V floats.
  """
  batch, length, width = hidden_BxLxE.shape
  chunk = min(chunk, length)
  pad = -length % chunk
  if pad:  # Padded positions are masked out below.
    hidden_BxLxE = jnp.pad(hidden_BxLxE, ((0, 0), (0, pad), (0, 0)))
    labels_BxL = jnp.pad(labels_BxL, ((0, 0), (0, pad)))
  steps = (length + pad) // chunk
  valid_L = jnp.arange(length + pad) < length
  hidden_NxBxCxE = hidden_BxLxE.reshape(batch, steps, chunk, width).swapaxes(0, 1)
  labels_NxBxC = labels_BxL.reshape(batch, steps, chunk).swapaxes(0, 1)
  valid_NxC = valid_L.reshape(steps, chunk)
  mask_BxL = _per_position(mask_B, labels_BxL)

  @jax.checkpoint
  def one_chunk(hidden_BxCxE, labels_BxC):
    logits_BxCxV = matmul.einsum_f32('bce,ve->bcv', hidden_BxCxE, table_VxE)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, -1)
    label_BxC = jnp.take_along_axis(logits_BxCxV, labels_BxC[..., None], -1)[..., 0]
    loss_BxC = lse_BxC - label_BxC
    if label_smoothing:  # Targets (1 - a) one-hot + a / V: the mean logit's share.
      loss_BxC = (1 - label_smoothing) * loss_BxC + label_smoothing * (
          lse_BxC - jnp.mean(logits_BxCxV, -1))
    return loss_BxC, argmax_is(logits_BxCxV, labels_BxC)

  def body(carry, inputs):
    hidden_BxCxE, labels_BxC, valid_C = inputs
    loss_BxC, correct_BxC = one_chunk(hidden_BxCxE, labels_BxC)
    return carry, (loss_BxC * valid_C, correct_BxC & valid_C)

  _, (loss_NxBxC, correct_NxBxC) = jax.lax.scan(
      body, None, (hidden_NxBxCxE, labels_NxBxC, valid_NxC))
  unchunk = lambda a: a.swapaxes(0, 1).reshape(batch, steps * chunk)[:, :length]
  weights_BxL = mask_BxL[:, :length] if pad else mask_BxL
  loss_sum = jnp.sum(unchunk(loss_NxBxC) * weights_BxL)
  correct = jnp.sum(unchunk(correct_NxBxC) * weights_BxL)
  return loss_sum, {'loss': loss_sum, 'correct': correct, 'count': jnp.sum(weights_BxL)}


def mean_squared_error(preds_BxK: jnp.ndarray, targets_BxK: jnp.ndarray,
                       mask_B: jnp.ndarray) -> tuple[jnp.ndarray, Metrics]:
  """Squared error averaged over outputs, summed over examples, in float32."""
  err_B = jnp.mean((preds_BxK.astype(jnp.float32) - targets_BxK) ** 2, axis=-1)
  loss_sum = jnp.sum(err_B * mask_B)
  return loss_sum, {'loss': loss_sum, 'count': jnp.sum(mask_B)}


def negative_elbo(outputs: dict, x_BxHxWxC: jnp.ndarray, mask_B: jnp.ndarray, *,
                  with_kl: bool = True) -> tuple[jnp.ndarray, Metrics]:
  """Bernoulli reconstruction NLL (+ KL to the N(0, I) prior: the negative ELBO), in nats."""
  nll_B = vae.bernoulli_nll(outputs['recon_logits'], x_BxHxWxC)
  sums = {'recon_nll': jnp.sum(nll_B * mask_B),
          'recon_sq_err': jnp.sum(vae.recon_sq_err(outputs['recon_logits'], x_BxHxWxC) * mask_B),
          'count': jnp.sum(mask_B)}
  loss_B = nll_B
  if with_kl:
    kl_B = vae.kl_divergence(outputs['mean'], outputs['logvar'])
    sums['kl'] = jnp.sum(kl_B * mask_B)
    loss_B = nll_B + kl_B
  loss_sum = jnp.sum(loss_B * mask_B)
  return loss_sum, {'loss': loss_sum, **sums}


# Which data task and which models each loss needs (the model list: None = any).
_NEEDS = {
    'xent': (('classification', 'lm'), None),
    'mse': (('regression',), None),
    'elbo': (('classification', 'regression'), ('vae',)),
    'recon': (('classification', 'regression'), ('autoencoder', 'vae')),
}


def check(train_cfg, task: str, data_name: str, model_name: str) -> None:
  """Raises a one-line ConfigError unless `train.loss` fits the data and the model."""
  tasks, model_names = _NEEDS[train_cfg.loss]
  if task not in tasks:
    hint = {'lm': 'text data needs train.loss=xent',
            'regression': 'real-valued targets need train.loss=mse',
            'classification': 'class labels need train.loss=xent'}[task]
    raise ConfigError(f'train.loss={train_cfg.loss} does not fit data.name={data_name} ({hint})')
  if model_names and model_name not in model_names:
    raise ConfigError(f"train.loss={train_cfg.loss} needs model.name in "
                      f"{', '.join(model_names)}, got {model_name}")
  if model_name in ('vae', 'autoencoder') and train_cfg.loss not in ('elbo', 'recon'):
    raise ConfigError(f'model.name={model_name} reconstructs its input: use train.loss=elbo '
                      'or recon')
  if task == 'lm' and (train_cfg.class_weights or train_cfg.balance_classes):
    raise ConfigError('train.class_weights, train.balance_classes: not for language models')


def build(train_cfg, class_weights: jnp.ndarray | None, logits_chunk: int = 0) -> Callable:
  """`loss_fn(outputs, batch) -> (loss sum, metric sums)` for `train.loss`; a language
  model's outputs {'hidden', 'table'} (model.logits_chunk) take the chunked cross-entropy."""
  if train_cfg.loss == 'xent':
    smoothing = train_cfg.label_smoothing

    def loss_fn(outputs, batch):
      if isinstance(outputs, dict):
        return chunked_cross_entropy(outputs['hidden'], outputs['table'], batch['y'],
                                     batch['mask'], logits_chunk, label_smoothing=smoothing)
      return cross_entropy(outputs, batch['y'], batch['mask'], label_smoothing=smoothing,
                           class_weights_K=class_weights)
    return loss_fn
  if train_cfg.loss in ('elbo', 'recon'):
    with_kl = train_cfg.loss == 'elbo'

    def loss_fn(outputs, batch):
      return negative_elbo(outputs, batch['x'], batch['mask'], with_kl=with_kl)
    return loss_fn

  def loss_fn(outputs, batch):
    return mean_squared_error(outputs, batch['y'], batch['mask'])
  return loss_fn


_RENAMES = {'correct': 'accuracy', 'recon_sq_err': 'recon_mse'}


def finalize(sums: dict[str, float], task: str, y_std: float = 1.0) -> dict[str, float]:
  """Host-side means from summed metrics.

  Every sum becomes a mean per counted example (per position for language models): loss,
  accuracy, and for reconstructions recon_nll, recon_mse (per pixel), kl and elbo (a VAE).
  Regression adds mse in the targets' original units, language models bits_per_byte.
  """
  n = max(sums['count'], 1.0)
  out = {_RENAMES.get(k, k): v / n for k, v in sums.items() if k not in ('count', 'grad_norm')}
  if 'kl' in sums:
    out['elbo'] = -(sums['recon_nll'] + sums['kl']) / n
  if task == 'regression':
    out['mse'] = out['loss'] * y_std ** 2  # In the targets' original units.
  if task == 'lm':
    out['bits_per_byte'] = out['loss'] / math.log(2)
  return out


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
