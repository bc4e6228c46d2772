"""Tests of the `jaxbig` command: the train workdir contract, eval, predict, and bad input.

One real `jaxbig train ...:smoke` subprocess (the `python -m jaxbig` module run as
__main__) makes a workdir that the eval and predict tests share. Everything else calls `jaxbig.cli.main` in-process: bad input must end
in exit code 2 with one line on stderr, before anything is written.
"""

import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

import conftest
from jaxbig import config as config_lib
from jaxbig import data as data_lib
from jaxbig import hostmem

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / 'experiments' / 'cnn_digits.py') + ':smoke'
# Overrides of the trained run; both must show up in config.json and in the logs.
LR, LOG_EVERY = 0.003, 4
STEPS = 20  # cnn_digits:smoke.


# `python -m jaxbig ARGV`, then (test_tensorboard_writer_does_not_import_torch) torch must
# not have been imported and must still import: one process for both (each costs a JAX start).
# It runs in the environment the command would restart itself with (jaxbig.hostmem), so that
# this process is the one that trains (test_hostmem tests the restart).
_RUN_THEN_IMPORT_TORCH = (
    'import runpy, sys\n'
    'try:\n'
    '  runpy.run_module("jaxbig", run_name="__main__", alter_sys=True)\n'
    'except SystemExit as e:\n'
    '  code = e.code\n'
    'assert "torch" not in sys.modules\n'
    'import torch\n'
    'sys.exit(code)\n')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, summary, stdout, torch imports) of one real smoke run of the command, with a
  stand-in torch package first on the path that records each import of it in the file
  `torch imports`."""
  tmp = tmp_path_factory.mktemp('run')
  workdir, marker, fake = tmp / 'wd', tmp / 'imports', tmp / 'site' / 'torch'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text(f'open({str(marker)!r}, "a").write("x")\nTensor = object\n')
  cmd = [sys.executable, '-c', _RUN_THEN_IMPORT_TORCH, 'train', SMOKE, f'opt.lr={LR}',
         f'train.log_every={LOG_EVERY}', '--workdir', str(workdir)]
  path = [str(tmp / 'site'), str(REPO)] + [
      p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(path)}
  env = hostmem.tuned_environ(env, hostmem.glibc_version()) or env
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  return workdir, summary, proc.stdout, marker


def _read_metrics(workdir) -> list[dict]:
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def _read_events(path) -> list:
  """The Event protos of a TensorBoard events file (TFRecord framing, CRCs not checked)."""
  from tensorboardX.proto import event_pb2
  events, raw = [], pathlib.Path(path).read_bytes()
  pos = 0
  while pos < len(raw):
    (length,) = struct.unpack('<Q', raw[pos:pos + 8])
    event = event_pb2.Event()
    event.ParseFromString(raw[pos + 12:pos + 12 + length])
    events.append(event)
    pos += 12 + length + 4
  return events


_main = conftest.run_cli  # (exit code, stdout, stderr) of the command, in-process.


def _assert_one_line_error(err: str, *needles: str) -> None:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('jaxbig: error: '), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow(reason='runs the command end to end')
def test_train_writes_the_resolved_config(trained):
  workdir, _, stdout, _ = trained
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  expected = config_lib.to_dict(config_lib.load(SMOKE, [f'opt.lr={LR}',
                                                        f'train.log_every={LOG_EVERY}']))
  assert saved == expected
  defaults = config_lib.to_dict(config_lib.load(SMOKE))
  assert config_lib.diff(defaults, saved) == ['opt.lr', 'train.log_every']
  assert json.loads(stdout)['workdir'] == str(workdir)


def test_train_logs_metrics_lines(trained):
  workdir, summary, _, _ = trained
  lines = _read_metrics(workdir)
  assert all(isinstance(l['step'], int) for l in lines)
  steps = [l['step'] for l in lines]
  assert steps == sorted(steps)
  train = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert all(np.isfinite(l['train/loss']) for l in train)
  assert summary['train_loss'] == pytest.approx(train[-1]['train/loss'])
  # The other lines are evaluations (every train.eval_every=10 steps and the final one).
  assert [l['step'] for l in lines if 'eval/accuracy' in l] == [10, STEPS]


def test_train_writes_tensorboard_events(trained):
  workdir, _, _, _ = trained
  files = list((workdir / 'tb').glob('events.out.tfevents.*'))
  assert len(files) == 1 and files[0].stat().st_size > 0
  losses = {e.step: v.simple_value for e in _read_events(files[0]) if e.HasField('summary')
            for v in e.summary.value if v.tag == 'train/loss'}
  logged = {l['step']: l['train/loss'] for l in _read_metrics(workdir) if 'train/loss' in l}
  assert len(logged) == STEPS // LOG_EVERY
  assert losses.keys() == logged.keys()
  for step, loss in logged.items():
    assert losses[step] == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow(reason='runs the command end to end')
def test_tensorboard_writer_does_not_import_torch(trained):
  """tensorboardX imports torch, where installed, for a type hint. The stand-in torch
  package of the trained run shows that the run (its TensorBoard writer included) leaves
  it alone, and that torch still imports afterwards."""
  workdir, _, _, marker = trained
  assert marker.read_text() == 'x'  # Once: the last `import torch`, not tensorboardX's.
  assert len(_read_events(next((workdir / 'tb').glob('events.*')))) > 1


def test_train_writes_checkpoints_and_summary(trained):
  workdir, summary, stdout, _ = trained
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [10, STEPS]  # train.ckpt_every=10, and the last step.
  for key in ('step', 'train_loss', 'eval', 'wall_s', 'compile_s', 'steps_per_s',
              'device_kind', 'num_devices'):
    assert key in summary, key
  assert summary['step'] == STEPS
  assert set(summary['eval']) >= {'accuracy', 'loss'}
  assert 0 <= summary['eval']['accuracy'] <= 1 and summary['eval']['loss'] > 0
  assert summary['wall_s'] > summary['compile_s'] > 0 and summary['steps_per_s'] > 0
  assert isinstance(summary['device_kind'], str) and summary['device_kind']
  assert isinstance(summary['num_devices'], int) and summary['num_devices'] >= 1
  printed = json.loads(stdout)
  assert printed['eval'] == summary['eval'] and printed['step'] == STEPS


def test_eval_reproduces_the_summary(trained, capsys):
  workdir, summary, _, _ = trained
  code, out, _ = _main(capsys, 'eval', workdir)
  assert code == 0
  result = json.loads(out)
  assert result['step'] == STEPS
  assert result['test']['accuracy'] == pytest.approx(summary['eval']['accuracy'], abs=1e-9)
  assert result['test']['loss'] == pytest.approx(summary['eval']['loss'], rel=1e-4)
  assert result['val']['accuracy'] == pytest.approx(summary['val']['accuracy'], abs=1e-9)


@pytest.fixture(scope='module')
def test_split(trained):
  """The trained run's raw test images (N, 8, 8) and labels, rebuilt from its config.json."""
  workdir, _, _, _ = trained
  with open(workdir / 'config.json') as f:
    config = config_lib.from_dict(json.load(f))
  x, y = data_lib.build(config.data, config.seed).splits['test']
  return x[..., 0], y


