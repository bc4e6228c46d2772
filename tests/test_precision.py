"""Precision policies: the dtypes and matmul precision in the compiled step, and training close
to fp32 (fp16, fp8 and int8 are still to come: issue 5)."""

import re

import jax
import numpy as np
import pytest

from jaxbig import config as config_lib, precision, train
from jaxbig.config import ConfigError

MODELS = {
    'cnn': 'experiments/cnn_digits.py:smoke',
    'transformer': 'experiments/gpt_stdlib.py:smoke',
}
STEPS = 10


def _setup(model: str, name: str):
  return train.setup(config_lib.load(MODELS[model], ['mesh.data=1', f'precision={name}']))


def _matmuls(s) -> list[str]:
  text = train.lower_train_step(s).as_text()
  return re.findall(r'stablehlo\.(?:dot_general|convolution)[^\n]*', text)


@pytest.mark.parametrize('model', MODELS)
def test_compiled_step_has_the_policy_types(model):
  fp32, tf32, bf16 = (_matmuls(_setup(model, p)) for p in ('fp32', 'tf32', 'bf16'))
  assert fp32 and len(fp32) == len(tf32) == len(bf16)
  assert all(m.count('HIGHEST') == 2 for m in fp32)  # Both operands.
  assert not any('HIGHEST' in m for m in tf32 + bf16)
  assert not any('bf16' in m for m in fp32 + tf32)
  # Most matmuls take bfloat16 operands; the logits and the loss stay float32.
  assert sum('xbf16>' in m for m in bf16) > len(bf16) // 2


def _losses(model: str, name: str) -> list[float]:
  s = _setup(model, name)
  state = train.init_state(s)
  steps = train.compile_steps(s, state, with_eval=False)
  it = s.data.train_iter()
  out = []
  for _ in range(STEPS):
    state, sums = steps.train(state, next(it))
    sums = jax.device_get(sums)
    out.append(float(sums['loss']) / float(sums['count']))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  return out


@pytest.mark.parametrize('model', MODELS)
def test_precisions_train_close_to_fp32(model):
  fp32, tf32, bf16 = (_losses(model, p) for p in ('fp32', 'tf32', 'bf16'))
  assert fp32[-1] < fp32[0] - 0.1  # It trains.
  np.testing.assert_allclose(tf32, fp32, rtol=1e-5)  # CPUs have no TF32: the same numbers.
  np.testing.assert_allclose(bf16, fp32, rtol=0.03)
  assert max(abs(a - b) for a, b in zip(bf16, fp32)) > 1e-4  # bf16 really computes in bf16.


def test_unknown_precision_is_one_line():
  with pytest.raises(ConfigError, match="^precision: unknown precision 'fp64'; choose from"):
    precision.get(config_lib.load(MODELS['cnn'], ['precision=fp64']))
