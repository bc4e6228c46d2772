"""Tests for jaxbig.tools.plan: local plans, TPU-topology plans (needs libtpu), bad topology names.

Every test that compiles for a TPU topology lives in this file: libtpu takes a machine-wide
lock, so a second test process asking for TPU devices would wait for it forever, and
pytest-xdist (--dist loadfile) runs one file in one process.
"""

import json
import sys

import pytest

from jaxbig import config as config_lib, train
from jaxbig.tools import plan
from jaxbig.config import ConfigError

CNN_SMOKE = 'experiments/cnn_digits.py:smoke'


def _tpu_or_skip(name: str = 'v5e:2x2') -> None:
  """Skips the test, saying why, when libtpu cannot give devices for `name`."""
  try:
    plan.topology_devices(name)
  except ConfigError as e:
    if 'needs libtpu' not in str(e):
      raise
    pytest.skip(f'libtpu not installed: {e}')


@pytest.fixture(scope='module')
def local_plans():
  """Plans of the CNN smoke config at its own width (32) and 8x wider, on the local devices."""
  narrow = plan.plan(config_lib.load(CNN_SMOKE, ['mesh.data=1']))
  wide = plan.plan(config_lib.load(CNN_SMOKE, ['mesh.data=1', 'model.hidden=256']))
  return narrow, wide


@pytest.mark.slow(reason='compiles train steps for TPU topologies')
def test_local_plan_reports_memory_and_flops(local_plans):
  d, _ = local_plans
  m = d['memory_per_device']
  assert d['topology'] is None and d['num_devices'] == 1
  assert m['arguments_bytes'] > 0 and m['total_bytes'] > 0
  # The donated state comes back as the new state: those outputs alias the arguments.
  assert 0 < m['aliased_bytes'] <= m['outputs_bytes']
  assert m['total_bytes'] == (m['arguments_bytes'] + m['outputs_bytes'] - m['aliased_bytes']
                              + m['temporaries_bytes'])
  assert d['flops_per_device'] > 0 and d['flops_per_step'] == d['flops_per_device']
  assert d['compile_s'] > 0
  if d['platform'] == 'cpu':  # No HBM to compare with.
    assert d['hbm_bytes'] is None and d['fits'] is None
  text = plan.format_plan(d)
  assert 'arguments' in text and 'FLOPs per step' in text and 'collectives: none' in text


def test_wider_model_needs_more_memory_and_flops(local_plans):
  narrow, wide = local_plans
  assert wide['num_params'] > 4 * narrow['num_params']
  assert (wide['memory_per_device']['arguments_bytes']
          > 4 * narrow['memory_per_device']['arguments_bytes'])
  assert wide['flops_per_device'] > narrow['flops_per_device']


@pytest.mark.parametrize('name', ['v9z:2x2', 'v5litepod-16', 'v5e', 'v5e:2x2x2x2', 'v5e:0x2'])
def test_unknown_topology_fails_before_setup(name, monkeypatch):
  monkeypatch.setattr(train, 'setup', lambda *a, **k: pytest.fail('setup ran'))
  with pytest.raises(ConfigError, match='^--topology') as e:
    plan.plan(config_lib.load(CNN_SMOKE), name)
  assert '\n' not in str(e.value)


def test_missing_libtpu_is_one_config_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)  # `import libtpu` fails; find_spec is None.
  monkeypatch.delenv('TPU_LIBRARY_PATH', raising=False)
  with pytest.raises(ConfigError, match=r'^--topology needs libtpu.*jaxbig\[tpu\]'):
    plan.plan(config_lib.load(CNN_SMOKE), 'v5e:2x2')


def test_topology_libtpu_cannot_build_is_a_config_error():
  _tpu_or_skip()
  with pytest.raises(ConfigError, match='^--topology v5e:3x7: libtpu says .*not divisible'):
    plan.topology_devices('v5e:3x7')


