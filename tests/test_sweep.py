"""Tests of sweeps (jaxbig/tools/sweep/run.py) and their report (jaxbig/tools/sweep/report.py).

The power-law fit must recover known parameters from noisy synthetic points, with honest
uncertainties. A two-member tiny sweep of experiments/scaling_gpt.py is interrupted in its
second member, then continued by the `jaxbig sweep` command: the finished member must not
be trained again. Bad input ends in exit 2 and one line, before anything is written.
"""

import json
import math
import os
import pathlib
import re

import numpy as np
import pytest

import conftest
from jaxbig import config as config_lib, train
from jaxbig.tools.sweep import run as sweep
from jaxbig.tools.sweep import report as sweep_report

pytestmark = pytest.mark.slow(reason='trains every member of small sweeps')

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT = str(REPO / 'experiments' / 'scaling_gpt.py')
CNN = str(REPO / 'experiments' / 'scaling_cnn.py')
TRUE = {'a': 40.0, 'b': 0.35, 'c': 1.2}
SIZES = np.geomspace(1e4, 1e7, 8)


def _points(b: float, seed: int, noise: float = 0.01):
  """Losses a * N^-b + c at SIZES with Gaussian noise of `noise` (absolute); for another b,
  a is chosen so that the smallest size has TRUE's loss (the same range of losses)."""
  rng = np.random.default_rng(seed)
  a = TRUE['a'] * SIZES[0] ** (b - TRUE['b'])
  clean = a * SIZES ** (-b) + TRUE['c']
  return clean + noise * rng.standard_normal(len(SIZES))


def test_fit_recovers_known_parameters_within_its_uncertainties():
  f = sweep_report.fit_power_law(SIZES, _points(TRUE['b'], seed=0), sigma=np.full(8, 0.01))
  for k, v in TRUE.items():
    assert abs(f[k] - v) < 3 * f[f'{k}_err'], (k, f)
  assert f['b_err'] < 0.05 * TRUE['b'], f  # Uncertainties small enough to mean something.
  # The control: data with another exponent gives a fit far from TRUE's.
  other = sweep_report.fit_power_law(SIZES, _points(0.6, seed=0), sigma=np.full(8, 0.01))
  assert abs(other['b'] - 0.6) < 3 * other['b_err']
  assert abs(other['b'] - TRUE['b']) > 10 * other['b_err']


def test_fit_uncertainties_cover_the_truth_about_68_percent_of_the_time():
  """Over many noise draws, b lies within one stated sigma of the truth about 68% of fits;
  scaled uncertainties (no sigma given) too."""
  for sigma in (np.full(8, 0.01), None):
    hits = [abs(f['b'] - TRUE['b']) < f['b_err'] for f in
            (sweep_report.fit_power_law(SIZES, _points(TRUE['b'], seed), sigma=sigma)
             for seed in range(200))]
    assert 0.55 < np.mean(hits) < 0.82, (sigma is None, np.mean(hits))


def test_fit_needs_four_points():
  with pytest.raises(ValueError, match='at least 4 points, got 3'):
    sweep_report.fit_power_law(SIZES[:3], _points(TRUE['b'], 0)[:3])


def test_size_rules_span_30x_and_load():
  """Both study files: >= 5 members, every one a valid config, growing in width and
  spanning >= 30x in non-embedding parameters (counted on the real models); the
  compute-matched members share 6 * N * tokens, the token-budget ones their steps."""
  for spec in (GPT, GPT + ':compute', CNN):
    found = sweep.members(spec)
    assert len(found) >= 5
    configs = [config_lib.load(spec, own) for _, own in found]
    widths = [c.model.width if 'width' in c.model else c.model.hidden for c in configs]
    assert widths == sorted(widths) and len(set(widths)) >= 5
    seeds = {}  # Members of one size differ in their seed, and only there.
    for width, c in zip(widths, configs):
      seeds.setdefault(width, []).append(c.seed)
    assert all(len(set(s)) == len(s) for s in seeds.values()), seeds
    ends = [sweep.describe(train.setup(c))['non_embedding_params']
            for c in (configs[0], configs[-1])]
    assert ends[1] / ends[0] >= 30, (spec, ends)
  rule = config_lib.load_module(GPT).non_embedding_params
  configs = [config_lib.load(GPT + ':compute', own) for _, own in sweep.members(GPT + ':compute')]
  compute = [6 * rule(c.model.depth, c.model.width) * c.train.steps for c in configs]
  assert max(compute) / min(compute) < 1.05, compute  # Rounding of steps only.
  plain = [config_lib.load(GPT, own) for _, own in sweep.members(GPT)]
  assert len({c.train.steps for c in plain}) == 1
  # One learning-rate rule: lr * width is the same for every size.
  assert len({round(c.opt.lr * c.model.width, 3) for c in plain}) == 1
  assert len({c.opt.lr for c in plain}) == len(plain)


def _files(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(folder.rglob('*')) if p.is_file() and 'checkpoints' not in p.parts}


