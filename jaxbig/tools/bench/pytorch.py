"""PyTorch reference implementations of the seed models, for side-by-side bench rows.

A suite row with `'pytorch': True` (or 'compile' for `torch.compile`) also times the same
model written the way a PyTorch user would write it: same layer shapes, same loss, AdamW
with the same betas, epsilon, decoupled weight decay on the same leaves (ndim >= 2) and
the same global-norm clipping and the same learning-rate schedule (`jaxbig.optim.schedule`,
tabulated once), on the same batch already on the device. What differs, and does not matter
for timing: the initial values (each framework's own initialisers).

Models: the seed CNN (`cnn`), the LSTM/GRU language model (`lstm`, `gru`) and the decoder
Transformer language model (`transformer` on text data). Precisions: fp32 (highest matmul
precision), tf32, bf16 and fp16 (autocast; fp16 with a dynamic GradScaler). Needs the
`compare` extra: `pip install 'jaxbig[compare]'`.
"""

from __future__ import annotations

import math
import time

import numpy as np

from jaxbig.config import ConfigError

MODELS = ('cnn', 'lstm', 'gru', 'transformer')
PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16')


def _torch():
  try:
    import torch
  except ImportError:
    raise ConfigError("PyTorch rows need torch: pip install 'jaxbig[compare]'") from None
  return torch


def check(config, row_name: str) -> None:
  """ConfigError unless this row's model and precision have a PyTorch reference."""
  _torch()
  name = config.model.name
  lm = config.data.name in ('stdlib', 'text')
  if name not in MODELS or (name != 'cnn' and not lm):
    raise ConfigError(f'row {row_name}: no PyTorch reference for model.name={name} on '
                      f'data.name={config.data.name}; references: cnn, and lstm, gru and '
                      'transformer language models')
  if config.precision not in PRECISIONS:
    raise ConfigError(f'row {row_name}: the PyTorch reference runs precision '
                      f"{'|'.join(PRECISIONS)}, not {config.precision}")


