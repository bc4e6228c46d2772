"""Tables from benchmark results: `jaxbig report DIR` and `jaxbig bench compare OLD NEW`.

`report` renders DIR/results.jsonl as Markdown (DIR/report.md): one table of every row; the
jaxbig / PyTorch ratios of rows timed together; for rows that differ only in batch, width
or sequence length, the growth exponent of step time (a slope on log-log axes); and PNG
plots (with matplotlib, the `plots` extra). `compare` matches rows by name and flags a change of median step time
larger than the run-to-run spread the two rows measured themselves (their p10-p90 widths).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.memory import fmt_bytes


def read(path: str, skipped: bool = False) -> list[dict]:
  """The measured rows of a results.jsonl, or of DIR/results.jsonl (with `skipped`, the
  rows the suite skipped instead, each {suite, name, skipped: reason})."""
  if os.path.isdir(path):
    path = os.path.join(path, 'results.jsonl')
  if not os.path.isfile(path):
    raise ConfigError(f'{path}: no benchmark results (run jaxbig bench first)')
  rows = []
  try:
    with open(path, encoding='utf-8') as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:
            raise ConfigError(f'{path}:{i}: not a JSON row') from None
          _check_row(path, i, rows[-1])
  except UnicodeDecodeError:  # A binary file given by mistake.
    raise ConfigError(f'{path}: not a text file of JSON rows (jaxbig bench results)') from None
  if skipped:
    return [r for r in rows if 'skipped' in r]
  rows = [r for r in rows if 'skipped' not in r]
  if not rows:
    raise ConfigError(f'{path}: has no measured rows')
  return rows


# What the tables read of every measured row.
ROW_FIELDS = ('suite', 'name', 'framework', 'model', 'precision', 'batch', 'step_time_s',
              'samples_per_s', 'tokens_per_s', 'mfu', 'peak_memory_bytes', 'energy', 'loss',
              'compile_s', 'env')


def _check_row(path: str, i: int, row) -> None:
  """A row of some other JSON file would fail deep in the tables: refuse it here."""
  if not isinstance(row, dict):
    raise ConfigError(f'{path}:{i}: not a jaxbig bench row (a JSON object)')
  if 'skipped' in row:
    return
  missing = [k for k in ROW_FIELDS if k not in row]
  times = row.get('step_time_s')
  if not missing and not (isinstance(times, dict) and {'median', 'p10', 'p90'} <= set(times)):
    missing = ['step_time_s.median/p10/p90']
  if missing:
    raise ConfigError(f"{path}:{i}: not a jaxbig bench row (no {', '.join(missing)})")


def _num(x, fmt: str) -> str:
  return '-' if x is None else format(x, fmt)


def _section(rows: list[dict], title: str, intro: str, columns: tuple, cells) -> list[str]:
  """A titled Markdown table of `cells(row)` for each row; nothing without rows."""
  if not rows:
    return []
  return (['', title, '', intro, '', '| ' + ' | '.join(columns) + ' |',
           '| ' + ' | '.join('---' for _ in columns) + ' |']
          + ['| ' + ' | '.join(str(c) for c in cells(r)) + ' |' for r in rows])


def table(rows: list[dict]) -> str:
  head = ('| row | framework | model | precision | batch | step ms (p10-p90) | samples/s | tokens/s | MFU '
          '| peak memory | J/step | samples/J | loss | compile s |')
  lines = [head, '|' + ' --- |' * head.count(' | ') + ' --- |']
  for r in rows:
    t = r['step_time_s']
    e = r['energy']
    precision = r['precision'] + (' (emulated)' if r.get('emulated') else '')
    lines.append(
        f"| {r['name']} | {r['framework']} | {r['model']} | {precision} | {r['batch']} "
        f"| {t['median'] * 1e3:.3g} ({t['p10'] * 1e3:.3g}-{t['p90'] * 1e3:.3g})"
        f"{'' if r.get('warmup_settled', True) else ' unsettled'} "
        f"| {r['samples_per_s']:.4g} | {_num(r['tokens_per_s'], '.4g')} "
        f"| {_num(r['mfu'], '.3f')} | {fmt_bytes(r['peak_memory_bytes']['compiled'], 1)} "
        f"| {_num(e['joules_per_step'], '.3g')} | {_num(e['samples_per_joule'], '.4g')} "
        f"| {r['loss']:.4g} | {_num(r['compile_s'], '.1f')} |")
  return '\n'.join(lines)


# Overrides a suite sweeps, and the name of each axis in tables and plots.
AXES = {'data.batch_size': 'batch', 'model.width': 'width', 'model.hidden': 'width',
        'data.seq_len': 'sequence length'}


def _settings(r: dict) -> dict:
  """The row's overrides as {key: value}, with its batch size always present."""
  out = dict(o.split('=', 1) for o in r.get('overrides', []))
  out['data.batch_size'] = str(r['batch'])
  return out


