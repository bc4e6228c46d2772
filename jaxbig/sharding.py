"""Device mesh with axes (data, fsdp, context, tensor) and the logical-axis rules that map arrays
onto it.

Parameters carry logical axis names (see `jaxbig.models.axes`) and activations logical
constraints; `RULES` maps each logical name to mesh axes (or None: replicated), and the config
field `mesh.rules` overrides entries. Batches are split over data x fsdp; `context` splits a
Transformer's sequence positions (activations only: long sequences whose activations one device
cannot hold). With `mesh.slices` > 1 the data axis spans several TPU slices (multi-slice:
data-parallel over the data-center network, everything else within a slice). In a run of several
processes each one loads only the rows of a batch that its devices hold (`process_rows`) and
`to_global` assembles the global array.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbig.config import ConfigError

AXES = ('data', 'fsdp', 'context', 'tensor')
BATCH = ('data', 'fsdp')

# Logical parameter axis -> mesh axis. FSDP shards the input side of weights, tensor
# parallelism the output side (Megatron-style column split). Context devices shard weights
# as FSDP does (as in MaxText): each holds part of every sequence, so their gradients are
# reduce-scattered together with fsdp's, not all-reduced whole.
RULES = (
    ('batch', BATCH),
    ('embed', ('fsdp', 'context')),
    ('mlp', 'tensor'),
    ('classes', None),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('layers', None),
    ('length', 'context'),
    ('tokens', ('data', 'fsdp', 'context')),  # Rows of B x L token matrices (T = B L).
    ('act_embed', None),
)


def rules(cfg) -> tuple:
  """`RULES` with the overrides of `mesh.rules`: 'name=axis,...'; axes joined by '+', or 'none'.

  For example `mesh.rules=embed=none,vocab=fsdp` replicates the embedding width and shards
  the vocabulary over fsdp; `batch=data` keeps fsdp devices from splitting the batch.
  """
  table = dict(RULES)
  text = cfg.get('rules', '') or ''
  for item in filter(None, (t.strip() for t in text.split(','))):
    name, sep, value = item.partition('=')
    if not sep or name not in table:
      raise ConfigError(f"mesh.rules: '{item}' must be logical=axis with logical one of "
                        f"{', '.join(table)}")
    axes = tuple(a for a in value.split('+') if a and a != 'none')
    if any(a not in AXES for a in axes):
      raise ConfigError(f"mesh.rules: '{item}': mesh axes are {', '.join(AXES)} (or none)")
    table[name] = axes[0] if len(axes) == 1 else (axes or None)
  return tuple(table.items())


def mesh_shape(cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, context, tensor) from `mesh.*`; one -1 takes the remaining
  devices. `mesh.context` is absent from configs written before it existed: 1."""
  sizes = [cfg.data, cfg.fsdp, cfg.get('context', 1), cfg.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError('mesh: at most one of mesh.data, mesh.fsdp, mesh.context, mesh.tensor may '
                      'be -1')
  for name, s in zip(AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f'mesh.{name} must be positive or -1, got {s}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh.data/fsdp/context/tensor: {num_devices} devices cannot be split '
                        f'into data x fsdp x context x tensor with the fixed sizes {sizes}')
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh.data x mesh.fsdp x mesh.context x mesh.tensor = {math.prod(sizes)} '
                      f'but there are {num_devices} devices')
  return tuple(sizes)


def slices(cfg) -> int:
  """`mesh.slices`: TPU slices the data axis spans (1 where the field is absent)."""
  n = cfg.get('slices', 1)
  if not isinstance(n, int) or n < 1:
    raise ConfigError(f'mesh.slices must be a positive integer, got {n}')
  return n