def _no_cpu_fast_paths(monkeypatch) -> None:
  """Makes the CPU-only rewrites (Winograd convolutions, heads-major attention) fail if traced:
  a TPU plan runs on a CPU host, and must still take the TPU paths."""
  from jaxbig.kernels import attention, winograd  # pylint: disable=g-import-not-at-top

  def cpu_only(*args, **kwargs):
    raise AssertionError('a CPU-only fast path was traced for a TPU')

  monkeypatch.setattr(winograd, 'winograd_conv', cpu_only)
  monkeypatch.setattr(attention, 'heads_major_attention', cpu_only)


@pytest.mark.slow(reason='compiles train steps for TPU topologies')
def test_v5e_plan_fits_and_has_collectives(monkeypatch):
  _tpu_or_skip()
  # The CNN's TPU plans take XLA's convolutions (test_tpu_plans_trace_the_tpu_paths_...).
  _no_cpu_fast_paths(monkeypatch)
  d = plan.plan(config_lib.load(CNN_SMOKE, ['mesh.data=4']), 'v5e:2x2')
  assert d['device_kind'] == 'TPU v5 lite' and d['num_devices'] == 4
  assert d['mesh'] == {'data': 4, 'fsdp': 1, 'context': 1, 'tensor': 1}
  m = d['memory_per_device']
  assert m['arguments_bytes'] > 0 and m['total_bytes'] > 0
  assert d['hbm_bytes'] == plan.HBM_BYTES['v5e'] and d['fits'] is True
  # Fits by XLA's own peak, with the margin left.
  assert d['hbm_margin_bytes'] == d['hbm_bytes'] - m['peak_bytes'] > 0
  # fp32 has no tabled TPU peak: no prediction, and the plan says why.
  assert d['prediction'] == {'step_s': None, 'mfu': None,
                             'reason': 'no fp32 peak tabled for TPU v5 lite'}
  assert d['flops_per_step'] == 4 * d['flops_per_device'] > 0
  assert d['collectives'].get('all-reduce', 0) >= 1  # The gradients, summed over data.
  assert d['collective_bytes']['all-reduce'] > 0
  # One chip: nothing to communicate, and the same per-device state.
  single = plan.plan(config_lib.load(CNN_SMOKE, ['mesh.data=1']), 'v5e:1x1')
  assert single['num_devices'] == 1 and single['collectives'] == {}
  assert single['memory_per_device']['arguments_bytes'] == m['arguments_bytes']


def test_the_prediction_is_a_roofline_bound_over_its_terms():
  """bf16 GPT on v5e: the step time is the largest of compute (the analytic FLOPs plus
  what remat recomputes, at 197 TFLOP/s), HBM traffic and collectives; MFU follows."""
  _tpu_or_skip()
  gpt = 'experiments/gpt_stdlib.py:smoke'
  plans = {p: plan.plan(config_lib.load(gpt, ['mesh.data=4', 'precision=bf16',
                                              f'model.remat={p}']), 'v5e:2x2')
           for p in ('none', 'full')}
  for policy, d in plans.items():
    p = d['prediction']
    assert p['reason'] is None and p['peak_flops_per_s'] == 197e12
    assert set(p['terms_s']) == {'compute', 'memory', 'collectives'}
    assert p['step_s'] == max(p['terms_s'].values()) == p['terms_s'][p['bound']]
    compute = (p['model_flops_per_step'] + p['recomputed_flops_per_step']) / 4 / 197e12
    assert p['terms_s']['compute'] == pytest.approx(compute)
    assert p['mfu'] == pytest.approx(p['model_flops_per_step'] / 4 / (p['step_s'] * 197e12))
    assert 0 < p['mfu'] <= 1
    assert (d['predicted_step_s'], d['predicted_mfu']) == (p['step_s'], p['mfu'])  # --json.
    assert 'step time >=' in plan.format_plan(d)
  none, full = plans['none']['prediction'], plans['full']['prediction']
  # Full remat recomputes one forward pass: a third of the model's training FLOPs.
  assert none['recomputed_flops_per_step'] == 0
  assert full['recomputed_flops_per_step'] == pytest.approx(full['model_flops_per_step'] / 3)