def sweeps(rows: list[dict]) -> list[dict]:
  """For each group of rows that differ only in one swept override (AXES), the least-squares
  slope of log step time on log value: the growth exponent (1: time grows in proportion;
  below 1: the larger size uses the device better)."""
  out = []
  for key, axis in AXES.items():
    groups: dict[str, list] = {}
    for r in rows:
      o = _settings(r)
      try:
        value = float(o.pop(key))
      except (KeyError, ValueError):
        continue
      group = json.dumps([r['experiment'], r['precision'], r['mesh'], r['framework'],
                          sorted(o.items())])
      groups.setdefault(group, []).append((value, r))
    for members in groups.values():
      members.sort(key=lambda m: m[0])
      values = [v for v, _ in members]
      if len(set(values)) < 2:
        continue
      times = [r['step_time_s']['median'] for _, r in members]
      slope = float(np.polyfit(np.log(values), np.log(times), 1)[0])
      first = members[0][1]
      out.append({'axis': axis, 'key': key, 'rows': [r['name'] for _, r in members],
                  'values': [int(v) if v.is_integer() else v for v in values],
                  'step_s': times, 'exponent': slope,
                  'label': f"{first['model']} {first['precision']} ({first['framework']})"})
  return out


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
  """(jaxbig row, PyTorch row) for every PyTorch reference row and the row it was timed with."""
  by_name = {r['name']: r for r in rows}
  return [(by_name[r['pair']], r) for r in rows
          if r['framework'] == 'pytorch' and r.get('pair') in by_name]


def pair_table(rows: list[dict]) -> str:
  head = ('| row | model | precision | batch | jaxbig ms | PyTorch ms | PyTorch / jaxbig time '
          '| jaxbig samples/J | PyTorch samples/J |')
  lines = [head, '|' + ' --- |' * (head.count(' | ') + 1)]
  for j, t in pairs(rows):
    a, b = j['step_time_s']['median'], t['step_time_s']['median']
    mode = f" ({t.get('pytorch_mode', 'eager')})"
    lines.append(
        f"| {j['name']} | {j['model']} | {j['precision']} | {j['batch']} | {a * 1e3:.3g} "
        f"| {b * 1e3:.3g}{mode} | {b / a:.2f} | {_num(j['energy']['samples_per_joule'], '.4g')} "
        f"| {_num(t['energy']['samples_per_joule'], '.4g')} |")
  return '\n'.join(lines)


