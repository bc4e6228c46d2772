"""The benchmark harness: the smoke suite end to end, its fields and their consistency, the
analytic FLOPs against XLA's count, the energy meters, and bad input.

No assertion is about how fast anything is: speed targets live in the suites' tables.
"""

import functools
import glob
import gzip
import json
import math

import pytest

import conftest
from jaxbig import cli, config as config_lib, train
from jaxbig.tools.bench import energy, flops

SMOKE = 'benchmarks/suites/smoke.py'
FIELDS = ('suite', 'name', 'framework', 'model', 'precision', 'remat', 'batch', 'mesh', 'steps',
          'step_time_s', 'samples_per_s', 'tokens_per_s', 'flops_per_step', 'mfu',
          'peak_memory_bytes', 'energy', 'loss', 'compile_s', 'env')


_main = conftest.run_cli  # (exit code, stdout, stderr) of the command, in-process.


@pytest.fixture(scope='module', autouse=True)
def _one_roof_measurement():
  """The CPU's matmul rate (the MFU's basis), measured once for all of the module's bench
  runs instead of once per run: 1.8 s of CPU each."""
  from jaxbig.tools import bench
  patch = pytest.MonkeyPatch()
  patch.setattr(bench, 'cpu_matmul_roof', functools.cache(bench.cpu_matmul_roof))
  yield
  patch.undo()


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'smoke'
  # A row per model family and the emulated fp8 row (the other precisions' rows add nothing
  # the harness does differently).
  assert cli.main(['bench', SMOKE, '--out', str(out), '--min-seconds', '0.1',
                   '--only', '*-fp32,cnn-fp8']) == 0
  with open(out / 'results.jsonl') as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow(reason='times benchmark rows')
def test_every_row_has_every_field_and_they_agree(rows):
  assert [r['name'] for r in rows] == ['cnn-fp32', 'mlp-fp32', 'gpt-fp32', 'lstm-fp32',
                                       'cnn-fp8']
  for r in rows:
    assert set(FIELDS) <= set(r), r['name']
    t = r['step_time_s']
    assert 0 < t['p10'] <= t['median'] <= t['p90']
    assert r['steps'] >= 5
    assert r['samples_per_s'] == pytest.approx(r['batch'] / t['median'])
    assert 0 < r['mfu'] <= 1, r['name']
    assert math.isfinite(r['loss']) and r['compile_s'] > 0
    assert r['peak_memory_bytes']['compiled'] > 0
    # The smoke models keep every activation: nothing recomputed.
    assert r['remat'] == 'none' and r['flops_per_step']['recomputed'] in (0.0, None)
    # This machine has no energy counter: null fields with the reason, never an estimate.
    e = r['energy']
    assert e['method'] == 'none' and e['reason']
    assert e['joules_per_step'] is None and e['avg_watts'] is None
    assert r['env']['device_kind'] and r['env']['jax'] and r['env']['num_devices'] >= 1
  by = {r['name']: r for r in rows}
  assert by['gpt-fp32']['tokens_per_s'] == pytest.approx(
      by['gpt-fp32']['samples_per_s'] * 32)  # 32-byte windows in gpt_stdlib:smoke.
  assert by['cnn-fp32']['tokens_per_s'] is None
  assert by['cnn-fp8']['emulated'] and not by['cnn-fp32']['emulated']
  assert by['cnn-fp8']['precision'] == 'fp8'


@pytest.mark.parametrize('spec', ['experiments/cnn_digits.py:smoke',
                                  'experiments/mlp_diabetes.py:smoke',
                                  'experiments/gpt_stdlib.py:smoke',
                                  'experiments/lstm_stdlib.py:smoke'])
@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_analytic_flops_match_xla_where_xla_counts_everything(spec, rows):
  """XLA counts every multiply-add of the unrolled step; the formula counts the matmuls and
  convolutions: they agree within the element-wise work the formula leaves out."""
  row = next(r for r in rows if r['experiment'].endswith(spec) and r['precision'] == 'fp32')
  f = row['flops_per_step']
  if f['xla_counts_loops_once']:  # The LSTM scans over time: XLA counts one step.
    assert f['xla'] < f['analytic']
    return
  assert f['analytic'] == pytest.approx(f['xla'], rel=0.35)