def test_out_of_hbm_is_a_plan_that_does_not_fit():
  _tpu_or_skip()
  # Two 40000-wide layers with Adam: ~18 GiB of state on each of 4 replicas, over 16 GiB.
  config = config_lib.load('experiments/mlp_diabetes.py', ['model.widths=(40000,40000)'])
  d = plan.plan(config, 'v5e:2x2')
  assert d['fits'] is False and d['memory_per_device'] is None
  assert 'RESOURCE_EXHAUSTED' in d['error']
  assert 'does not fit' in plan.format_plan(d)


def test_collectives_counts_async_pairs_once_and_sums_result_bytes():
  hlo = '\n'.join([
      'ENTRY %main (p: f32[8]) -> f32[8] {',
      '  %all-reduce.1 = (f32[8]{0:T(128)}, /*index=1*/bf16[2,4]{1,0}) all-reduce(%a, %b), '
      'channel_id=1, to_apply=%add',
      '  %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(%c), dimensions={0}',
      '  %all-gather-done = f32[16]{0} all-gather-done(%all-gather-start)',
      '  %collective-permute-start = (s32[2]{0}, s32[2]{0}, u32[], u32[]) '
      'collective-permute-start(%d)',
      '  %collective-permute-done = s32[2]{0} collective-permute-done(%collective-permute-start)',
      '  %fusion = f32[8]{0} fusion(%all-reduce.1), kind=kLoop, calls=%fused, '
      'metadata={op_name="all-reduce(x)"}',
      '  ROOT %reduce-scatter.2 = f32[2]{0} reduce-scatter(%e), dimensions={0}',
      '}',
  ])
  counts, sizes = plan.collectives(hlo)
  assert counts == {'all-reduce': 1, 'all-gather': 1, 'collective-permute': 1,
                    'reduce-scatter': 1}
  assert sizes == {'all-reduce': 8 * 4 + 8 * 2, 'all-gather': 64, 'collective-permute': 8,
                   'reduce-scatter': 8}


def test_collectives_in_loops_count_by_their_trip_counts():
  """A gather in a 4-trip loop nested in a 3-trip loop runs 12 times; an all-to-all in a
  loop whose condition is `i < 5`, 5 times; one in a loop of unknown count, once; an
  async-wrapped reduce-scatter counts in the computation it calls."""
  hlo = '\n'.join([
      '%inner (p: f32[4]) -> f32[4] {',
      '  ROOT %ag = f32[4]{0} all-gather(%p), dimensions={0}',
      '}',
      '%cond (p: f32[4]) -> pred[] {',
      '  ROOT %c = pred[] constant(true)',
      '}',
      '%outer (p: f32[4]) -> f32[4] {',
      '  %w = f32[4]{0} while(%p), condition=%cond, body=%inner, '
      'backend_config={"known_trip_count":{"n":"4"}}',
      '  ROOT %ar = f32[4]{0} all-reduce(%w), to_apply=%add',
      '}',
      '%below5 (p: (s32[], f32[4])) -> pred[] {',
      '  %five = s32[]{:T(128)} constant(5)',
      '  %i = s32[]{:T(128)} get-tuple-element(%p), index=0',
      '  ROOT %lt = pred[]{:T(512)} compare(%i, %five), direction=LT, metadata={op_name="x"}',
      '}',
      '%five_times (p: f32[4]) -> f32[4] {',
      '  ROOT %a2a = f32[4]{0} all-to-all(%p), dimensions={0}',
      '}',
      '%unknown (p: f32[4]) -> f32[4] {',
      '  ROOT %cp = f32[4]{0} collective-permute(%p)',
      '}',
      '%wrapped (p: f32[8]) -> f32[2] {',
      '  ROOT %rs = f32[2]{0} reduce-scatter(%p), dimensions={0}',
      '}',
      'ENTRY %main (p: f32[4]) -> f32[4] {',
      '  %a = f32[4]{0} while(%p), condition=%cond, body=%outer, '
      'backend_config={"known_trip_count":{"n":"3"},"other":1}',
      '  %b = f32[4]{0} while(%a), condition=%cond, body=%unknown',
      '  %c = f32[4]{0} while(%b), condition=%below5, body=%five_times',
      '  %s = ((f32[8]), f32[2]) async-start(%q), calls=%wrapped',
      '  ROOT %d = f32[2]{0} async-done(%s)',
      '}',
  ])
  counts, sizes = plan.collectives(hlo)
  assert counts == {'all-gather': 12, 'all-reduce': 3, 'collective-permute': 1,
                    'reduce-scatter': 1, 'all-to-all': 5}
  assert sizes == {'all-gather': 12 * 16, 'all-reduce': 3 * 16, 'collective-permute': 16,
                   'reduce-scatter': 8, 'all-to-all': 5 * 16}