def make_mesh(cfg, devices=None) -> Mesh:
  """The (data, fsdp, context, tensor) mesh over all (or the given) devices.

  `jax.make_mesh` orders TPU devices along the physical interconnect; on other platforms the
  order is process by process, so each process holds a contiguous block of batch rows. With
  `mesh.slices` > 1 the devices must come from that many TPU slices (their `slice_index`):
  `mesh_utils.create_hybrid_device_mesh` lays each slice out as a (data / slices, fsdp,
  context, tensor) mesh of its own and joins the slices along data, so only the data axis's
  gradient reduction crosses between slices.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  n = slices(cfg)
  found = {getattr(d, 'slice_index', 0) for d in devices}
  if n > 1:
    return Mesh(_hybrid_devices(shape, n, devices), AXES, axis_types=auto)
  if len(found) > 1:
    raise ConfigError(f'mesh.slices=1 but the devices come from {len(found)} TPU slices: set '
                      f'mesh.slices={len(found)} so that only the data axis spans them')
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):  # No topology-aware layout for this shape.
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _hybrid_devices(shape: tuple[int, ...], n: int, devices: list) -> np.ndarray:
  """Devices of `n` slices in a `shape` array, the data axis split across slices."""
  found = {getattr(d, 'slice_index', None) for d in devices}
  if None in found or len(found) != n:
    have = 'devices without slice numbers' if None in found else f'{len(found)} slice(s)'
    raise ConfigError(f'mesh.slices={n}: the devices come from {have}; multi-slice runs need '
                      f'{n} TPU slices (plan one with --topology GEN:AxB --slices {n})')
  if shape[0] % n:
    raise ConfigError(f'mesh.slices={n} must divide mesh.data ({shape[0]}): the data axis is '
                      'the one that spans slices')
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  per_slice = (shape[0] // n, *shape[1:])
  try:
    return mesh_utils.create_hybrid_device_mesh(per_slice, (n,) + (1,) * (len(shape) - 1),
                                                devices)
  except (ValueError, AssertionError, NotImplementedError) as e:
    raise ConfigError(f'mesh: cannot lay a {per_slice} mesh over each of {n} slices: '
                      f'{str(e).splitlines()[0]}') from None


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_boxed, mesh: Mesh, rule_table=RULES):
  """NamedShardings for a tree whose leaves may be logically-partitioned boxes."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def check_divisible(abstract_boxed, shardings) -> None:
  """Every sharded dimension must split evenly over its mesh axes; names the first that does not."""
  flat = jax.tree_util.tree_flatten_with_path(
      abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings)):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
    shape = leaf.value.shape if isinstance(leaf, nn.LogicallyPartitioned) else leaf.shape
    for dim, (size, axes) in enumerate(zip(shape, sh.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      n = math.prod(sh.mesh.shape[a] for a in axes)
      if size % n:
        where = jax.tree_util.keystr(path, simple=True, separator='/')
        logical = f" ('{names[dim]}')" if dim < len(names) else ''
        fields = ' x '.join(f'mesh.{a}={sh.mesh.shape[a]}' for a in axes)
        raise ConfigError(f'{fields}: does not divide dimension {dim}{logical} of size {size} of '
                          f'{where}; pick mesh sizes that divide the model widths')


def process_rows(batch_sh: NamedSharding, size: int) -> tuple[int, int]:
  """The rows [lo, hi) of a `size`-row batch that this process's devices hold."""
  index_map = batch_sh.addressable_devices_indices_map((size,))
  spans = {(i[0].start or 0, size if i[0].stop is None else i[0].stop) for i in index_map.values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ConfigError('mesh: this process holds batch rows that are not contiguous; order the '
                      'devices so that each process holds whole data x fsdp slices')
  return lo, hi


def to_global(local: dict, batch_sh: NamedSharding, size: int) -> dict:
  """One global batch array per field from this process's rows (see `process_rows`)."""
  return {k: jax.make_array_from_process_local_data(batch_sh, v, (size, *v.shape[1:]))
          for k, v in local.items()}


def check_batch(batch_size: int, mesh: Mesh, field: str = 'data.batch_size') -> None:
  """The batch must split evenly over the data-parallel devices."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % n:
    raise ConfigError(f'{field} ({batch_size}) must be divisible by mesh data x fsdp ({n})')