def test_causal_attention_counts_half_the_scores():
  config = config_lib.load('experiments/gpt_stdlib.py:smoke', [])
  meta = train.setup(config).data.meta
  base = flops.forward_flops(config.model, meta, 1)
  longer = config_lib.load('experiments/gpt_stdlib.py:smoke', ['model.depth=3'])
  per_block = flops.forward_flops(longer.model, meta, 1) - base
  seq, d = meta.input_shape[0], config.model.width
  dense = seq * (4 * 2 * d * d + 2 * 2 * d * d * config.model.mlp_ratio)
  assert per_block == dense + 2 * seq * seq * d  # Full attention would be 4 * L^2 * d.


def test_grouped_query_attention_and_swiglu_change_the_counted_matmuls():
  load = lambda *o: config_lib.load('experiments/gpt_stdlib.py:smoke', list(o))
  config = load()
  meta = train.setup(config).data.meta
  m, seq = config.model, meta.input_shape[0]
  base = flops.forward_flops(m, meta, 1)
  head = m.width // m.heads
  # One key/value head: the key and value projections shrink from d x d to d x head.
  gqa = flops.forward_flops(load('model.kv_heads=1').model, meta, 1)
  assert base - gqa == m.depth * 2 * (2 * seq * m.width * (m.width - head))
  # SwiGLU: a third d x mlp matrix per block.
  swiglu = flops.forward_flops(load('model.mlp=swiglu').model, meta, 1)
  assert swiglu - base == m.depth * 2 * seq * m.width * m.width * m.mlp_ratio


def test_rapl_meter_reads_package_counters_and_their_wraparound(tmp_path):
  for name, energy_uj in (('intel-rapl:0', 1000), ('intel-rapl:1', 5000),
                          ('intel-rapl:0:0', 7)):  # A sub-domain: not counted.
    d = tmp_path / name
    d.mkdir()
    (d / 'energy_uj').write_text(str(energy_uj))
    (d / 'max_energy_range_uj').write_text('10000')
  cpu = type('Device', (), {'platform': 'cpu'})()
  m = energy.meter([cpu], str(tmp_path))
  assert m.method == 'rapl'
  start = m.read()
  (tmp_path / 'intel-rapl:0' / 'energy_uj').write_text('3000')  # +2000 uJ.
  (tmp_path / 'intel-rapl:1' / 'energy_uj').write_text('1000')  # Wrapped: +6000 uJ.
  assert m.joules(start, m.read()) == pytest.approx(0.008)
  none = energy.meter([cpu], str(tmp_path / 'absent'))
  assert none.method == 'none' and 'does not exist' in none.reason


def test_peaks_are_looked_up_by_device_kind():
  assert flops.peak('NVIDIA H100 80GB HBM3', 'bf16') == 989.4e12
  assert flops.peak('NVIDIA H100 PCIe', 'bf16') == 756e12
  assert flops.peak('TPU v5 lite', 'bf16') == 197e12
  assert flops.peak('TPU v5', 'bf16') == 459e12
  assert flops.peak('cpu', 'fp32') is None


def _suite(tmp_path, text):
  path = tmp_path / 'suite.py'
  path.write_text('SETTINGS = {"min_steps": 4, "min_seconds": 0.1, "warmup_max": 6, '
                  '"rounds": 2}\ndef rows():\n  return ' + text + '\n')
  return path


