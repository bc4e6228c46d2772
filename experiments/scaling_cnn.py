"""Scaling study: the digits CNN at width multipliers 1/8 to 2 (cnn_digits' setup).

Command:   jaxbig sweep experiments/scaling_cnn.py[:variant] --out DIR [key=value ...]
           jaxbig report DIR          (table, fits, train/validation gap -> DIR/report.md)
Variants:  ''    five widths x three seeds, the same number of training examples each
                 (800 steps of 64); the report averages the seeds of each width
           tiny  two tiny widths, one seed, a few steps (tests)
Hardware:  any CPU; 2 cores are enough.
Wall time: '' 2.2 min on a 2-core Intel Xeon VM.
Expected:  every width fits the 1,257 training images; mean val loss 0.091 at x1/2, 0.145
           at x1 and 0.161 at x2: the train/validation gap opens above x1/2
           (benchmarks/results/scaling/cnn).

The size rule: multiplier m scales every width: features (64 m, 128 m), hidden 1024 m;
parameters grow about as m^2, so 1/8..2 spans about 200x. No dropout and no shifts here
(cnn_digits uses both), so that the gap shows what size alone does.
"""

import ml_collections

import cnn_digits

# (multipliers, steps, batch, seeds) per family. A seed sets the initialisation and the
# order of the training batches; the train/validation split stays the same (data.split_seed).
FAMILIES = {'': ((0.125, 0.25, 0.5, 1.0, 2.0), 800, 64, (0, 1, 2)),
            'tiny': ((0.0625, 0.125), 6, 32, (0,))}


def _family(arg: str) -> str:
  if arg not in FAMILIES:
    raise ValueError(f"unknown variant '{arg}'; choose from '', tiny")
  return arg


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """cnn_digits without regularisers, with the family's batch; widths come from sweep()."""
  _, _, batch, _ = FAMILIES[_family(arg)]
  c = cnn_digits.get_config('smoke' if arg == 'tiny' else '')
  c.data.batch_size = batch  # Images per step.
  c.data.augment_shift = 0  # No shifts: the gap is the model's alone.
  c.model.dropout = 0.0  # No dropout, for the same reason.
  c.train.eval_every = 0  # Validation only at the end.
  return c


def sweep(arg: str = '') -> list[tuple[str, list[str]]]:
  """The members of the family: (name, overrides), smallest first."""
  multipliers, steps, _, seeds = FAMILIES[_family(arg)]
  members = []
  for m in multipliers:
    f1, f2, hidden = max(1, round(64 * m)), max(1, round(128 * m)), max(1, round(1024 * m))
    for seed in seeds:
      members.append((f'x{m:g}' + (f'-s{seed}' if len(seeds) > 1 else ''), [
          f'model.features={f1},{f2}', f'model.hidden={hidden}', f'seed={seed}',
          f'train.steps={steps}',
          f'opt.warmup_steps={max(1, min(50, steps // 10))}',
          f'train.log_every={max(1, min(50, steps // 10))}',
          f'train.ckpt_every={max(1, steps // 4)}',
      ]))
  return members