def _precision_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
  """Rows of one framework that differ only in precision, labelled by their common setup."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    o = _settings(r)
    o.pop('precision', None)
    key = json.dumps([r['experiment'], r['mesh'], r['framework'], sorted(o.items())])
    groups.setdefault(key, []).append(r)
  out = []
  for members in groups.values():
    if len({m['precision'] for m in members}) > 1:
      first = members[0]
      label = f"{first['model']} b{first['batch']}"
      out.append((label + ('' if first['framework'] == 'jaxbig' else ' (PyTorch)'), members))
  return out


def plots(rows: list[dict], folder: str) -> tuple[list[tuple[str, str]], str | None]:
  """Writes the PNG plots into `folder`; returns ([(title, file name)], a note or None).

  step_time_by_precision.png and samples_per_joule_by_precision.png: bars per precision for
  every group of rows that differ only in precision; sweep_<axis>.png: step time against
  the swept value on log-log axes, one line per group, its growth exponent in the legend.
  """
  try:
    import matplotlib
  except ImportError:
    return [], "plots need matplotlib: pip install 'jaxbig[plots]'"
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  written = []

  def save(fig, name, title):
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=100)
    plt.close(fig)
    written.append((title, name))

  groups = _precision_groups(rows)
  metrics = [('step_time_by_precision.png', 'step time (ms; bars p10-p90)',
              lambda r: r['step_time_s']['median'] * 1e3)]
  note = None
  if any(r['energy']['samples_per_joule'] for _, m in groups for r in m):
    metrics.append(('samples_per_joule_by_precision.png', 'samples per joule',
                    lambda r: r['energy']['samples_per_joule']))
  elif groups:
    note = 'no samples/J plot: ' + (rows[0]['energy']['reason'] or 'no energy readings')
  for name, ylabel, value in metrics if groups else []:
    precisions = sorted({r['precision'] for _, m in groups for r in m},
                        key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(precisions)
    for i, p in enumerate(precisions):
      xs, ys, errors = [], [], [[], []]
      for g, (_, members) in enumerate(groups):
        r = next((m for m in members if m['precision'] == p), None)
        if r is not None and value(r) is not None:
          xs.append(g + (i - (len(precisions) - 1) / 2) * width)
          ys.append(value(r))
          t = r['step_time_s']
          errors[0].append((t['median'] - t['p10']) * 1e3)
          errors[1].append((t['p90'] - t['median']) * 1e3)
      ax.bar(xs, ys, width, label=p, yerr=errors if name.startswith('step') else None,
             capsize=2)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.set_yscale('log')
    ax.set_ylabel(ylabel)
    ax.legend(fontsize='small')
    save(fig, name, f"{ylabel.split(' (')[0]} per precision")
  by_axis: dict[str, list[dict]] = {}
  for sweep in sweeps(rows):
    by_axis.setdefault(sweep['axis'], []).append(sweep)
  for axis, members in by_axis.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for sweep in members:
      ax.plot(sweep['values'], [t * 1e3 for t in sweep['step_s']], 'o-',
              label=f"{sweep['label']}: exponent {sweep['exponent']:.2f}")
    ax.set_xscale('log')
    ax.set_yscale('log')
    ticks = sorted({v for sweep in members for v in sweep['values']})
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel(axis)
    ax.set_ylabel('step time (ms)')
    ax.legend(fontsize='small')
    save(fig, f"sweep_{axis.replace(' ', '_')}.png", f'step time against {axis}')
  return written, note


PRECISION_ORDER = ('fp32', 'tf32', 'bf16', 'fp16', 'fp8', 'int8')


def render(path: str, figures: list[tuple[str, str]] = (), note: str | None = None) -> str:
  rows = read(path)
  skipped = read(path, skipped=True)
  env = rows[0]['env']
  parts = [f"# Benchmark: {rows[0]['suite']}", '']
  if rows[0].get('command'):
    parts += ['Reproduce:', '', f"    {rows[0]['command']}", f"    jaxbig report {path}", '']
  torch_env = next((r['env'] for r in rows if r['framework'] == 'pytorch'), None)
  parts += [
      f"{env['device_kind']} x {env['num_devices']}; jax {env['jax']}, flax {env['flax']}"
      + (f", torch {torch_env['torch']} ({torch_env['torch_threads']} threads)"
         if torch_env else '')
      + f"; git {env['git_sha'] or 'unknown'}; XLA_FLAGS='{env['xla_flags']}'"
      + (f"; GLIBC_TUNABLES='{env['glibc_tunables']}'" if env.get('glibc_tunables') else '')
      + f". MFU basis: {rows[0]['mfu_basis']}. Energy: {rows[0]['energy']['method']}"
      + (f" ({rows[0]['energy']['reason']})" if rows[0]['energy']['reason'] else '') + '.',
      '',
      table(rows),
  ]
  if skipped:
    parts += ['', 'Skipped: ' + '; '.join(f"{r['name']} ({r['skipped']})" for r in skipped)
              + '.']
  if pairs(rows):
    parts += ['', '## jaxbig and PyTorch, timed in alternating windows', '',
              'Ratios above 1: PyTorch takes longer per step.', '', pair_table(rows)]
  parts += _section(
      [r for r in rows if r.get('loop')], '## The training loop against the bare step',
      'The loop runs as `jaxbig train` does (input pipeline, logging), median over the '
      'second half of its log intervals; host overhead = 1 - step / loop step; input wait: '
      "the share of the loop's time spent waiting for the next batch.",
      ('row', 'step ms', 'loop step ms', 'loop steps', 'host overhead', 'input wait'),
      lambda r: (r['name'], f"{r['step_time_s']['median'] * 1e3:.3g}",
                 f"{r['loop']['step_time_s'] * 1e3:.3g}", r['loop']['steps'],
                 f"{r['loop']['host_overhead']:.1%}",
                 f"{r['loop']['input_wait']:.1%}" if 'input_wait' in r['loop'] else '-'))
  parts += _section(
      [r for r in rows if r.get('input')], '## The input pipeline alone, beside the step',
      "One process's batches (its rows of the global batch), mean time per batch; "
      'input / step above 1 means the pipeline cannot keep the step fed.',
      ('row', 'input ms per batch', 'samples/s', 'tokens/s', 'step ms', 'input / step'),
      lambda r: (r['name'], f"{r['input']['batch_time_s'] * 1e3:.3g}",
                 f"{r['input']['samples_per_s']:.4g}", _num(r['input']['tokens_per_s'], '.4g'),
                 f"{r['step_time_s']['median'] * 1e3:.3g}",
                 f"{r['input']['per_step']:.3f}"
                 + (' (input-bound)' if r['input']['bounds_step'] else '')))
  found = sweeps(rows)
  if found:
    parts += ['', '## Step time against size (slope on log-log axes)', '']
    parts += [f"- {s['label']}, {s['axis']} {sorted(set(s['values']))}: exponent "
              f"{s['exponent']:.2f} "
              f"(rows {', '.join(s['rows'])})" for s in found]
  return '\n'.join(parts + plots_section(figures, note)) + '\n'


def plots_section(figures: list[tuple[str, str]], note: str | None) -> list[str]:
  """Markdown lines of a '## Plots' section: the (title, file) figures and why some are
  missing (`note`); none when there is neither."""
  if not figures and not note:
    return []
  lines = ['', '## Plots', ''] + [f'![{title}]({name})' for title, name in figures]
  return lines + (['', f'({note})'] if note else [])


def report(path: str) -> str:
  """Writes DIR/report.md and the plots beside it (replacing older ones: they are derived)
  and returns the Markdown."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  figures, note = plots(read(path), folder)
  text = render(path, figures, note)
  out = os.path.join(folder, 'report.md')
  with open(out + '.tmp', 'w') as f:
    f.write(text)
  os.replace(out + '.tmp', out)
  return text


