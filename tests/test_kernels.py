"""jaxbig/kernels: one policy picks every fast path, and `reference` traces none of them."""

import pytest

from jaxbig import config as config_lib, kernels, train
from jaxbig.config import ConfigError
from jaxbig.kernels import attention, rnn_scan, winograd

EXPERIMENTS = ['experiments/cnn_digits.py:smoke', 'experiments/gpt_stdlib.py:smoke',
               'experiments/seq_digits.py:gru,smoke']


def test_auto_is_the_fast_paths_on_cpus_and_the_reference_elsewhere():
  cpu = kernels.select('auto', 'cpu')
  assert (cpu.conv, cpu.attention, cpu.rnn_grad, cpu.random_bits, cpu.guard) == (
      'winograd', 'heads_major', 'fused', 'unrolled', 'branch')
  for platform in ('gpu', 'tpu'):
    other = kernels.select('auto', platform)
    assert other.name == 'auto' and other == kernels.Kernels('auto')
  assert kernels.select('reference', 'cpu') == kernels.REFERENCE
  # Quantized matmuls (Qwix) need XLA's convolutions; the other fast paths stay.
  quantized = kernels.select('auto', 'cpu', quantized=True)
  assert quantized.conv == 'xla' and quantized.attention == 'heads_major'


def test_an_unknown_policy_is_one_line_naming_the_field():
  with pytest.raises(ConfigError, match="kernels: unknown policy 'fast'"):
    config_lib.load(EXPERIMENTS[0], ['kernels=fast'])


@pytest.mark.parametrize('spec', EXPERIMENTS)
def test_reference_traces_no_fast_path_and_auto_does(spec, monkeypatch):
  """The train step of each experiment traced under both policies, counting the fast paths
  it calls (Winograd, heads-major attention, the fused RNN gradient) and the guard's branch
  in its program (the unrolled bits: tests/test_threefry.py)."""
  calls = []

  def counting(module, name):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))

  counting(winograd, 'winograd_conv')
  counting(attention, 'heads_major_attention')
  counting(rnn_scan, 'fused_scan')
  traced = {}
  for name in ('reference', 'auto'):
    calls.clear()
    s = train.setup(config_lib.load(spec, [f'kernels={name}']))
    text = train.lower_train_step(s).as_text()
    traced[name] = (sorted(set(calls)), 'stablehlo.case' in text)
  assert traced['reference'] == ([], False)
  fast = {'cnn_digits.py:smoke': 'winograd_conv', 'gpt_stdlib.py:smoke': 'heads_major_attention',
          'seq_digits.py:gru,smoke': 'fused_scan'}[spec.split('/')[-1]]
  assert fast in traced['auto'][0] and traced['auto'][1], traced