def test_predict_writes_class_ids(trained, test_split, capsys, tmp_path):
  workdir, summary, _, _ = trained
  x, y = test_split
  np.save(tmp_path / 'x.npy', x)
  code, out, _ = _main(capsys, 'predict', workdir, tmp_path / 'x.npy', '--out',
                       tmp_path / 'y.npy')
  assert code == 0 and f'{len(x)} predictions' in out
  preds = np.load(tmp_path / 'y.npy')
  assert preds.shape == (len(x),) and np.issubdtype(preds.dtype, np.integer)
  assert preds.min() >= 0 and preds.max() < 10
  # Raw images in, the training normalisation applied: the same accuracy as the run's eval.
  assert np.mean(preds == y) == pytest.approx(summary['eval']['accuracy'], abs=1e-9)
  # A channel axis given explicitly changes nothing.
  np.save(tmp_path / 'x4.npy', x[..., None])
  assert _main(capsys, 'predict', workdir, tmp_path / 'x4.npy')[0] == 0
  np.testing.assert_array_equal(np.load(tmp_path / 'x4.pred.npy'), preds)


@pytest.mark.parametrize('channel', [True, False], ids=['8x8x1', '8x8'])
def test_predict_accepts_a_single_image(trained, test_split, capsys, tmp_path, channel):
  workdir, _, _, _ = trained
  x = test_split[0][:50]
  np.save(tmp_path / 'x.npy', x)
  assert _main(capsys, 'predict', workdir, tmp_path / 'x.npy')[0] == 0
  preds = np.load(tmp_path / 'x.pred.npy')
  # Two images with different predictions, so that answering for the wrong one shows.
  i, j = 0, int(np.flatnonzero(preds != preds[0])[0])
  for k in (i, j):
    one = x[k][..., None] if channel else x[k]
    np.save(tmp_path / f'one{k}.npy', one)
    code, _, err = _main(capsys, 'predict', workdir, tmp_path / f'one{k}.npy')
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / f'one{k}.pred.npy'), preds[k:k + 1])