def test_an_interrupted_sweep_continues_without_retraining(capsys, tmp_path):
  out = tmp_path / 'sweep'
  spec = GPT + ':tiny'
  (first, _), (second, _) = sweep.members(spec)
  state = sweep.run_sweep(spec, str(out), stop_after=(second, 3))  # ckpt_every is 2.
  assert state['preempted'] == second
  assert sweep.finished(str(out / first), 8) and not sweep.finished(str(out / second), 8)
  before = _files(out / first)
  assert 'summary.json' in before

  code, stdout, err = conftest.run_cli(capsys, 'sweep', spec, '--out', out)
  assert code == 0, err
  assert _files(out / first) == before  # Not one byte or timestamp of it changed.
  assert f'{first} finished already; skipped' in err
  with open(out / second / 'summary.json') as f:
    summary = json.load(f)
  assert summary['step'] == 8 and summary['resumed_from'] == 2
  with open(out / 'sweep.json') as f:
    saved = json.load(f)
  assert [m['name'] for m in saved['members']] == [first, second]
  assert 'preempted' not in saved and saved['command'].startswith('jaxbig sweep')

  code, text, err = conftest.run_cli(capsys, 'report', out)
  assert code == 0, err
  assert (out / 'report.md').read_text() == text
  memory = []
  for name in (first, second):
    row = next(line for line in text.splitlines() if line.startswith(f'| {name} |'))
    assert 'not finished' not in row and re.search(r'[KMG]iB \(XLA\)', row)  # No device counter on CPUs.
    memory.append(json.loads((out / name / 'summary.json').read_text())['train_step_bytes'])
  assert 0 < memory[0] < memory[1]  # The wider member's step needs more.
  assert 'needs at least 4 points, got 2' in text
  assert '2,048' in text  # Tokens seen: 8 steps of 8 windows of 32 bytes.


def _other_sweep(out: pathlib.Path) -> None:
  out.mkdir()
  (out / 'sweep.json').write_text(json.dumps({'experiment': CNN, 'variant': 'tiny',
                                              'overrides': [], 'members': []}))


def _foreign_folder(out: pathlib.Path) -> None:
  out.mkdir()
  (out / 'notes.txt').write_text('mine')


def _changed_member(out: pathlib.Path) -> None:
  """A sweep whose first member trained under overrides the sweep file no longer gives."""
  (name, own), _ = sweep.members(GPT + ':tiny')
  out.mkdir()
  (out / 'sweep.json').write_text(json.dumps({
      'experiment': GPT, 'variant': 'tiny', 'overrides': [],
      'members': [{'name': name, 'overrides': [*own[:-1], 'opt.lr=0.5']}]}))
  (out / name).mkdir()
  (out / name / 'summary.json').write_text('{"step": 8}')


@pytest.mark.parametrize('spec, overrides, prepare, named', [
    (GPT + ':huge', [], None, "unknown variant 'huge'"),
    (str(REPO / 'experiments' / 'gpt_stdlib.py'), [], None, 'has no sweep() function'),
    (GPT + ':tiny', ['model.widht=8'], None, "member d1-w16: unknown config key 'model.widht'"),
    (GPT + ':tiny', [], _other_sweep, 'holds a sweep of ' + CNN),
    (GPT + ':tiny', [], _foreign_folder, 'holds no sweep.json'),
    (GPT + ':tiny', [], _changed_member, 'member d1-w16 was trained with other overrides'),
])
def test_bad_input_exits_2_and_writes_nothing(spec, overrides, prepare, named, capsys, tmp_path):
  out = tmp_path / 'out'
  if prepare:
    prepare(out)
  before = _files(out) if out.exists() else None
  code, _, err = conftest.run_cli(capsys, 'sweep', spec, '--out', out, *overrides)
  assert code == 2
  assert named in err and len(err.strip().splitlines()) == 1, err
  assert (_files(out) if out.exists() else None) == before


def test_report_refuses_a_broken_sweep_file(capsys, tmp_path):
  (tmp_path / 'sweep.json').write_text('{')
  code, _, err = conftest.run_cli(capsys, 'report', tmp_path)
  assert code == 2 and 'not a readable sweep file' in err
  assert not os.path.exists(tmp_path / 'report.md')


def _fake_sweep(folder: pathlib.Path, steps: list[int]) -> None:
  """A finished five-member sweep whose val losses follow TRUE exactly (no training)."""
  sizes = SIZES[::2][:4].tolist() + [SIZES[-1]]
  members = []
  for i, (n, s) in enumerate(zip(sizes, steps)):
    name = f'm{i}'
    members.append({'name': name, 'overrides': [], 'params': int(n) + 1000,
                    'non_embedding_params': int(n), 'flops_per_step': 6.0 * n * 4096,
                    'unit': 'tokens', 'units_per_step': 4096, 'steps': s})
    loss = TRUE['a'] * n ** (-TRUE['b']) + TRUE['c']
    (folder / name).mkdir(parents=True)
    (folder / name / 'summary.json').write_text(json.dumps({
        'step': s, 'train_loss': loss - 0.01 * i, 'val': {'loss': loss}, 'wall_s': 1.0,
        'device_kind': 'cpu', 'num_devices': 1, 'precision': 'fp32'}))
  (folder / 'sweep.json').write_text(json.dumps({'experiment': GPT, 'variant': '',
                                                 'overrides': [], 'members': members}))


