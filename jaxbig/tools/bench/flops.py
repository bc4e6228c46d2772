"""FLOPs of a training step by formula, and the dense peak FLOP rates that MFU divides by.

The formulas count the multiply-adds of matmuls and convolutions (2 FLOPs each) of one
forward pass and take three times that for a training step (forward, and the gradients of
inputs and of weights), the usual model-FLOPs convention. Element-wise work, norms and
softmax are left out. Causal attention counts the half of the score and value products that
the mask keeps. Families without a formula give None; XLA's own count sits beside it.
"""

from __future__ import annotations

import math

# Dense (no sparsity) peak rates in FLOP/s per device, from the vendors' data sheets; keyed by
# a substring of `device_kind` and the dtype the matmuls run in. Where a device is missing,
# MFU is null and says so.
PEAKS = {  # Checked in order: a more specific name first.
    'H100 PCIe': {'fp32': 51e12, 'tf32': 378e12, 'bf16': 756e12, 'fp16': 756e12,
                  'fp8': 1513e12, 'int8': 1513e12},
    'H100': {'fp32': 67e12, 'tf32': 494.7e12, 'bf16': 989.4e12, 'fp16': 989.4e12,
             'fp8': 1978.9e12, 'int8': 1978.9e12},  # SXM (H100 80GB HBM3).
    'H200': {'fp32': 67e12, 'tf32': 494.7e12, 'bf16': 989.4e12, 'fp16': 989.4e12,
             'fp8': 1978.9e12, 'int8': 1978.9e12},
    'A100': {'fp32': 19.5e12, 'tf32': 156e12, 'bf16': 312e12, 'fp16': 312e12, 'int8': 624e12},
    'TPU v4': {'bf16': 275e12, 'int8': 275e12},
    'TPU v5 lite': {'bf16': 197e12, 'int8': 394e12},  # v5e.
    'TPU v5': {'bf16': 459e12, 'int8': 918e12},  # v5p.
    'TPU v6 lite': {'bf16': 918e12, 'int8': 1836e12},  # v6e.
}


# Memory and interconnect bandwidth per device in bytes/s, for the plan's roofline: HBM, and
# the chip's bidirectional inter-chip (TPU ICI) or NVLink bandwidth. TPUs: the Cloud TPU
# system-architecture pages (v4 gives no per-chip ICI figure); GPUs: NVIDIA's data sheets.
BANDWIDTHS = {  # Checked in order, as PEAKS.
    'H100 PCIe': {'hbm': 2.0e12, 'ici': 600e9},
    'H100': {'hbm': 3.35e12, 'ici': 900e9},
    'H200': {'hbm': 4.8e12, 'ici': 900e9},
    'A100': {'hbm': 2.0e12, 'ici': 600e9},
    'TPU v4': {'hbm': 1200e9, 'ici': None},
    'TPU v5 lite': {'hbm': 819e9, 'ici': 400e9},
    'TPU v5': {'hbm': 2765e9, 'ici': 1200e9},
    'TPU v6 lite': {'hbm': 1638e9, 'ici': 800e9},
}


def bandwidths(device_kind: str) -> dict:
  """{'hbm', 'ici'} bytes/s of the device (None where not tabled)."""
  for key, rates in BANDWIDTHS.items():
    if key.lower() in device_kind.lower():
      return rates
  return {'hbm': None, 'ici': None}


def peak(device_kind: str, precision: str) -> float | None:
  """The device's dense peak for the precision's matmuls, or None if not tabled."""
  for key, rates in PEAKS.items():
    if key.lower() in device_kind.lower():
      return rates.get(precision)
  return None


def _dense(n_in: int, n_out: int) -> int:
  return 2 * n_in * n_out


def forward_flops(model_cfg, meta, batch: int) -> float | None:
  """Matmul and convolution FLOPs of one forward pass over `batch` examples (or windows)."""
  name = model_cfg.name
  if name == 'mlp':
    dims = [math.prod(meta.input_shape), *model_cfg.widths, meta.num_outputs]
    return batch * sum(_dense(a, b) for a, b in zip(dims, dims[1:]))
  if name == 'cnn':
    h, w, c = meta.input_shape
    total = 0
    for width in model_cfg.features:  # 3x3 SAME convolution, then a 2x2 max-pool.
      total += 2 * h * w * 9 * c * width
      h, w, c = -(-h // 2), -(-w // 2), width
    total += _dense(h * w * c, model_cfg.hidden) + _dense(model_cfg.hidden, meta.num_outputs)
    return batch * total
  if meta.task != 'lm':
    return None  # Classifier Transformers and RNNs, ResNets, VAEs: XLA's count only.
  seq, vocab = meta.input_shape[0], model_cfg.get('vocab_size', 0) or meta.vocab_size
  if name == 'transformer':
    d = model_cfg.width
    mlp = model_cfg.get('mlp_dim', 0) or int(round(d * model_cfg.mlp_ratio))  # mlp_width.
    # Queries and the output projection are d x d; keys and values d x (kv_heads x head
    # size), d x d without grouped-query attention. SwiGLU adds a gate matrix to the MLP.
    kv = model_cfg.get('kv_heads', 0) or model_cfg.heads
    kv_width = kv * (d // model_cfg.heads)
    mlp_mats = 3 if model_cfg.get('mlp', 'gelu') == 'swiglu' else 2
    per_layer = 2 * _dense(d, d) + 2 * _dense(d, kv_width) + mlp_mats * _dense(d, mlp)
    per_token = model_cfg.depth * per_layer + _dense(d, vocab)
    # Scores (L x L x d) and values (L x L x d) per layer, half of each under a causal mask.
    attention = model_cfg.depth * 2 * (2 * seq * seq * d) / 2
    return batch * (seq * per_token + attention)
  if name in ('lstm', 'gru'):
    gates, h = (4 if name == 'lstm' else 3), model_cfg.hidden
    inputs = model_cfg.embed_dim or h
    per_token = 0
    for _ in range(model_cfg.depth):
      per_token += gates * (_dense(inputs, h) + _dense(h, h))
      inputs = h
    return batch * seq * (per_token + _dense(h, vocab))
  return None


def train_flops(model_cfg, meta, batch: int) -> float | None:
  fwd = forward_flops(model_cfg, meta, batch)
  return None if fwd is None else 3.0 * fwd


def recomputed_flops(model_cfg, meta, batch: int) -> float | None:
  """FLOPs the backward pass adds by recomputing what `model.remat` did not keep, beside
  train_flops' model FLOPs: all of a forward pass under `full` (and `save:...`, counted as
  full: an upper bound), the attention scores and values under `dots` and `offload`."""
  fwd = forward_flops(model_cfg, meta, batch)
  if fwd is None or model_cfg.name != 'transformer':
    return None if fwd is None else 0.0
  policy = str(model_cfg.get('remat', 'none')).lower()
  if policy in ('none', 'false', 'dots_saveable'):
    return 0.0
  if policy in ('dots', 'offload'):
    seq, d = meta.input_shape[0], model_cfg.width
    return batch * model_cfg.depth * 2 * (2 * seq * seq * d) / 2  # Causal: half the scores.
  return fwd
