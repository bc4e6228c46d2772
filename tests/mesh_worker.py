"""Runs training steps on 8 fake CPU devices for the tests (in its own process, beside them).

The device count is fixed when JAX starts, so the tests run this script with XLA_FLAGS set
rather than changing the whole test session. Usage: `mesh_worker.py JOBS.json OUT.json`;
JOBS.json is a list of jobs, each {"spec", "overrides", "devices", "steps"} and optionally
"interpret" (Pallas TPU kernels in Pallas's interpreter) and "matmuls"; OUT.json gets a
list of results, each {"losses": per-step mean loss, "split": the most ways any parameter is
split, "matmuls": the train step's dot_general and convolution lines of StableHLO where the
job asks for them with "matmuls": true} or {"error"}.
"""

import contextlib
import json
import os
import re
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from jaxbig import config as config_lib, data as data_lib, parallel, train  # pylint: disable=g-import-not-at-top
from jaxbig.config import ConfigError  # pylint: disable=g-import-not-at-top
from jaxbig.models import transformer  # pylint: disable=g-import-not-at-top

_build, _built = data_lib.build, {}


def _cached_build(cfg, seed):
  """The jobs share a few data sets: load each once."""
  key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), seed)
  if key not in _built:
    _built[key] = _build(cfg, seed)
  return _built[key]


data_lib.build = _cached_build


def _split(state) -> int:
  """The most pieces any parameter is cut into across the mesh (1: all replicated)."""
  params = jax.tree.leaves(state.params)
  if not hasattr(params[0], 'sharding') or params[0].ndim == 0:
    return 1
  shard = lambda x: x.sharding.shard_shape(x.shape)
  return max(int(np.prod(x.shape) // max(np.prod(shard(x)), 1)) for x in params)


def run(job: dict) -> dict:
  try:
    config = config_lib.load(job['spec'], job['overrides'])
    s = train.setup(config, jax.devices()[:job['devices']])
    state = train.init_state(s)
    split = _split(state)
    matmuls = None
    if job.get('matmuls'):  # jit only: lower once, keep the matmuls' text, compile that.
      lowered = train.lower_train_step(s)
      matmuls = re.findall(r'stablehlo\.(?:dot_general|convolution)[^\n]*', lowered.as_text())
      steps = parallel.jit_steps(s, lowered.compile(), None, 0.0)
    else:
      steps = train.compile_steps(s, state, with_eval=False)
  except ConfigError as e:
    return {'error': str(e)}
  state = steps.place(state)
  it = s.data.train_iter(steps.rows(config.data.batch_size))
  losses = []
  for _ in range(job['steps']):
    state, sums = steps.train(state, next(it))
    sums = jax.device_get(sums)
    losses.append(float(sums['loss']) / float(sums['count']))
  return {'losses': losses, 'split': split, 'matmuls': matmuls}


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    jobs = json.load(f)
  results = []
  for job in jobs:  # "interpret": the Pallas TPU kernels run in Pallas's interpreter.
    with transformer.interpret() if job.get('interpret') else contextlib.nullcontext():
      results.append(run(job))
  with open(sys.argv[2] + '.tmp', 'w') as f:
    json.dump(results, f)
  os.replace(sys.argv[2] + '.tmp', sys.argv[2])
