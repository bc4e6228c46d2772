"""`jaxbig quantize WORKDIR --to int8` and `jaxbig eval WORKDIR/int8`: post-training int8.

One small CNN is trained on digits to about 97% test accuracy; its int8 copy must stay
within one point of it, really compute in int8, and be about a quarter of the size.
"""

import json
import re

import jax
import jax.numpy as jnp
import pytest

import conftest
from jaxbig import cli, config as config_lib, train
from jaxbig.tools import inference, quantize

CNN = 'experiments/cnn_digits.py:smoke'
OVERRIDES = ['train.steps=400', 'model.features=16,32', 'model.hidden=128',
             'train.log_every=100', 'train.eval_every=0', 'train.ckpt_every=0']


_main = conftest.run_cli  # (exit code, stdout, stderr) of the command, in-process.


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp('ptq') / 'wd'
  train.train_and_evaluate(config_lib.load(CNN, OVERRIDES), str(wd))
  return wd


@pytest.fixture(scope='module')
def report(workdir):
  """(quantize's output, eval's output) of the command-line calls."""
  code = cli.main(['quantize', str(workdir), '--to', 'int8'])
  assert code == 0
  return quantize.evaluate(str(workdir / 'int8'))


@pytest.mark.slow(reason='trains and quantises a run')
def test_int8_keeps_digits_accuracy_within_one_point(report):
  flt, q = report['float']['test'], report['int8']['test']
  assert flt['accuracy'] > 0.93  # A model worth quantising.
  assert abs(report['change']['test']['accuracy']) <= 0.01
  assert report['change']['test']['accuracy'] == pytest.approx(q['accuracy'] - flt['accuracy'])
  # The int8 model is a different function: its loss moves.
  assert report['change']['test']['loss'] != 0.0
  assert abs(report['change']['test']['loss']) < 0.05


def test_int8_model_is_about_a_quarter_of_the_size(report, workdir):
  sizes = report['bytes']
  assert sizes['float'] == sum(x.nbytes for x in jax.tree.leaves(
      inference.load(str(workdir))[1].params))
  assert 3.0 < sizes['ratio'] < 4.0  # int8 weights; float32 biases and per-channel scales.


def test_quantized_model_runs_int8_matmuls(workdir):
  s, state, _, meta = inference.load(str(workdir))
  model, abstract = quantize._ptq_model(s, 'int8')
  x = jnp.zeros((4, *meta.input_shape), jnp.float32)
  text = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)).lower(
      abstract, x).as_text()
  ops = re.findall(r'stablehlo\.(?:dot_general|convolution)[^\n]*', text)
  assert len(ops) == 4  # Two convolutions, two dense layers.
  assert all(re.search(r'xi8>, tensor<[^>]*xi8>\)', op) for op in ops), ops


def test_eval_prints_both_models(report, workdir, capsys):
  code, out, _ = _main(capsys, 'eval', workdir / 'int8')
  assert code == 0
  printed = json.loads(out)
  assert printed['int8'] == report['int8'] and printed['float'] == report['float']
  assert printed['step'] == 400


def test_quantize_never_overwrites(report, workdir, capsys):
  before = sorted(p.name for p in (workdir / 'int8').iterdir())
  code, out, err = _main(capsys, 'quantize', workdir)
  assert code == 2 and not out
  assert err.count('\n') == 1 and 'int8 exists' in err
  assert sorted(p.name for p in (workdir / 'int8').iterdir()) == before


def test_quantize_needs_a_checkpoint(workdir, capsys, tmp_path):
  (tmp_path / 'config.json').write_bytes((workdir / 'config.json').read_bytes())
  code, _, err = _main(capsys, 'quantize', tmp_path)
  assert code == 2
  assert err.count('\n') == 1 and 'has no checkpoint' in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']


def test_quantize_rejects_an_unknown_target(workdir, capsys):
  code, _, err = _main(capsys, 'quantize', workdir, '--to', 'int4')
  assert code == 2
  assert err.count('\n') == 1 and "--to: unknown target 'int4'" in err
  assert not (workdir / 'int4').exists()