@pytest.mark.slow(reason='times benchmark rows')
def test_pytorch_reference_rows_are_timed_with_their_jaxbig_row(capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'cnn', 'experiment': 'experiments/cnn_digits.py:smoke',"
                           " 'pytorch': True}]")
  code, _, _ = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 0
  jx, pt = [json.loads(l) for l in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  assert (jx['framework'], pt['framework'], pt['name'], pt['pair']) == (
      'jaxbig', 'pytorch', 'cnn-pytorch', 'cnn')
  for r in (jx, pt):
    assert set(FIELDS) <= set(r) and r['rounds'] == 2 and r['steps'] >= 4
    assert r['samples_per_s'] == pytest.approx(r['batch'] / r['step_time_s']['median'])
    assert 0 < r['mfu'] <= 1 and math.isfinite(r['loss'])
    assert r['command'].startswith('jaxbig bench ') and str(suite) in r['command']
  assert pt['flops_per_step']['analytic'] == jx['flops_per_step']['analytic']
  assert pt['env']['torch'] and pt['pytorch_mode'] == 'eager'


@pytest.mark.parametrize('spec, overrides', [
    ('experiments/cnn_digits.py:smoke', []),
    ('experiments/lstm_stdlib.py:smoke', []),
    ('experiments/lstm_stdlib.py:smoke', ['model.name=gru', 'model.depth=2']),
    ('experiments/gpt_stdlib.py:smoke', []),
    ('experiments/gpt_stdlib.py:smoke', ['model.pos=learned', 'model.tie_embeddings=False']),
])
def test_pytorch_references_have_the_jaxbig_models_shapes(spec, overrides):
  """Same parameter count, except the second bias PyTorch's LSTM and GRU add per gate."""
  import jax
  import numpy as np
  from jaxbig.tools.bench import pytorch
  config = config_lib.load(spec, overrides)
  s = train.setup(config)
  n_jax = sum(np.prod(p.shape) for p in jax.tree.leaves(s.abstract_boxed.params))
  m = config.model
  n_torch = sum(p.numel() for p in pytorch.build(config, s.data.meta).parameters())
  extra = {'lstm': 4, 'gru': 2}[m.name] * m.hidden * m.depth if m.name in ('lstm', 'gru') else 0
  assert n_torch == n_jax + extra


def test_native_only_rows_are_skipped_where_emulated(capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'cnn-fp8', 'experiment': 'experiments/cnn_digits.py:"
                           "smoke', 'precision': 'fp8', 'native_only': True}, {'name': 'mlp', "
                           "'experiment': 'experiments/mlp_diabetes.py:smoke'}]")
  code, out, _ = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 0 and 'cnn-fp8: skipped (fp8 is emulated on cpu)' in out
  code, out, _ = _main(capsys, 'report', tmp_path / 'out')
  assert 'Skipped: cnn-fp8 (fp8 is emulated on cpu).' in out
  assert '| mlp |' in out and '| cnn-fp8 |' not in out


@pytest.mark.slow(reason='times a benchmark row')
def test_input_rows_time_the_pipeline_beside_the_step(capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'gpt', 'experiment': 'experiments/gpt_stdlib.py:smoke',"
                           " 'input': 20}]")
  code, out, _ = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 0 and 'gpt: input ' in out, out
  row = json.loads((tmp_path / 'out' / 'results.jsonl').read_text().splitlines()[0])
  i = row['input']
  assert i['batches'] == 20 and i['tokens_per_s'] == pytest.approx(8 * 32 / i['batch_time_s'])
  assert i['per_step'] == pytest.approx(i['batch_time_s'] / row['step_time_s']['median'])
  code, out, _ = _main(capsys, 'report', tmp_path / 'out')
  assert '## The input pipeline alone' in out and '| gpt |' in out


@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_profile_traces_each_row_after_its_timing(capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'mlp', 'experiment': 'experiments/mlp_diabetes.py:smoke'}]")
  code, _, err = _main(capsys, 'bench', suite, '--out', tmp_path / 'out', '--profile', '3',
                       '--min-seconds', '0', '--min-steps', '2')
  assert code == 0, err
  traces = list((tmp_path / 'out' / 'profile' / 'mlp').glob('plugins/profile/*/*.trace.json.gz'))
  assert len(traces) == 1
  with gzip.open(traces[0]) as f:
    steps = [e['args']['step_num'] for e in json.load(f)['traceEvents']
             if e.get('name') == 'train']
  assert sorted(map(int, steps)) == [0, 1, 2]
  row = json.loads((tmp_path / 'out' / 'results.jsonl').read_text())
  assert row['profile'] == str(tmp_path / 'out' / 'profile' / 'mlp')