def compare(old_path: str, new_path: str) -> tuple[list[dict], str]:
  """Rows in both, with the relative change of median step time and whether it exceeds the
  rows' own spread; and the Markdown table of them."""
  old = {r['name']: r for r in read(old_path)}
  new = {r['name']: r for r in read(new_path)}
  common = [n for n in new if n in old]
  if not common:
    raise ConfigError(f'{old_path} and {new_path} share no row name')
  out = []
  for name in common:
    a, b = old[name]['step_time_s'], new[name]['step_time_s']
    change = b['median'] / a['median'] - 1
    spread = max((a['p90'] - a['p10']) / a['median'], (b['p90'] - b['p10']) / b['median'])
    out.append({'name': name, 'old_s': a['median'], 'new_s': b['median'], 'change': change,
                'spread': spread, 'flagged': abs(change) > spread})
  lines = ['| row | old ms | new ms | change | spread | |', '| --- | --- | --- | --- | --- | --- |']
  for c in out:
    mark = ('slower' if c['change'] > 0 else 'faster') if c['flagged'] else ''
    lines.append(f"| {c['name']} | {c['old_s'] * 1e3:.3g} | {c['new_s'] * 1e3:.3g} "
                 f"| {c['change']:+.1%} | {c['spread']:.1%} | {mark} |")
  only = sorted(set(old) ^ set(new))
  if only:
    lines += ['', f"Rows in only one of them: {', '.join(only)}"]
  return out, '\n'.join(lines) + '\n'
