"""Using a trained workdir: evaluate its newest checkpoint, or predict on new inputs.

Both follow one flow: load (config.json + checkpoint), forward, interpret (class ids for
classifiers, values in the targets' original units for regressors).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxbig import checkpoint, config as config_lib, data as data_lib, precision
from jaxbig import sharding, train, workdir as workdir_lib
from jaxbig.config import ConfigError


def load(workdir: str, step: int | None = None
         ) -> tuple[train.Setup, train.TrainState, int, data_lib.DataMeta]:
  """Rebuilds a run from its workdir and restores checkpoint `step` (default: the newest),
  without its optimizer state (None): readers need the parameters only.

  Reads only, and never blocks a run training in the workdir: the step is read through hard
  links (`Checkpoints.pinned`), so the run may delete it meanwhile.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ConfigError(f'{workdir}: not a jaxbig workdir (no config.json)')
  saved = workdir_lib.saved_config(workdir)
  # This machine's devices, data parallel, whatever layout trained it.
  saved['mesh'].update(data=-1, fsdp=1, context=1, tensor=1, slices=1)
  if 'parallel' in saved:
    saved['parallel']['mode'] = 'jit'
  config = config_lib.from_dict(saved)
  try:
    config_lib.validate(config)
    s = train.setup(config)
  except (AttributeError, KeyError) as e:  # A field the code needs is not in the file.
    raise ConfigError(f'{path}: lacks a field this jaxbig needs ({e}); it was written by '
                      'another version or edited') from None
  # Read about 1 GB at a time: the host holds no second copy of the parameters.
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True,
                                 concurrent_gb=checkpoint.bound_gb(train.abstract_state(s)))
  with ckpts.pinned(step) as (view, picked):
    state, _, meta = train.restore(s, view, picked, reader=True)
  return s, state, picked, data_lib.DataMeta.from_json(meta)


def evaluate(workdir: str) -> dict:
  """Validation and test metrics of the newest checkpoint."""
  s, state, step, _ = load(workdir)
  steps = train.compile_steps(s, state, with_train=False)
  return {'step': step, 'val': train.evaluate(s, steps, state, 'val'),
          'test': train.evaluate(s, steps, state, 'test')}


def predict(workdir: str, inputs: np.ndarray) -> np.ndarray:
  """Class ids (classifiers) or predictions in original units (regressors) for raw inputs."""
  s, state, _, meta = load(workdir)
  if meta.task not in ('classification', 'regression') or s.config.train.loss not in ('xent',
                                                                                       'mse'):
    hint = 'use jaxbig generate' if meta.task == 'lm' else 'it reconstructs its inputs'
    raise ConfigError(f'{workdir}: predict supports classifiers and regressors; this run trained '
                      f'model.name={s.config.model.name} with train.loss={s.config.train.loss} '
                      f'({hint})')
  x = np.asarray(inputs, np.float32)
  grey = len(meta.input_shape) == 3 and meta.input_shape[-1] == 1
  if x.shape == meta.input_shape or (grey and x.shape == meta.input_shape[:2]):
    x = x[None]  # A single example.
  if grey and x.shape[1:] == meta.input_shape[:2]:
    x = x[..., None]  # Grey images given as (N, H, W).
  if x.shape[1:] != meta.input_shape:
    raise ConfigError(f'input has examples of shape {x.shape[1:]}, the model takes '
                      f'{meta.input_shape}')
  x = meta.normalize(x)
  apply = jax.jit(lambda st, xb: train._forward(s.model, st.params, st.batch_stats, xb,
                                                train=False)[0])
  # Fixed-size chunks, padded, so that any number of inputs costs one compile.
  bs = s.config.data.eval_batch_size
  out = []
  for start in range(0, len(x), bs):
    xb = x[start:start + bs]
    n = len(xb)
    xb = np.concatenate([xb, np.zeros((bs - n, *xb.shape[1:]), np.float32)])
    with precision.tracing(s.policy):  # The run's matmul precision.
      y = apply(state, jax.device_put(xb, sharding.batch_sharding(s.mesh)))
    out.append(np.asarray(y)[:n])
  y = np.concatenate(out)
  if meta.task == 'classification':
    return y.argmax(-1).astype(np.int32)
  y = y * meta.y_std + meta.y_mean
  return y[:, 0] if y.shape[1] == 1 else y
