"""Sharded training: meshes of 8 fake CPU devices, pmap, and a real 2-process run on localhost.

Each mesh run must give the single-device losses; the controls show that the tolerance would
catch a real difference and that the parameters really are split across devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import conftest
from jaxbig import config as config_lib, train

pytestmark = pytest.mark.slow(reason='8-device and two-process runs in a worker')

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 3
RTOL = 1e-5

# The smoke sizes divide 8 (heads=8: 4 features per head), so every mesh below applies.
MODELS = {
    'cnn': ('experiments/cnn_digits.py:smoke', []),
    'transformer': ('experiments/gpt_stdlib.py:smoke', ['model.heads=8']),
    'lstm': ('experiments/lstm_stdlib.py:smoke', []),
}
# (data, fsdp, context, tensor).
MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 1, 2), (1, 1, 1, 8)]
# The context axis splits sequence positions: Transformers only (smoke sequences of 32).
CONTEXT_MESHES = [(2, 1, 2, 2), (1, 2, 4, 1)]
# pmap has its own dropout per device, so the pmap comparison runs without dropout;
# resnet checks that BatchNorm statistics are taken over all devices under pmap.
PMAP_MODELS = {
    'cnn': ('experiments/cnn_digits.py:smoke', ['model.dropout=0.0']),
    'resnet': ('experiments/resnet_digits.py:smoke', []),
}
BAD = {
    'batch': ('experiments/cnn_digits.py:smoke', ['data.batch_size=36'], 'data.batch_size'),
    'heads': ('experiments/gpt_stdlib.py:smoke', ['model.heads=2', 'mesh.tensor=8'],
              'mesh.tensor=8'),
    'product': ('experiments/cnn_digits.py:smoke', ['mesh.data=3', 'mesh.fsdp=2'], 'mesh'),
    'context_length': ('experiments/gpt_stdlib.py:smoke', ['mesh.context=8', 'data.seq_len=36'],
                       'mesh.context=8'),
    'context_cnn': ('experiments/cnn_digits.py:smoke', ['mesh.context=2'], 'mesh.context=2'),
}


def _mesh(m):
  return [f'mesh.{axis}={n}' for axis, n in zip(('data', 'fsdp', 'context', 'tensor'), m)]


def _meshes(model: str) -> list:
  """Every mesh for the Transformer (each axis and the context split); for the CNN and the
  LSTM, pure data parallelism and the mixed mesh (their other layouts repeat the same rules)."""
  if model == 'transformer':
    return MESHES + CONTEXT_MESHES
  return [MESHES[0], MESHES[2]]


def _jobs() -> dict:
  jobs = {}
  for name, (spec, ov) in MODELS.items():
    jobs[name, 'one'] = (spec, ov + _mesh((1, 1, 1, 1)), 1)
    jobs[name, 'higher_lr'] = (spec, ov + _mesh((1, 1, 1, 1)) + ['opt.lr=0.0011'], 1)
    for m in _meshes(name):
      jobs[name, m] = (spec, ov + _mesh(m), 8)
  # The splash kernel (in Pallas's interpreter) in shard_map, its queries split by context
  # (a block of 128 per device), against XLA's attention on one device.
  spec, ov = MODELS['transformer']
  long = ['data.seq_len=256', 'model.max_len=256']
  jobs['transformer', 'one_long'] = (spec, ov + long + _mesh((1, 1, 1, 1)), 1)
  jobs['transformer', 'flash'] = (spec, ov + long + _mesh(CONTEXT_MESHES[0]) + [
      'model.attention=flash'], 8)
  for name, (spec, ov) in PMAP_MODELS.items():
    jobs[name, 'jit_dp'] = (spec, ov + _mesh((8, 1, 1, 1)), 8)
    jobs[name, 'pmap'] = (spec, ov + _mesh((8, 1, 1, 1)) + ['parallel.mode=pmap'], 8)
  cnn_spec, cnn_ov = MODELS['cnn']
  jobs['cnn', 'no_split_rules'] = (cnn_spec, cnn_ov + _mesh((2, 2, 1, 2)) + [
      'mesh.rules=embed=none,conv_in=none,conv_out=none,mlp=none'], 8)
  for name, (spec, ov, _) in BAD.items():
    jobs[name, 'bad'] = (spec, ov, 8)
  return jobs


def worker_jobs() -> list[dict]:
  """The runs for tests/mesh_worker.py, which conftest.py starts once the tests are collected."""
  return [{'spec': spec, 'overrides': ov, 'devices': n, 'steps': STEPS,
           'interpret': key[1] == 'flash'} for key, (spec, ov, n) in _jobs().items()]


@pytest.fixture(scope='module')
def results(request, tmp_path_factory):
  return dict(zip(_jobs(), conftest.worker_results(request, tmp_path_factory)))


@pytest.mark.parametrize('model, mesh', [(model, m) for model in MODELS for m in _meshes(model)],
                         ids=str)
def test_mesh_gives_single_device_losses(results, model, mesh):
  one, got = results[model, 'one'], results[model, mesh]
  assert 'error' not in got, got
  np.testing.assert_allclose(got['losses'], one['losses'], rtol=RTOL)
  # The mesh really splits parameters: some kernel (embed -> fsdp and context, mlp ->
  # tensor) every way.
  assert got['split'] == mesh[1] * mesh[2] * mesh[3]


def test_flash_attention_with_context_split_gives_single_device_losses(results):
  """The splash kernel in shard_map over data 2 x context 2 x tensor 2: each device's
  queries against the gathered keys and values, trained for three steps."""
  got = results['transformer', 'flash']
  assert 'error' not in got, got
  np.testing.assert_allclose(got['losses'], results['transformer', 'one_long']['losses'],
                             rtol=RTOL)


@pytest.mark.parametrize('model', MODELS)
def test_controls(results, model):
  """Training moves the loss, and a 10% larger learning rate misses the tolerance."""
  one, other = results[model, 'one']['losses'], results[model, 'higher_lr']['losses']
  assert abs(one[-1] - one[0]) > 1e-3
  assert one[0] == other[0]  # Same model and batch before the first update...
  assert abs(other[-1] - one[-1]) > 10 * RTOL * abs(one[-1])  # ...then visibly apart.
  assert results[model, 'one']['split'] == 1


def test_rules_from_the_config_change_the_layout_not_the_losses(results):
  got = results['cnn', 'no_split_rules']
  assert got['split'] == 1 and results['cnn', (2, 2, 1, 2)]['split'] == 4
  np.testing.assert_allclose(got['losses'], results['cnn', 'one']['losses'], rtol=RTOL)


@pytest.mark.parametrize('model', PMAP_MODELS)
def test_pmap_equals_jit_data_parallel(results, model):
  jit, pmap = results[model, 'jit_dp'], results[model, 'pmap']
  assert 'error' not in pmap, pmap
  np.testing.assert_allclose(pmap['losses'], jit['losses'], rtol=RTOL)
  assert abs(pmap['losses'][-1] - pmap['losses'][0]) > 1e-3


@pytest.mark.parametrize('name', BAD)
def test_bad_layouts_are_rejected_before_compile(results, name):
  got = results[name, 'bad']
  assert 'losses' not in got, got
  assert BAD[name][2] in got['error'] and '\n' not in got['error']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_save_and_resume_in_one_on_another_mesh(tmp_path):
  """2 processes x 4 devices on a (2, 4, 1) mesh, then 1 process on 1 device resumes."""
  spec = 'experiments/cnn_digits.py:smoke'
  workdir = tmp_path / 'run'
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
         ' --xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxbig', 'train', spec, *_mesh((2, 4, 1)), '--workdir',
       str(workdir), '--coordinator', f'localhost:{port}', '--num-processes', '2',
       '--process-id', str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Gloo (the CPU collectives) prints its own lines to stdout; the summary is the JSON.
  summary = json.loads(outs[0][0][outs[0][0].index('{\n'):])
  assert summary['num_devices'] == 8 and summary['step'] == 20
  assert '"workdir"' not in outs[1][0]  # Only process 0 reports.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']

  # Resume here (one process, one device) for 10 more steps; the reference does the same
  # from 20 steps in one process on one device.
  one = _mesh((1, 1, 1))
  resumed = train.train_and_evaluate(config_lib.load(spec, ['train.steps=30', *one]),
                                     str(workdir))
  assert resumed['resumed_from'] == 20 and resumed['num_devices'] == 1
  train.train_and_evaluate(config_lib.load(spec, one), str(tmp_path / 'ref'))
  reference = train.train_and_evaluate(config_lib.load(spec, ['train.steps=30', *one]),
                                       str(tmp_path / 'ref'))

  def train_losses(path):
    with open(path / 'metrics.jsonl') as f:
      return {r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r}

  got, want = train_losses(workdir), train_losses(tmp_path / 'ref')
  assert sorted(got) == sorted(want) == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                             rtol=1e-4)
  assert resumed['eval']['accuracy'] == pytest.approx(reference['eval']['accuracy'], abs=0.01)