def build(config, meta):
  """The torch.nn.Module of config.model, for data described by `meta`."""
  torch = _torch()
  nn = torch.nn
  m = config.model

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      h, w, c = meta.input_shape
      layers = []
      for width in m.features:  # 3x3 SAME conv, ReLU, 2x2 max-pool (ceil: SAME padding).
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
                   nn.MaxPool2d(2, 2, ceil_mode=True)]
        h, w, c = -(-h // 2), -(-w // 2), width
      self.features = nn.Sequential(*layers)
      self.head = nn.Sequential(nn.Flatten(), nn.Linear(h * w * c, m.hidden), nn.ReLU(),
                                nn.Dropout(m.dropout), nn.Linear(m.hidden, meta.num_outputs))

    def forward(self, x_BxCxHxW):
      return self.head(self.features(x_BxCxHxW))

  class RNNLM(nn.Module):
    def __init__(self):
      super().__init__()
      embed = m.embed_dim or m.hidden
      self.embed = nn.Embedding(meta.vocab_size, embed)
      cell = nn.LSTM if m.name == 'lstm' else nn.GRU
      self.rnn = cell(embed, m.hidden, m.depth, batch_first=True,
                      dropout=m.dropout if m.depth > 1 else 0.0)
      self.drop = nn.Dropout(m.dropout)
      self.logits = nn.Linear(m.hidden, meta.vocab_size, bias=False)
      if m.tie_embeddings:
        self.logits.weight = self.embed.weight

    def forward(self, tokens_BxL):
      y, _ = self.rnn(self.embed(tokens_BxL))
      return self.logits(self.drop(y))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      d, mlp = m.width, m.get('mlp_dim', 0) or int(round(m.width * m.mlp_ratio))
      self.heads = m.heads
      self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.out = nn.Linear(d, d, bias=False)
      self.mlp = nn.Sequential(nn.Linear(d, mlp, bias=False), nn.GELU(approximate='tanh'),
                               nn.Linear(mlp, d, bias=False))
      self.drop = nn.Dropout(m.dropout)

    def forward(self, x_BxLxE, cos, sin):
      b, l, d = x_BxLxE.shape
      qkv = self.qkv(self.attn_norm(x_BxLxE)).view(b, l, 3, self.heads, d // self.heads)
      q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # Each B x H x L x D.
      if m.pos == 'rope':
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
      a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
      x_BxLxE = x_BxLxE + self.drop(self.out(a.transpose(1, 2).reshape(b, l, d)))
      return x_BxLxE + self.drop(self.mlp(self.mlp_norm(x_BxLxE)))

  def _rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

  class TransformerLM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(meta.vocab_size, m.width)
      self.pos = nn.Embedding(m.max_len, m.width) if m.pos == 'learned' else None
      self.drop = nn.Dropout(m.dropout)
      self.blocks = nn.ModuleList(Block() for _ in range(m.depth))
      self.norm = nn.RMSNorm(m.width)
      self.logits = nn.Linear(m.width, meta.vocab_size, bias=False)
      if m.tie_embeddings:
        self.logits.weight = self.embed.weight
      half = m.width // m.heads // 2
      inv_freq = 10_000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
      angles = torch.arange(m.max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
      self.register_buffer('cos', angles.cos(), persistent=False)
      self.register_buffer('sin', angles.sin(), persistent=False)
      # GPT-2's initialisation, as jaxbig's (and nanoGPT's): N(0, init_std) weights, the
      # residual-output projections scaled by 1/sqrt(2 depth). PyTorch's defaults (N(0, 1)
      # embeddings) would start a tied model at a loss near 30.
      for name, p in self.named_parameters():
        if p.ndim == 2:
          std = m.init_std / math.sqrt(2 * m.depth) if name.endswith(
              ('out.weight', 'mlp.2.weight')) else m.init_std
          torch.nn.init.normal_(p, 0.0, std)

    def forward(self, tokens_BxL):
      length = tokens_BxL.shape[1]
      x = self.embed(tokens_BxL)
      if self.pos is not None:
        x = x + self.pos.weight[:length]
      x = self.drop(x)
      cos, sin = self.cos[:length], self.sin[:length]
      for block in self.blocks:
        x = block(x, cos, sin)
      return self.logits(self.norm(x))

  return {'cnn': CNN, 'lstm': RNNLM, 'gru': RNNLM, 'transformer': TransformerLM}[m.name]()


class Runner:
  """One training step of the reference model on a fixed batch; `step()` returns seconds."""

  def __init__(self, config, meta, batch: dict, device_platform: str):
    torch = self.torch = _torch()
    self.device = torch.device('cuda' if device_platform == 'gpu' and
                               torch.cuda.is_available() else 'cpu')
    torch.manual_seed(config.seed)
    torch.set_float32_matmul_precision('high' if config.precision == 'tf32' else 'highest')
    self.model = build(config, meta).to(self.device).train()
    x, y = np.asarray(batch['x']), np.asarray(batch['y'])
    if config.model.name == 'cnn':
      x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW.
    self.x = torch.from_numpy(x).to(self.device)
    self.y = torch.from_numpy(y.astype(np.int64)).to(self.device)
    o = config.opt
    if o.name != 'adamw':
      raise ConfigError(f'the PyTorch reference uses AdamW; opt.name={o.name} is not mirrored')
    params = [p for p in self.model.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    self.opt = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': o.weight_decay}, {'params': rest, 'weight_decay': 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    self.clip = o.clip_norm
    from jaxbig import optim
    total = config.train.steps
    self.lrs = np.asarray(optim.schedule(o, total)(np.arange(total + 1)), np.float64)
    self.count = 0
    self.autocast = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(config.precision)
    self.scaler = (torch.amp.GradScaler(self.device.type) if config.precision == 'fp16'
                   else None)
    self.loss = None

  def _sync(self):
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def step(self) -> float:
    torch = self.torch
    t = time.perf_counter()
    lr = float(self.lrs[min(self.count, len(self.lrs) - 1)])
    for group in self.opt.param_groups:
      group['lr'] = lr
    self.count += 1
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                        enabled=self.autocast is not None):
      logits = self.model(self.x)
      loss = torch.nn.functional.cross_entropy(
          logits.float().reshape(-1, logits.shape[-1]), self.y.reshape(-1))
    if self.scaler is not None:
      self.scaler.scale(loss).backward()
      self.scaler.unscale_(self.opt)
    else:
      loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    if self.scaler is not None:
      self.scaler.step(self.opt)
      self.scaler.update()
    else:
      self.opt.step()
    self._sync()
    dt = time.perf_counter() - t
    self.loss = loss
    return dt

  def final_loss(self) -> float:
    return float(self.loss.detach().float().cpu())

  def peak_memory(self) -> int | None:
    if self.device.type == 'cuda':
      return int(self.torch.cuda.max_memory_allocated(self.device))
    return None

  def environment(self) -> dict:
    torch = self.torch
    return {'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
            'torch_device': str(self.device)}


def compiled(runner: Runner) -> float:
  """Wraps the runner's model in torch.compile; returns the seconds of the first (compiling)
  step."""
  runner.model = runner.torch.compile(runner.model)
  return runner.step()