def test_report_fits_five_members_and_says_why_not_for_matched_compute(capsys, tmp_path):
  _fake_sweep(tmp_path / 'tokens', [100] * 5)
  code, text, err = conftest.run_cli(capsys, 'report', tmp_path / 'tokens')
  assert code == 0, err
  _, rows = sweep_report.read(str(tmp_path / 'tokens'))
  found = sweep_report.fits(rows)
  assert abs(found['non-embedding params']['b'] - TRUE['b']) < 1e-3, found
  assert abs(found['train FLOPs']['b'] - TRUE['b']) < 1e-3  # Compute is proportional to N.
  assert f"b = {found['non-embedding params']['b']:.4f}" in text
  assert json.loads((tmp_path / 'tokens' / 'fits.json').read_text()) == found
  gaps = [float(line.split(' | ')[8]) for line in text.splitlines()
          if re.match(r'\| m\d ', line)]
  assert gaps == [0.0, 0.01, 0.02, 0.03, 0.04]
  pytest.importorskip('matplotlib')
  for name in ('loss_vs_params.png', 'loss_vs_compute.png', 'gap_vs_params.png'):
    assert (tmp_path / 'tokens' / name).stat().st_size > 0
  # Compute-matched: steps inversely proportional to N, so compute is one value: no fit.
  sizes = SIZES[::2][:4].tolist() + [SIZES[-1]]
  _fake_sweep(tmp_path / 'compute', [int(round(1e9 / n)) for n in sizes])
  code, text, err = conftest.run_cli(capsys, 'report', tmp_path / 'compute')
  assert code == 0, err
  assert 'against train FLOPs: no fit: the members span less than 2x' in text
  assert 'against non-embedding params (5 members)' in text


def test_report_averages_the_seeds_of_a_size(capsys, tmp_path):
  """Two members per size: the per-size table holds their mean and sample deviation."""
  _fake_sweep(tmp_path, [100] * 5)
  saved = json.loads((tmp_path / 'sweep.json').read_text())
  extra = []
  for m in saved['members']:
    twin = dict(m, name=m['name'] + '-s1')
    summary = json.loads((tmp_path / m['name'] / 'summary.json').read_text())
    summary['val']['loss'] += 0.1  # The twin's val loss is 0.1 higher, its train loss equal.
    (tmp_path / twin['name']).mkdir()
    (tmp_path / twin['name'] / 'summary.json').write_text(json.dumps(summary))
    extra.append(twin)
  saved['members'] += extra
  (tmp_path / 'sweep.json').write_text(json.dumps(saved))
  _, rows = sweep_report.read(str(tmp_path))
  groups = sweep_report.by_size(rows)
  assert [len(g['members']) for g in groups] == [2] * 5
  first = rows[0]
  assert groups[0]['val_loss'] == pytest.approx(first['val_loss'] + 0.05)
  assert groups[0]['val_loss_sd'] == pytest.approx(0.1 / math.sqrt(2))
  assert groups[0]['gap'] == pytest.approx(first['gap'] + 0.05)
  code, text, err = conftest.run_cli(capsys, 'report', tmp_path)
  assert code == 0, err
  assert '## Per size' in text and '(10 members)' in text
  # One member per size (the plain fake sweep) has no per-size table.
  _fake_sweep(tmp_path / 'single', [100] * 5)
  code, text, err = conftest.run_cli(capsys, 'report', tmp_path / 'single')
  assert code == 0 and '## Per size' not in text


def test_report_states_no_law_when_the_loss_rises_with_size(capsys, tmp_path):
  """Losses that grow with size (a compute-matched sweep past its best size) get no power
  law, with the reason; the same points falling with size get one."""
  _fake_sweep(tmp_path / 'falls', [100] * 5)
  _fake_sweep(tmp_path / 'rises', [100] * 5)
  for m in json.loads((tmp_path / 'rises' / 'sweep.json').read_text())['members']:
    path = tmp_path / 'rises' / m['name'] / 'summary.json'
    summary = json.loads(path.read_text())
    summary['val']['loss'] = 1.0 + 0.1 * math.log(m['non_embedding_params'])
    path.write_text(json.dumps(summary))
  code, text, err = conftest.run_cli(capsys, 'report', tmp_path / 'rises')
  assert code == 0, err
  assert 'against non-embedding params: no fit: the loss does not fall with' in text
  _, rows = sweep_report.read(str(tmp_path / 'falls'))
  assert isinstance(sweep_report.fits(rows)['non-embedding params'], dict)
