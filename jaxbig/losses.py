"""Losses that return sums and counts, so metrics add up exactly across batches and devices.

Shapes: B batch, K outputs (classes, or regression targets).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jnp.ndarray]


def cross_entropy(logits_BxK: jnp.ndarray, labels_B: jnp.ndarray, mask_B: jnp.ndarray, *,
                  label_smoothing: float = 0.0,
                  class_weights_K: jnp.ndarray | None = None) -> tuple[jnp.ndarray, Metrics]:
  """Softmax cross-entropy in float32; returns (weighted loss sum, metric sums)."""
  logits_BxK = logits_BxK.astype(jnp.float32)
  num_classes = logits_BxK.shape[-1]
  targets_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets_BxK = optax.smooth_labels(targets_BxK, label_smoothing)
  per_example_B = optax.softmax_cross_entropy(logits_BxK, targets_BxK)
  weights_B = mask_B if class_weights_K is None else mask_B * class_weights_K[labels_B]
  loss_sum = jnp.sum(per_example_B * weights_B)
  correct = jnp.sum((jnp.argmax(logits_BxK, -1) == labels_B) * mask_B)
  return loss_sum, {'loss': loss_sum, 'correct': correct, 'count': jnp.sum(mask_B)}


def mean_squared_error(preds_BxK: jnp.ndarray, targets_BxK: jnp.ndarray,
                       mask_B: jnp.ndarray) -> tuple[jnp.ndarray, Metrics]:
  """Squared error averaged over outputs, summed over examples, in float32."""
  err_B = jnp.mean((preds_BxK.astype(jnp.float32) - targets_BxK) ** 2, axis=-1)
  loss_sum = jnp.sum(err_B * mask_B)
  return loss_sum, {'loss': loss_sum, 'count': jnp.sum(mask_B)}


def build(train_cfg, class_weights: jnp.ndarray | None) -> Callable:
  """`loss_fn(outputs, batch) -> (loss sum, metric sums)` for `train.loss`."""
  if train_cfg.loss == 'xent':
    smoothing = train_cfg.label_smoothing

    def loss_fn(outputs, batch):
      return cross_entropy(outputs, batch['y'], batch['mask'], label_smoothing=smoothing,
                           class_weights_K=class_weights)
    return loss_fn

  def loss_fn(outputs, batch):
    return mean_squared_error(outputs, batch['y'], batch['mask'])
  return loss_fn


def finalize(sums: dict[str, float], task: str, y_std: float = 1.0) -> dict[str, float]:
  """Host-side means from summed metrics: loss, accuracy (classification), mse (regression)."""
  n = max(sums['count'], 1.0)
  out = {'loss': sums['loss'] / n}
  if task == 'classification':
    out['accuracy'] = sums['correct'] / n
  else:
    out['mse'] = out['loss'] * y_std ** 2  # In the targets' original units.
  return out