def test_predict_never_overwrites(trained, test_split, capsys, tmp_path):
  workdir, _, _, _ = trained
  np.save(tmp_path / 'x.npy', test_split[0][:5])
  out = tmp_path / 'y.npy'
  out.write_bytes(b'keep me')
  code, stdout, err = _main(capsys, 'predict', workdir, tmp_path / 'x.npy', '--out', out)
  assert code == 2 and not stdout
  _assert_one_line_error(err, str(out), 'exists')
  assert out.read_bytes() == b'keep me'


def test_predict_rejects_inputs_of_the_wrong_shape(trained, capsys, tmp_path):
  workdir, _, _, _ = trained
  np.save(tmp_path / 'x.npy', np.zeros((4, 10), np.float32))
  code, _, err = _main(capsys, 'predict', workdir, tmp_path / 'x.npy')
  assert code == 2
  _assert_one_line_error(err, '(10,)', '(8, 8, 1)')
  assert not (tmp_path / 'x.pred.npy').exists()


@pytest.mark.parametrize('command', ['eval', 'predict'])
def test_eval_and_predict_refuse_a_folder_that_is_not_a_workdir(command, capsys, tmp_path):
  folder = tmp_path / 'not_a_workdir'
  folder.mkdir()
  np.save(tmp_path / 'x.npy', np.zeros((2, 8, 8), np.float32))
  argv = [command, folder] + ([tmp_path / 'x.npy'] if command == 'predict' else [])
  code, _, err = _main(capsys, *argv)
  assert code == 2
  _assert_one_line_error(err, str(folder), 'not a jaxbig workdir')
  assert list(folder.iterdir()) == []


def test_eval_refuses_a_workdir_without_checkpoints(trained, capsys, tmp_path):
  workdir, _, _, _ = trained
  (tmp_path / 'config.json').write_bytes((workdir / 'config.json').read_bytes())
  code, _, err = _main(capsys, 'eval', tmp_path)
  assert code == 2
  _assert_one_line_error(err, str(tmp_path), 'no checkpoint')


@pytest.fixture(scope='module')
def npz_files(tmp_path_factory):
  """Data files that the table's rows name as {no_y}, {flat} and {missing}."""
  d = tmp_path_factory.mktemp('npz')
  rng = np.random.default_rng(0)
  np.savez(d / 'no_y.npz', x=rng.random((40, 8, 8)))
  np.savez(d / 'flat.npz', x=rng.random((100, 10)), y=np.arange(100) % 10)
  return {'no_y': str(d / 'no_y.npz'), 'flat': str(d / 'flat.npz'),
          'missing': str(d / 'nonexistent.npz')}


