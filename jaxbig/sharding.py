"""Device mesh with axes (data, fsdp, tensor) and the logical-axis rules that map parameters onto it.

Parameters carry logical axis names (see `jaxbig.models.init`); `RULES` maps each logical name
to a mesh axis (or None: replicated). Batches are split over data x fsdp.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbig.config import ConfigError

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')

# Logical parameter axis -> mesh axis. FSDP shards the input side of weights, tensor
# parallelism the output side (Megatron-style column split).
RULES = (
    ('batch', BATCH),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('classes', None),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('layers', None),
)


def mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor) from `mesh.*`; one -1 takes the remaining devices."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError('mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1')
  for name, s in zip(AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f'mesh.{name} must be positive or -1, got {s}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh.data/fsdp/tensor: {num_devices} devices cannot be split into data x fsdp x tensor '
                        f'with the fixed sizes {sizes}')
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh.data x mesh.fsdp x mesh.tensor = {math.prod(sizes)} but there are '
                      f'{num_devices} devices')
  return tuple(sizes)


def make_mesh(cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_boxed, mesh: Mesh):
  """NamedShardings for a tree whose leaves may be logically-partitioned boxes."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def check_batch(batch_size: int, mesh: Mesh, field: str = 'data.batch_size') -> None:
  """The batch must split evenly over the data-parallel devices."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % n:
    raise ConfigError(f'{field} ({batch_size}) must be divisible by mesh data x fsdp ({n})')
