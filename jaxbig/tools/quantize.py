"""Post-training quantisation: `jaxbig quantize WORKDIR --to int8`, and evaluating the result.

The seeds' deployment story: a float model, trained once, served with int8 weights. Qwix's PTQ
provider intercepts the model's matmuls and convolutions: their weights are stored as int8
with a float32 scale per output channel (absmax), and their activations are quantised to int8
on the fly with scales computed at run time (dynamic quantisation), so nothing needs
calibration data. Biases, norms and embedding tables stay float32.

    WORKDIR/int8/params/          the quantised parameters (Orbax)
    WORKDIR/int8/quantized.json   the source step and the sizes of both models

`jaxbig eval WORKDIR/int8` evaluates the float checkpoint it came from and the quantised model
on the same splits, and reports the change in every metric and the size of both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxbig import kernels as kernels_lib, models, sharding, train
from jaxbig.tools import inference
from jaxbig import workdir as workdir_lib
from jaxbig.config import ConfigError

TARGETS = ('int8',)
INFO = 'quantized.json'


def _check_target(to: str) -> None:
  if to not in TARGETS:
    raise ConfigError(f"--to: unknown target '{to}'; choose from {', '.join(TARGETS)}")


def _ptq_model(s: train.Setup, to: str) -> tuple[nn.Module, dict]:
  """The float32 model with quantised matmuls, and its abstract quantised parameters."""
  import qwix
  kernels = kernels_lib.select(s.config.kernels, s.mesh.devices.flat[0].platform,
                               quantized=True)
  base = models.build(s.config.model, s.data.meta, jnp.float32, kernels,
                      s.mesh.devices.flat[0].platform)
  rule = qwix.QuantizationRule(module_path='.*', weight_qtype=to, act_qtype=to)
  model = qwix.quantize_model(base, qwix.PtqProvider([rule]))
  meta = s.data.meta
  x = jnp.zeros((1, *meta.input_shape), jnp.int32 if meta.vocab_size else jnp.float32)
  rngs = {name: jax.random.key(0) for name in ('params', 'dropout', 'sample')}
  abstract = jax.eval_shape(lambda: model.init(rngs, x, train=False))['params']
  return model, nn.meta.unbox(abstract)


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def quantize(workdir: str, to: str = 'int8') -> dict:
  """Quantises the newest checkpoint of `workdir` into `workdir/<to>`; returns its info."""
  import qwix
  _check_target(to)
  out_dir = os.path.join(workdir, to)
  if os.path.exists(out_dir):
    raise ConfigError(f'{out_dir} exists; remove it to quantise again (a saved model is never '
                      'overwritten)')
  s, state, step, _ = inference.load(workdir)
  model, abstract = _ptq_model(s, to)
  qparams = qwix.quantize_params(state.params, abstract)
  info = {'source_step': step, 'to': to, 'float_bytes': nbytes(state.params),
          'quantized_bytes': nbytes(qparams)}
  info['ratio'] = info['float_bytes'] / info['quantized_bytes']
  # Written beside, then renamed: an interrupted run leaves no half-written model behind.
  tmp = out_dir + f'.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(tmp, 'params')), qparams)
    ckptr.wait_until_finished()
    ckptr.close()
    workdir_lib.write_json(os.path.join(tmp, INFO), info)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {'out': out_dir, **info}


def is_quantized(path: str) -> bool:
  return os.path.isfile(os.path.join(path, INFO))


def evaluate(qdir: str) -> dict:
  """Metrics of the float checkpoint and of its quantised model, their change and sizes."""
  with open(os.path.join(qdir, INFO)) as f:
    info = json.load(f)
  workdir = os.path.dirname(os.path.abspath(qdir))
  s, state, step, _ = inference.load(workdir, info['source_step'])
  model, abstract = _ptq_model(s, info['to'])
  replicated = sharding.replicated(s.mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        abstract)
  ckptr = ocp.StandardCheckpointer()
  qparams = ckptr.restore(os.path.abspath(os.path.join(qdir, 'params')), target)
  ckptr.close()
  qstate = state.replace(params=qparams)
  qs = dataclasses.replace(s, model=model, abstract_boxed=jax.eval_shape(lambda: qstate),
                           shardings=jax.tree.map(lambda _: replicated, qstate))
  out = {'step': step, 'to': info['to']}
  for name, setup, st in (('float', s, state), (info['to'], qs, qstate)):
    steps = train.compile_steps(setup, st, with_train=False)
    out[name] = {split: train.evaluate(setup, steps, st, split) for split in ('val', 'test')}
  out['change'] = {split: {k: out[info['to']][split][k] - v
                           for k, v in out['float'][split].items()}
                   for split in ('val', 'test')}
  out['bytes'] = {'float': info['float_bytes'], info['to']: info['quantized_bytes'],
                  'ratio': info['ratio']}
  return out