@pytest.mark.parametrize('argv, named', [
    (['bench', 'benchmarks/suites/nope.py'], 'nope.py'),
    (['bench', SMOKE, '--profile', '-1'], '--profile'),
    (['bench', SMOKE, '--only', 'resnet-*'], '--only'),
    (['bench', SMOKE, '--min-seconds', '-1'], '--min-seconds'),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, named, capsys, tmp_path):
  out = tmp_path / 'out'
  code, stdout, err = _main(capsys, *argv, '--out', out)
  assert code == 2 and not stdout
  assert err.count('\n') == 1 and named in err
  assert not out.exists()


@pytest.mark.parametrize('bad, named', [
    ("'precision': 'fp64'", ['row typo', 'precision']),
    ("'precison': 'fp16'", ['row typo', "unknown keys ['precison']"]),
    ("'pytorch': 'fast'", ['row typo', 'pytorch must be']),
    ("'pytorch': True, 'precision': 'int8'", ['row typo', 'PyTorch reference runs', 'int8']),
    ("'loop': 5", ['row typo', 'loop must be a step count of at least 20']),
])
def test_a_bad_row_is_named_before_anything_runs(bad, named, capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'ok', 'experiment': 'experiments/cnn_digits.py:smoke'}, "
                           "{'name': 'typo', 'experiment': 'experiments/cnn_digits.py:smoke', "
                           f"{bad}}}]")
  code, _, err = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 2 and err.count('\n') == 1
  assert all(n in err for n in named), err
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow(reason='times benchmark rows')
def test_loop_rows_time_the_training_loop_and_report_its_host_overhead(
    capsys, tmp_path, monkeypatch):
  """The loop's time per step holds what the bare step leaves out: here 50 ms of logging
  every 2 steps and 30 ms of waiting for each batch, which add 55 ms to each step of the
  loop and nothing to the bare step; the wait is reported as the loop's input wait."""
  import time
  from jaxbig import data as data_lib, metrics
  write = metrics.Writer.write
  monkeypatch.setattr(metrics.Writer, 'write',
                      lambda self, *a: (time.sleep(0.05), write(self, *a))[1])

  class Slow:  # A pipeline that makes each batch in 30 ms.
    def __init__(self, it):
      self.it = it

    def __next__(self):
      time.sleep(0.03)
      return next(self.it)

    def __getattr__(self, name):
      return getattr(self.it, name)

  make = data_lib.Data.train_iter
  monkeypatch.setattr(data_lib.Data, 'train_iter', lambda *a, **k: Slow(make(*a, **k)))
  suite = _suite(tmp_path, "[{'name': 'cnn', 'experiment': 'experiments/cnn_digits.py:smoke',"
                           " 'loop': 20}]")
  code, _, _ = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 0
  [r] = [json.loads(l) for l in (tmp_path / 'out' / 'results.jsonl').read_text().splitlines()]
  loop = r['loop']
  assert (loop['steps'], loop['log_every']) == (20, 2)
  assert loop['step_time_s'] >= 0.055 > 0.025 > r['step_time_s']['median']
  assert loop['host_overhead'] == pytest.approx(
      1 - r['step_time_s']['median'] / loop['step_time_s'])
  assert loop['host_overhead'] > 0.5
  # 30 ms of a step of 55 ms and more; the rest is logging and the step.
  assert 0.3 < loop['input_wait'] <= 0.03 / loop['step_time_s'] + 0.05
  code, out, _ = _main(capsys, 'report', tmp_path / 'out')
  assert '## The training loop against the bare step' in out
  assert f"| cnn | {r['step_time_s']['median'] * 1e3:.3g} | {loop['step_time_s'] * 1e3:.3g} " \
         f"| 20 | {loop['host_overhead']:.1%} | {loop['input_wait']:.1%} |" in out