# (experiment, overrides, what the one-line message must name). Each row changes one thing
# from the smoke run that `trained` shows to work.
_BAD_TRAIN = {
    'unknown_key': (SMOKE, ['opt.lrr=1'], "'opt.lrr'"),
    'wrong_type': (SMOKE, ['train.steps=abc'], 'train.steps'),
    'wrong_item_type': (SMOKE, ['model.features=a,b'], 'model.features'),
    'no_equals': (SMOKE, ['opt.lr'], "'opt.lr'"),
    'missing_experiment': (str(REPO / 'experiments' / 'nope.py'), [], 'nope.py'),
    'unknown_variant': (str(REPO / 'experiments' / 'cnn_digits.py:huge'), [], 'huge'),
    'missing_npz': (SMOKE, ['data.name=npz', 'data.path={missing}'], 'nonexistent.npz'),
    'npz_without_y': (SMOKE, ['data.name=npz', 'data.path={no_y}'], "'y'"),
    'npz_not_images': (SMOKE, ['data.name=npz', 'data.path={flat}', 'data.augment_shift=0'],
                       'model.name'),
    'batch_too_big': (SMOKE, ['data.batch_size=4096'], 'data.batch_size'),
    'lr_zero': (SMOKE, ['opt.lr=0'], 'opt.lr'),
    'lr_negative': (SMOKE, ['opt.lr=-1'], 'opt.lr'),
    'steps_zero': (SMOKE, ['train.steps=0'], 'train.steps'),
    'steps_negative': (SMOKE, ['train.steps=-5'], 'train.steps'),
    'unknown_optimizer': (SMOKE, ['opt.name=nadam'], 'opt.name'),
    'unknown_model': (SMOKE, ['model.name=transformers'], 'model.name'),
    'model_fields_missing': (SMOKE, ['model.name=transformer'], 'model.width'),
    'mlp_fields_missing': (SMOKE, ['model.name=mlp'], 'model.activation'),
    'lstm_fields_missing': (SMOKE, ['model.name=lstm'], 'model.depth'),
    'unknown_data': (SMOKE, ['data.name=mnist'], 'data.name'),
    'bad_mesh': (SMOKE, ['mesh.data=3'], 'mesh'),
    'mse_on_classes': (SMOKE, ['train.loss=mse'], 'train.loss'),
    'accum_not_dividing': (SMOKE, ['train.accum_steps=3'], 'train.accum_steps'),
    'warmup_too_long': (SMOKE, ['opt.warmup_steps=21'], 'opt.warmup_steps'),
    'fractions': (SMOKE, ['data.val_fraction=0.5', 'data.test_fraction=0.5'], 'data.'),
}
_BAD_TRAIN.update({
    'zero_width': (SMOKE, ['model.hidden=0'], 'model.hidden'),
    'negative_width': (SMOKE, ['model.features=-4,8'], 'model.features'),
    'dropout_above_one': (SMOKE, ['model.dropout=1.5'], 'model.dropout'),
    'unknown_init': (SMOKE, ['model.init=foo'], 'model.init'),
    'negative_split_seed': (SMOKE, ['data.split_seed=-1'], 'data.split_seed'),
    'negative_seed': (SMOKE, ['seed=-1'], 'seed'),
    'negative_shift': (SMOKE, ['data.augment_shift=-1'], 'data.augment_shift'),
    'mesh_zero': (SMOKE, ['mesh.tensor=0'], 'mesh.tensor'),
    'two_fill_axes': (SMOKE, ['mesh.fsdp=-1'], 'mesh'),
    'unknown_rule_name': (SMOKE, ['mesh.rules=embd=fsdp'], 'mesh.rules'),
    'unknown_rule_axis': (SMOKE, ['mesh.rules=embed=model'], 'mesh.rules'),
    'unknown_parallel_mode': (SMOKE, ['parallel.mode=pjit'], 'parallel.mode'),
    'unknown_precision': (SMOKE, ['precision=fp64'], 'precision'),
    'fp16_without_loss_scaling': (SMOKE, ['precision=fp16', 'loss_scale.mode=none'],
                                  'loss_scale.mode'),
    'unknown_loss_scale_mode': (SMOKE, ['loss_scale.mode=adaptive'], 'loss_scale.mode'),
    'loss_scale_below_one': (SMOKE, ['precision=fp16', 'loss_scale.init=0.5'], 'loss_scale.init'),
    'pmap_with_fsdp': (SMOKE, ['parallel.mode=pmap', 'mesh.fsdp=2'], 'parallel.mode'),
    'coordinator_alone': (SMOKE, ['--coordinator', 'localhost:1234'], '--coordinator'),
    'bad_process_id': (SMOKE, ['--coordinator', 'localhost:1234', '--num-processes', '2',
                               '--process-id', '2'], '--process-id'),
    'bad_coordinator': (SMOKE, ['--coordinator', 'localhost', '--num-processes', '2',
                                '--process-id', '0'], '--coordinator'),
})
_ROWS = [pytest.param(*row, id=name) for name, row in _BAD_TRAIN.items()]


@pytest.mark.parametrize('experiment, overrides, named', _ROWS)
def test_train_rejects_bad_input_before_writing(experiment, overrides, named, npz_files,
                                                capsys, tmp_path):
  workdir = tmp_path / 'wd'
  overrides = [o.format(**npz_files) for o in overrides]
  code, out, err = _main(capsys, 'train', experiment, *overrides, '--workdir', workdir)
  assert code == 2
  _assert_one_line_error(err, named)
  assert not out
  assert not workdir.exists()


def test_overrides_may_follow_the_workdir(capsys, tmp_path):
  workdir = tmp_path / 'wd'
  code, _, err = _main(capsys, 'train', SMOKE, '--workdir', workdir, 'opt.lr=0')
  assert code == 2
  _assert_one_line_error(err, 'opt.lr')  # Reached only if the override was applied.
  assert not workdir.exists()
