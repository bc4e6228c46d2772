"""Scaling study: a family of byte-level GPTs on the standard library (gpt_stdlib's setup).

Command:   jaxbig sweep experiments/scaling_gpt.py[:variant] --out DIR [key=value ...]
           jaxbig report DIR          (table, power-law fits, plots -> DIR/report.md)
Variants:  ''       five sizes, the same token budget each (2^20 tokens: 256 steps)
           compute  the same sizes, compute-matched: 6 * N * tokens equal to the middle
                    size's at the token budget (the smallest trains longest)
           tiny     two tiny sizes, a few steps (tests and a first look; seconds)
           gpu      a larger family for one GPU or TPU host: depths 2-12, 2^27 tokens,
                    bf16; add ',compute' (gpu,compute) for its compute-matched variant
Hardware:  '' and compute: any CPU, sized for 2 cores; gpu: one accelerator.
Wall time: '' 8.6 min and compute 8.5 min, measured on a 2-core Intel Xeon VM; gpu not run.
Expected:  '' : val loss falls with size, 2.166 (d1) to 1.726 nats/byte (d5); the fit
           L = a N^-b + c gives b = 0.152 +- 0.05. compute: best at d2 (1.530) and d1
           (1.539), rising to 2.813 at d5. benchmarks/results/scaling/gpt*.

The size rule: depth d, width 64 * d (head_width * d for tiny), d heads of 64 features,
feed-forward 4x, peak learning rate LR_WIDTH / width; non-embedding parameters about
12 * d * width^2, so depths 1..5 span about 125x. Every member's folder is DIR/<member>;
an interrupted sweep continues there.
"""

import ml_collections

import gpt_stdlib

# (depths, head width, tokens per member, sequence length, batch, precision) per family.
FAMILIES = {
    'cpu': ((1, 2, 3, 4, 5), 64, 2**20, 128, 32, 'fp32'),
    'tiny': ((1, 2), 16, 2**11, 32, 8, 'fp32'),
    'gpu': ((2, 4, 6, 8, 12), 64, 2**27, 256, 64, 'bf16'),
}


# Peak learning rate = LR_WIDTH / width: Adam's update size per weight is about lr, so a
# wider layer changes its output by about width * lr; keeping that product fixed keeps the
# step the same size across widths (the muP rule for hidden layers). Calibrated on d5-w320
# at the token budget (256 steps): lr 4e-3, 2e-3 and 1e-3 gave val loss 2.038, 1.743 and
# 1.726, so 1e-3 * 320. With one lr for all (4e-3), the d4 and d5 models did worse than d3.
LR_WIDTH = 0.32


def _parse(arg: str) -> tuple[str, bool]:
  """(family, compute-matched) of a variant such as '', 'compute', 'tiny', 'gpu,compute'."""
  words = [w for w in arg.split(',') if w]
  unknown = [w for w in words if w not in ('compute', 'tiny', 'gpu')]
  if unknown or len(set(words)) != len(words) or {'tiny', 'gpu'} <= set(words):
    raise ValueError(f"unknown variant '{arg}'; choose from '', compute, tiny, tiny,compute, "
                     'gpu, gpu,compute')
  family = 'tiny' if 'tiny' in words else 'gpu' if 'gpu' in words else 'cpu'
  return family, 'compute' in words


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """gpt_stdlib with the family's sequence length, batch and precision; sizes come from sweep()."""
  family, _ = _parse(arg)
  _, _, _, seq_len, batch, precision = FAMILIES[family]
  c = gpt_stdlib.get_config('smoke' if family == 'tiny' else '')
  c.data.seq_len = seq_len  # Bytes per training window.
  c.data.batch_size = batch  # Windows per step (tokens per step: batch * seq_len).
  c.model.max_len = seq_len  # Positions the model needs (RoPE; no table).
  c.train.eval_every = 0  # Validation only at the end: the study compares final losses.
  c.precision = precision  # fp32 on CPUs; bf16 on accelerators.
  return c


def non_embedding_params(depth: int, width: int, mlp_ratio: int = 4) -> int:
  """The rule's matmul parameters: attention 4 w^2 and feed-forward 2 * ratio * w^2 per block."""
  return depth * (4 + 2 * mlp_ratio) * width * width


def sweep(arg: str = '') -> list[tuple[str, list[str]]]:
  """The members of the family: (name, overrides), smallest first."""
  family, compute = _parse(arg)
  depths, head_width, tokens, seq_len, batch, _ = FAMILIES[family]
  per_step = seq_len * batch
  reference = non_embedding_params(depths[len(depths) // 2], head_width * depths[len(depths) // 2])
  members = []
  for d in depths:
    width = head_width * d
    n = non_embedding_params(d, width)
    # Compute-matched: 6 * n * tokens equals the middle size's 6 * reference * tokens.
    member_tokens = tokens * reference / n if compute else tokens
    steps = max(1, round(member_tokens / per_step))
    members.append((f'd{d}-w{width}', [
        f'model.depth={d}', f'model.width={width}', f'model.heads={d}',
        f'opt.lr={LR_WIDTH / width:.4g}',
        f'train.steps={steps}',
        f'opt.warmup_steps={max(1, min(50, steps // 10))}',
        f'train.log_every={max(1, min(50, steps // 10))}',
        f'train.ckpt_every={max(1, steps // 4)}',  # An interrupted member loses little.
    ]))
  return members
