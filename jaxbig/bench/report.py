"""Tables from benchmark results: `jaxbig report DIR` and `jaxbig bench compare OLD NEW`.

`report` renders DIR/results.jsonl as Markdown (DIR/report.md): one table of every row, and
for rows that differ only in batch size, the exponent of step time against batch (a slope
on log-log axes: 1 means time grows in proportion, below 1 that larger batches use the
device better). `compare` matches rows by name and flags a change of median step time
larger than the run-to-run spread the two rows measured themselves (their p10-p90 widths).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxbig.config import ConfigError


def read(path: str) -> list[dict]:
  """The rows of a results.jsonl, or of DIR/results.jsonl."""
  if os.path.isdir(path):
    path = os.path.join(path, 'results.jsonl')
  if not os.path.isfile(path):
    raise ConfigError(f'{path}: no benchmark results (run jaxbig bench first)')
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          raise ConfigError(f'{path}:{i}: not a JSON row') from None
  if not rows:
    raise ConfigError(f'{path}: has no rows')
  return rows


def _num(x, fmt: str) -> str:
  return '-' if x is None else format(x, fmt)


def _bytes(n) -> str:
  if n is None:
    return '-'
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{n} B'


def table(rows: list[dict]) -> str:
  head = ('| row | model | precision | batch | step ms (p10-p90) | samples/s | tokens/s | MFU '
          '| peak memory | J/step | samples/J | loss | compile s |')
  lines = [head, '|' + ' --- |' * head.count(' | ') + ' --- |']
  for r in rows:
    t = r['step_time_s']
    e = r['energy']
    precision = r['precision'] + (' (emulated)' if r.get('emulated') else '')
    lines.append(
        f"| {r['name']} | {r['model']} | {precision} | {r['batch']} "
        f"| {t['median'] * 1e3:.3g} ({t['p10'] * 1e3:.3g}-{t['p90'] * 1e3:.3g}) "
        f"| {r['samples_per_s']:.4g} | {_num(r['tokens_per_s'], '.4g')} "
        f"| {_num(r['mfu'], '.3f')} | {_bytes(r['peak_memory_bytes']['compiled'])} "
        f"| {_num(e['joules_per_step'], '.3g')} | {_num(e['samples_per_joule'], '.4g')} "
        f"| {r['loss']:.4f} | {r['compile_s']:.1f} |")
  return '\n'.join(lines)


def batch_exponents(rows: list[dict]) -> list[dict]:
  """Least-squares slope of log step time on log batch for each group of rows that differ
  only in batch size (same model, precision, mesh and other overrides)."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    rest = [o for o in r.get('overrides', []) if not o.startswith('data.batch_size=')]
    key = json.dumps([r['experiment'], r['precision'], r['mesh'], rest, r['framework']])
    groups.setdefault(key, []).append(r)
  out = []
  for members in groups.values():
    batches = sorted({m['batch'] for m in members})
    if len(batches) < 2:
      continue
    x = np.log([m['batch'] for m in members])
    y = np.log([m['step_time_s']['median'] for m in members])
    slope = float(np.polyfit(x, y, 1)[0])
    out.append({'rows': [m['name'] for m in members], 'batches': batches, 'exponent': slope})
  return out


def render(path: str) -> str:
  rows = read(path)
  env = rows[0]['env']
  parts = [
      f"# Benchmark: {rows[0]['suite']}",
      '',
      f"{env['device_kind']} x {env['num_devices']}; jax {env['jax']}, flax {env['flax']}, "
      f"git {env['git_sha'] or 'unknown'}; XLA_FLAGS='{env['xla_flags']}'. MFU basis: "
      f"{rows[0]['mfu_basis']}. Energy: {rows[0]['energy']['method']}"
      + (f" ({rows[0]['energy']['reason']})" if rows[0]['energy']['reason'] else '') + '.',
      '',
      table(rows),
  ]
  exps = batch_exponents(rows)
  if exps:
    parts += ['', 'Step time against batch size (slope on log-log axes):', '']
    parts += [f"- {', '.join(e['rows'])}: batches {e['batches']}, exponent {e['exponent']:.2f}"
              for e in exps]
  return '\n'.join(parts) + '\n'


def report(path: str) -> str:
  """Writes DIR/report.md (replacing an older report: it is derived) and returns its text."""
  text = render(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
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
