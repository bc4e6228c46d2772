"""`jaxbig report DIR` on a sweep folder (DIR/sweep.json): a table per member, power-law
fits of validation loss against size and compute, and PNG plots (with matplotlib).

The fit is L = a * N^(-b) + c by least squares (scipy's curve_fit), with N divided by the
points' geometric mean N0 while fitting so that the three parameters have like scales;
a is then converted back (a = A * N0^b). The uncertainties are one standard deviation
from the fit's covariance (scaled by the residuals unless the points carry their own sigma).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxbig.tools.bench.report import plots_section
from jaxbig.config import ConfigError
from jaxbig.memory import fmt_bytes

FILE = 'sweep.json'  # In a sweep's folder: its members and what was measured.
MIN_POINTS = 4  # Three parameters: at least one degree of freedom left for the uncertainty.


def is_sweep(path: str) -> bool:
  return os.path.isfile(os.path.join(path, FILE))


def fit_power_law(x, y, sigma=None) -> dict:
  """Fits y = a * x^(-b) + c; returns a, b, c, their 1-sigma errors (a_err, ...) and x0.

  Raises ValueError (naming the reason) with fewer than MIN_POINTS points, non-positive x,
  or when the fit does not converge.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < MIN_POINTS:
    raise ValueError(f'a fit of 3 parameters needs at least {MIN_POINTS} points, got {len(x)}')
  if np.any(x <= 0) or not np.all(np.isfinite(y)):
    raise ValueError('sizes must be positive and losses finite')
  x0 = float(np.exp(np.mean(np.log(x))))
  u = x / x0

  def model(u, big_a, b, c):
    return big_a * u ** (-b) + c

  # Start from the best b on a grid, with A and c solved linearly for each b.
  best = None
  for b in np.linspace(0.01, 3.0, 300):
    design = np.stack([u ** (-b), np.ones_like(u)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    sse = float(np.sum((design @ coef - y) ** 2))
    if best is None or sse < best[0]:
      best = (sse, coef[0], b, coef[1])
  try:
    p, cov = optimize.curve_fit(model, u, y, p0=best[1:], sigma=sigma,
                                absolute_sigma=sigma is not None, maxfev=20000)
  except (RuntimeError, optimize.OptimizeWarning) as e:
    raise ValueError(f'the fit did not converge: {e}') from None
  big_a, b, c = (float(v) for v in p)
  err = np.sqrt(np.clip(np.diag(cov), 0, None))
  # a = A * x0^b: first-order propagation through A and b (their covariance included).
  scale = x0 ** b
  grad = np.array([scale, big_a * scale * math.log(x0)])
  a_err = float(np.sqrt(max(grad @ cov[:2, :2] @ grad, 0.0)))
  return {'a': big_a * scale, 'b': b, 'c': c, 'a_err': a_err, 'b_err': float(err[1]),
          'c_err': float(err[2]), 'x0': x0, 'a_at_x0': big_a, 'a_at_x0_err': float(err[0]),
          'points': len(x)}


# What the report reads of each member of sweep.json, and of a finished member's summary.
MEMBER_FIELDS = ('name', 'params', 'non_embedding_params', 'flops_per_step', 'unit',
                 'units_per_step', 'steps')
SUMMARY_FIELDS = {'step', 'train_loss', 'val', 'wall_s', 'device_kind', 'num_devices',
                  'precision'}


def _read_json(path: str, what: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):  # UnicodeDecodeError (a binary file) is a ValueError.
    raise ConfigError(f'{path}: not {what}') from None


def read(folder: str) -> tuple[dict, list[dict]]:
  """sweep.json and one row per member: its entry, plus its summary where it finished."""
  path = os.path.join(folder, FILE)
  sweep = _read_json(path, 'a readable sweep file')
  members = sweep.get('members', []) if isinstance(sweep, dict) else None
  if not isinstance(members, list) or 'experiment' not in sweep:
    raise ConfigError(f'{path}: not a jaxbig sweep file (no experiment and members list)')
  for i, m in enumerate(members):
    missing = [k for k in MEMBER_FIELDS if k not in m] if isinstance(m, dict) else MEMBER_FIELDS
    if missing or not isinstance(m['name'], str):
      raise ConfigError(f"{path}: member {i} is not a sweep member (no "
                        f"{', '.join(missing) or 'name string'})")
  rows = []
  for m in members:
    row = dict(m)
    summary_path = os.path.join(folder, m['name'], 'summary.json')
    if os.path.isfile(summary_path):
      summary = _read_json(summary_path, 'a run summary (the sweep command redoes the member)')
      if not isinstance(summary, dict):
        summary = {}
      if summary.get('step') == m['steps']:
        if not SUMMARY_FIELDS <= set(summary) or not isinstance(summary['val'], dict):
          raise ConfigError(f'{summary_path}: not a finished run summary (no '
                            f"{', '.join(sorted(SUMMARY_FIELDS - set(summary))) or 'val'})")
        row['summary'] = summary
    row['units_seen'] = m['steps'] * m['units_per_step']
    row['compute'] = None if m['flops_per_step'] is None else m['flops_per_step'] * m['steps']
    if 'summary' in row:
      row['train_loss'] = row['summary']['train_loss']
      row['val_loss'] = row['summary']['val'].get('loss')
      if row['train_loss'] is not None and row['val_loss'] is not None:
        row['gap'] = row['val_loss'] - row['train_loss']
    rows.append(row)
  return sweep, rows


def _n(x, fmt: str = '.4g') -> str:
  return '-' if x is None else format(x, fmt)


def _memory(row: dict) -> str:
  """The device's measured peak, else XLA's analysis of the compiled train step."""
  if row.get('peak_bytes') is not None:
    return fmt_bytes(row['peak_bytes'], 1)
  estimate = (row.get('summary') or {}).get('train_step_bytes')
  return 'not recorded' if estimate is None else f'{fmt_bytes(estimate, 1)} (XLA)'


def table(rows: list[dict]) -> str:
  unit = rows[0]['unit']
  per = unit[:-1] if unit.endswith('s') else unit
  head = (f'| member | params | non-embedding params | train FLOPs per {per} | {unit} seen '
          '| train FLOPs | train loss | val loss | gap (val - train) | wall s | peak memory '
          '| energy |')
  lines = [head, '|' + ' --- |' * (head.count(' | ') + 1)]
  for r in rows:
    s = r.get('summary')
    fpu = None if r['flops_per_step'] is None else r['flops_per_step'] / r['units_per_step']
    energy = f"{r['energy_j']:.4g} J" if 'energy_j' in r else 'not measured'
    lines.append(
        f"| {r['name']} | {r['params']:,} | {r['non_embedding_params']:,} | {_n(fpu)} "
        f"| {r['units_seen']:,} | {_n(r['compute'])} "
        + (f"| {_n(r.get('train_loss'))} | {_n(r.get('val_loss'))} | {_n(r.get('gap'), '+.4f')} "
           f"| {s['wall_s']:.1f} | {_memory(r)} | {energy} |" if s else
           '| not finished | | | | | |'))
  return '\n'.join(lines)


def by_size(rows: list[dict]) -> list[dict]:
  """The finished members grouped by non-embedding parameters (seeds of one size), smallest
  first: size, members, and the mean and sample standard deviation of train loss, val loss
  and gap."""
  groups: dict[int, list[dict]] = {}
  for r in rows:
    if r.get('val_loss') is not None:
      groups.setdefault(r['non_embedding_params'], []).append(r)
  out = []
  for size, members in sorted(groups.items()):
    entry = {'size': size, 'members': [r['name'] for r in members]}
    for key in ('train_loss', 'val_loss', 'gap'):
      values = np.array([r[key] for r in members if r.get(key) is not None], np.float64)
      entry[key] = float(values.mean()) if len(values) else None
      entry[key + '_sd'] = float(values.std(ddof=1)) if len(values) > 1 else None
    out.append(entry)
  return out


def size_table(groups: list[dict]) -> str:
  """Mean +- sample standard deviation per size, for sweeps with several members per size."""
  lines = ['| non-embedding params | members | train loss | val loss | gap (val - train) |',
           '| --- | --- | --- | --- | --- |']
  for g in groups:
    cells = [f"{_n(g[k])} +- {_n(g[k + '_sd'], '.2g')}" if g[k + '_sd'] is not None
             else _n(g[k]) for k in ('train_loss', 'val_loss', 'gap')]
    lines.append(f"| {g['size']:,} | {len(g['members'])} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def fits(rows: list[dict]) -> dict[str, dict | str]:
  """{axis: fit dict, or the reason there is none} for non-embedding params and compute."""
  done = [r for r in rows if r.get('val_loss') is not None]
  out = {}
  for axis, key in (('non-embedding params', 'non_embedding_params'), ('train FLOPs', 'compute')):
    points = [(r[key], r['val_loss']) for r in done if r[key]]
    xs = [x for x, _ in points]
    if len(xs) >= MIN_POINTS and max(xs) < 2 * min(xs):
      out[axis] = 'no fit: the members span less than 2x on this axis (compute-matched?)'
      continue
    try:
      found = fit_power_law([x for x, _ in points], [y for _, y in points])
    except ValueError as e:
      out[axis] = f'no fit: {e}'
      continue
    # a <= 0 is a curve that rises (or is flat) with size: not a law of diminishing loss.
    out[axis] = found if found['a'] > 0 else (
        f"no fit: the loss does not fall with {axis} here (the best curve has a = "
        f"{found['a']:.3g} <= 0); see the table")
  return out


def _fit_line(axis: str, f: dict | str) -> str:
  if isinstance(f, str):
    return f'- val loss against {axis}: {f}'
  x = 'C' if 'FLOPs' in axis else 'N'
  return (f"- val loss against {axis} ({f['points']} members): L = a * {x}^(-b) + c with "
          f"a = {f['a']:.4g} +- {f['a_err']:.2g}, b = {f['b']:.4f} +- {f['b_err']:.2g}, "
          f"c = {f['c']:.4f} +- {f['c_err']:.2g} (at {x}0 = {f['x0']:.4g}: a * {x}0^(-b) = "
          f"{f['a_at_x0']:.4g} +- {f['a_at_x0_err']:.2g}; 1 sigma)")


def plots(rows: list[dict], found: dict, folder: str) -> tuple[list[tuple[str, str]], str | None]:
  """Writes loss_vs_params.png, loss_vs_compute.png and gap_vs_params.png into `folder`."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return [], "plots need matplotlib: pip install 'jaxbig[plots]'"
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in rows if r.get('val_loss') is not None]
  written = []
  if not done:
    return [], 'no plots: no member has finished'
  for name, axis, key in (('loss_vs_params.png', 'non-embedding params', 'non_embedding_params'),
                          ('loss_vs_compute.png', 'train FLOPs', 'compute')):
    xs = [r[key] for r in done if r[key]]
    ys = [r['val_loss'] for r in done if r[key]]
    if not xs:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, 'o', label='val loss')
    f = found.get(axis)
    if isinstance(f, dict):
      grid = np.geomspace(min(xs), max(xs), 100)
      ax.plot(grid, f['a'] * grid ** (-f['b']) + f['c'], '-',
              label=f"fit: b = {f['b']:.3f} +- {f['b_err']:.2g}, c = {f['c']:.3f}")
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(axis)
    ax.set_ylabel('validation loss')
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=100)
    plt.close(fig)
    written.append((f'val loss against {axis}', name))
  gapped = [g for g in by_size(rows) if g['gap'] is not None]
  if gapped:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([g['size'] for g in gapped], [g['gap'] for g in gapped],
                yerr=[g['gap_sd'] or 0.0 for g in gapped], fmt='o-', capsize=3)
    ax.axhline(0, color='grey', lw=0.5)
    ax.set_xscale('log')
    ax.set_xlabel('non-embedding params')
    ax.set_ylabel('val loss - train loss')
    fig.tight_layout()
    fig.savefig(os.path.join(folder, 'gap_vs_params.png'), dpi=100)
    plt.close(fig)
    written.append(('train/validation gap against size', 'gap_vs_params.png'))
  return written, None


def render(sweep: dict, rows: list[dict], found: dict, figures=(), note=None,
           folder: str = '') -> str:
  variant = f":{sweep['variant']}" if sweep.get('variant') else ''
  parts = [f"# Sweep: {sweep['experiment']}{variant}", '']
  if sweep.get('command'):
    parts += ['Reproduce (the same command continues an interrupted sweep):', '',
              f"    {sweep['command']}", f'    jaxbig report {folder}', '']
  done = sum(1 for r in rows if 'summary' in r)
  first = next((r['summary'] for r in rows if 'summary' in r), None)
  if first:
    parts += [f"{first['device_kind']} x {first['num_devices']}, precision "
              f"{first['precision']}. {done} of {len(rows)} members finished.", '']
  parts += [
      table(rows), '',
      'Train loss: the mean over the last logging interval of training (training mode); val '
      'loss: the final evaluation on the validation split (nats per '
      f"{rows[0]['unit'][:-1]}). Train FLOPs: analytic matmul FLOPs x 3 (jaxbig/tools/bench/flops.py). "
      'Peak memory: device 0\'s peak bytes in use in the sweep\'s process where the backend '
      'counts them; elsewhere (CPUs) XLA\'s memory analysis of the compiled train step '
      '(state, batch and temporaries), marked XLA. Energy: '
      + ('; '.join(sorted({f"{r['name']}: {r['energy_note']}" if 'energy_j' in r
                           else r['energy_note'] for r in rows if r.get('energy_note')}))
         or 'not measured') + '.', '']
  groups = by_size(rows)
  if any(len(g['members']) > 1 for g in groups):
    parts += ['## Per size', '', size_table(groups), '',
              'Mean +- sample standard deviation over the members of each size (seeds); the '
              'fits below use every member.', '']
  parts += ['## Power-law fits', '']
  parts += [_fit_line(axis, f) for axis, f in found.items()]
  return '\n'.join(parts + plots_section(figures, note)) + '\n'


def report(folder: str) -> str:
  """Writes FOLDER/report.md, fits.json and the plots (replacing older ones: they are
  derived) and returns the Markdown."""
  sweep, rows = read(folder)
  if not rows:
    raise ConfigError(f'{os.path.join(folder, FILE)}: lists no members')
  found = fits(rows)
  figures, note = plots(rows, found, folder)
  text = render(sweep, rows, found, figures, note, folder)
  with open(os.path.join(folder, 'fits.json.tmp'), 'w') as f:  # The numbers, for scripts.
    json.dump(found, f, indent=2)
  os.replace(os.path.join(folder, 'fits.json.tmp'), os.path.join(folder, 'fits.json'))
  out = os.path.join(folder, 'report.md')
  with open(out + '.tmp', 'w') as f:
    f.write(text)
  os.replace(out + '.tmp', out)
  return text