def test_cli_plan_prints_json_and_rejects_bad_topology_in_one_line(capsys):
  from jaxbig import cli
  assert cli.main(['plan', CNN_SMOKE, '--json', 'mesh.data=1']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['memory_per_device']['total_bytes'] > 0 and out['mesh']['data'] == 1
  assert cli.main(['plan', CNN_SMOKE, '--topology', 'v9:2x2']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('jaxbig: error: --topology')


def test_loops_are_flagged_because_their_flops_count_once(local_plans):
  assert local_plans[0]['has_loops'] is False
  lstm = plan.plan(config_lib.load('experiments/lstm_stdlib.py:smoke', ['mesh.data=1']))
  assert lstm['has_loops'] is True  # The scan over time steps.
  assert 'lower bound' in plan.format_plan(lstm)


def test_loops_without_matmuls_do_not_count():
  hlo = '\n'.join([
      '%rounds (p: u32[4]) -> u32[4] {', '  ROOT %x = u32[4] add(%p, %p)', '}',
      '%layer (p: f32[4,4]) -> f32[4,4] {',
      '  ROOT %f = f32[4,4] fusion(%p), kind=kOutput, calls=%fused_dot', '}',
      '%fused_dot (q: f32[4,4]) -> f32[4,4] {', '  ROOT %d = f32[4,4] dot(%q, %q)', '}',
      'ENTRY %main (a: f32[4,4]) -> f32[4,4] {',
      '  %w1 = u32[4] while(%t), condition=%cond, body=%rounds',
      '  ROOT %w2 = f32[4,4] while(%a), condition=%cond, body=%layer', '}',
  ])
  assert plan.loops_with_matmuls(hlo)
  assert not plan.loops_with_matmuls(hlo.replace('dot(', 'add('))


@pytest.mark.slow(reason='compiles train steps for TPU topologies')
def test_tpu_plans_trace_the_tpu_paths_not_the_cpu_fast_paths(monkeypatch):
  """A TPU plan runs on a CPU host: the models must still take their TPU paths (XLA's
  convolutions and attention), not the CPU-only rewrites, or the plan costs another program."""
  _tpu_or_skip('v5e:1x1')
  _no_cpu_fast_paths(monkeypatch)
  # The CNN's plans (XLA's convolutions) are test_v5e_plan_fits_and_has_collectives's, made
  # under the same patch: one TPU compile of it fewer.
  d = plan.plan(config_lib.load('experiments/gpt_stdlib.py:smoke', ['mesh.data=1']), 'v5e:1x1')
  assert d['device_kind'] == 'TPU v5 lite' and d['flops_per_step'] > 0
  with pytest.raises(AssertionError, match='CPU-only fast path'):  # Locally, on this CPU.
    plan.plan(config_lib.load(CNN_SMOKE, ['mesh.data=1']))


def test_tpu_plans_take_the_flash_kernel_where_the_sequence_allows():
  """attention=auto on a TPU topology compiles the Pallas kernel (a Mosaic custom call),
  split over the data axis in shard_map, or over data and context (keys and values
  gathered); at a length it cannot block, XLA's attention."""
  _tpu_or_skip()
  devices = plan.topology_devices('v5e:2x2')
  texts = {}
  for length, mesh in ((128, ['mesh.data=4']), (64, ['mesh.data=4']),
                       (256, ['mesh.data=2', 'mesh.context=2'])):
    config = config_lib.load('experiments/gpt_stdlib.py:smoke', [
        *mesh, 'precision=bf16', f'data.seq_len={length}', f'model.max_len={length}'])
    s = train.setup(config, devices=devices)
    lowered = train.lower_train_step(s)
    # The kernel is a custom call in the lowered program already: where XLA's attention is
    # chosen, its absence there needs no TPU compile.
    texts[length] = (s.model.attention,
                     (lowered if length == 64 else lowered.compile()).as_text())
  assert texts[128][0] == 'flash' and 'tpu_custom_call' in texts[128][1]
  assert texts[64][0] == 'xla' and 'tpu_custom_call' not in texts[64][1]
  assert texts[256][0] == 'flash' and 'tpu_custom_call' in texts[256][1]
  assert 'all-gather' in texts[256][1] and 'all-gather' not in texts[128][1]


def test_multi_slice_plans_span_slices_with_the_data_axis_only():
  """Two v5e:2x2 slices: mesh.slices=2 lays each slice out as its own (data 1, fsdp 4) mesh
  and joins them along data; the step compiles. A mesh that ignores the slices, or whose
  data axis cannot span them, is one ConfigError."""
  _tpu_or_skip()
  devices = plan.topology_devices('v5e:2x2', slices=2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  smoke = 'experiments/gpt_stdlib.py:smoke'
  s = train.setup(config_lib.load(smoke, ['mesh.data=2', 'mesh.fsdp=4', 'mesh.slices=2']),
                  devices=devices)
  by_data = [{d.slice_index for d in s.mesh.devices[i].flat} for i in range(2)]
  assert by_data == [{0}, {1}]  # Everything but the data axis stays within a slice.
  d = plan.plan(config_lib.load(smoke, ['mesh.data=2', 'mesh.fsdp=4', 'mesh.slices=2',
                                        'precision=bf16']), 'v5e:2x2', slices=2)
  assert d['slices'] == 2 and d['num_devices'] == 8 and d['fits']
  assert 'plan for 2 slices of v5e:2x2' in plan.format_plan(d)
  for overrides, named in ((['mesh.fsdp=8'], 'mesh.slices=1'),
                           (['mesh.data=1', 'mesh.fsdp=8', 'mesh.slices=2'], 'mesh.data')):
    with pytest.raises(ConfigError, match=named) as e:
      train.setup(config_lib.load(smoke, overrides), devices=devices)
    assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='--slices needs --topology'):
    plan.plan(config_lib.load(smoke), None, slices=2)


def test_scanned_collectives_count_per_layer_and_offload_input_uses_host_memory():
  """Under scan_layers the blocks are one loop body: with static counts depth 2 and depth 4
  would show the same collectives; counted by trip count, the 2 more layers add theirs.
  remat=offload_input keeps the scanned blocks' inputs (depth x B x L x E) in host memory,
  remat=full on the device (a program this small has no device temporaries to shrink; the
  6.4B plan in benchmarks/results/plan/ shows 2 GiB leave the device)."""
  _tpu_or_skip()
  plans = {}
  for depth, policy in ((2, 'full'), (4, 'offload_input')):
    plans[depth] = plan.plan(config_lib.load('experiments/gpt_stdlib.py:smoke', [
        'mesh.data=1', 'mesh.fsdp=4', 'model.scan_layers=true', f'model.depth={depth}',
        f'model.remat={policy}']), 'v5e:2x2')
  counts = {depth: d['collectives']['all-gather'] for depth, d in plans.items()}
  assert counts[4] > counts[2] > 0, counts
  inputs = 4 * (8 // 4) * 32 * 32 * 4  # depth x rows per device x L x E, float32.
  assert plans[2]['memory_per_device']['host_temporaries_bytes'] == 0
  assert plans[4]['memory_per_device']['host_temporaries_bytes'] >= inputs