def test_a_pytorch_row_needs_a_model_with_a_reference(capsys, tmp_path):
  suite = _suite(tmp_path, "[{'name': 'mlp', 'experiment': 'experiments/mlp_diabetes.py:smoke',"
                           " 'pytorch': True}]")
  code, _, err = _main(capsys, 'bench', suite, '--out', tmp_path / 'out')
  assert code == 2 and 'row mlp: no PyTorch reference for model.name=mlp' in err
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_results_are_never_overwritten(rows, capsys, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.jsonl').write_text('{"kept": 1}\n')
  code, _, err = _main(capsys, 'bench', SMOKE, '--out', out, '--only', 'mlp-*')
  assert code == 2 and 'exists' in err
  assert (out / 'results.jsonl').read_text() == '{"kept": 1}\n'


def _write(path, rows):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _scaled(row, name, factor, batch=None):
  """A copy of `row` whose step times are `factor` times as long."""
  r = json.loads(json.dumps(row))
  r['name'] = name
  r['step_time_s'] = {k: v * factor for k, v in row['step_time_s'].items()}
  if batch is not None:
    r['batch'] = batch
    r['overrides'] = [o for o in r['overrides'] if not o.startswith('data.batch_size=')] + [
        f'data.batch_size={batch}']
  return r


def _with(row, name, override, factor):
  """A copy of `row` with one more override and `factor` times its step time."""
  r = _scaled(row, name, factor)
  r['overrides'] = r['overrides'] + [override]
  return r


@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_report_renders_every_row_the_growth_exponents_and_the_plots(rows, capsys, tmp_path):
  cnn, gpt = rows[0], rows[2]
  grown = [_scaled(cnn, 'b32', 1.0, 32), _scaled(cnn, 'b64', 2.0 ** 0.5, 64),
           _scaled(cnn, 'b128', 2.0, 128)]  # Time grows as batch ** 0.5.
  # Sequence length: time grows as length ** 1.5; width (another axis) as width ** 2.
  grown += [_with(gpt, f'l{n}', f'data.seq_len={n}', (n / 16) ** 1.5) for n in (16, 32, 64)]
  grown += [_with(gpt, f'w{w}', f'model.width={w}', (w / 32) ** 2) for w in (32, 64)]
  folder = _write(tmp_path / 'r', rows + grown)
  code, out, _ = _main(capsys, 'report', folder)
  assert code == 0
  assert (folder / 'report.md').read_text() == out
  table_rows = [l for l in out.splitlines() if l.startswith('| ') and l[2:5] not in ('row', '---')]
  assert len(table_rows) == len(rows) + len(grown)
  assert 'fp8 (emulated)' in out
  # The smoke cnn-fp32 row (batch 32) joins the sweep of its copies.
  assert 'batch [32, 64, 128]: exponent 0.50 (rows cnn-fp32, b32, b64, b128)' in out
  assert 'sequence length [16, 32, 64]: exponent 1.50' in out
  assert 'width [32, 64]: exponent 2.00' in out
  # cnn-fp32 and cnn-fp8 differ only in precision: a bar plot; each sweep: a log-log plot.
  for png in ('step_time_by_precision.png', 'sweep_batch.png', 'sweep_sequence_length.png',
              'sweep_width.png'):
    assert (folder / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
    assert f']({png})' in out
  assert 'no samples/J plot: no RAPL' in out  # This machine measures no energy.


@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_pytorch_rows_are_paired_in_the_report(rows, capsys, tmp_path):
  cnn = rows[0]
  ref = _scaled(cnn, 'cnn-fp32-pytorch', 3.0)
  ref.update(framework='pytorch', pair=cnn['name'])
  ref['env'] = {**ref['env'], 'torch': '2.x', 'torch_threads': 2}
  folder = _write(tmp_path / 'p', [cnn, ref])
  code, out, _ = _main(capsys, 'report', folder)
  assert code == 0
  line = next(l for l in out.splitlines() if l.startswith('| cnn-fp32 | cnn | fp32'))
  assert '| 3.00 |' in line  # PyTorch / jaxbig step time.
  assert 'torch 2.x (2 threads)' in out


@pytest.mark.slow(reason='times benchmark rows (the module\'s rows fixture)')
def test_compare_flags_changes_beyond_the_rows_own_spread(rows, capsys, tmp_path):
  old = _write(tmp_path / 'old', rows)
  cnn, gpt = rows[0], rows[2]
  spread = max((r['step_time_s']['p90'] - r['step_time_s']['p10']) / r['step_time_s']['median']
               for r in (cnn,))
  new = _write(tmp_path / 'new', [_scaled(cnn, cnn['name'], 1 + spread + 0.5),
                                  _scaled(gpt, gpt['name'], 1.0)])
  code, out, _ = _main(capsys, 'bench', 'compare', old, new)
  assert code == 0
  lines = {l.split(' | ')[0][2:]: l for l in out.splitlines() if l.startswith('| ')}
  assert lines[cnn['name']].endswith('| slower |')
  assert lines[gpt['name']].endswith('|  |')  # No change: not flagged.
  assert 'Rows in only one of them: cnn-fp8, lstm-fp32, mlp-fp32' in out


def test_report_and_compare_need_results(capsys, tmp_path):
  code, _, err = _main(capsys, 'report', tmp_path)
  assert code == 2 and 'no benchmark results' in err and err.count('\n') == 1
  code, _, err = _main(capsys, 'bench', 'compare', tmp_path)
  assert code == 2 and 'OLD and NEW' in err


@pytest.mark.parametrize('suite', sorted(glob.glob('benchmarks/suites/*.py')))
def test_every_committed_suite_and_row_loads(suite):
  """A typo in a suite that only runs on a lent GPU would otherwise show there, in its time."""
  from jaxbig.tools import bench
  _, rows, _ = bench.load_suite(suite)
  assert rows
  for row in rows:
    bench.row_config(row)
