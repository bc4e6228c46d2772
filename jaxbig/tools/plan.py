"""Ahead-of-time planning: compile the real train step for a TPU slice (or the local devices).

`plan(config, 'v5e:4x4')` builds the run exactly as `jaxbig train` would (`train.setup`), but
over compile-only TPU devices from libtpu, so a CPU machine can answer "does this config fit a
v5e-16, and what does a step cost?" before any TPU is rented. It reports, per device, the
memory XLA assigned (arguments, outputs, temporaries), whether that fits the chip's HBM, the
FLOPs of one step and the collectives in the compiled program. Without a topology it plans for
the local devices (there HBM and `fits` are known only where the backend reports a limit).

Topology names are libtpu's: `GEN:AxB` or `GEN:AxBxC` chips, GEN one of `GENERATIONS`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Any

from jaxbig import parallel, train
from jaxbig.config import ConfigError
from jaxbig.memory import fmt_bytes
from jaxbig.tools.bench import flops

GiB = 1024**3

# Nominal HBM per chip (one JAX device: v4 and v5p run as megacore, see `_topology_kwargs`).
# XLA keeps a little for itself: a v5e compile reports 15.75 GiB available.
HBM_BYTES = {'v4': 32 * GiB, 'v5e': 16 * GiB, 'v5p': 95 * GiB, 'v6e': 32 * GiB}

# `device_kind` -> generation. libtpu's compile-only devices report the first spelling of each
# ('TPU v4', 'TPU v5 lite', 'TPU v5', 'TPU v6 lite'); the others occur on TPU VMs.
GENERATIONS = {
    'TPU v4': 'v4',
    'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e',
    'TPU v5': 'v5p', 'TPU v5p': 'v5p',
    'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e',
}

_TOPOLOGY = re.compile(r'(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?')
TOPOLOGY_FORMS = 'v4|v5e|v5p|v6e:AxB[xC] chips, e.g. v5e:4x4, v6e:2x2, v4:2x2x2, v5p:2x2x1'
_HOST_BOUNDS = (2, 2, 1)  # Chips per TPU VM host, the same for all four generations.

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

# Bytes per element of HLO array types (f8 variants: 1; tokens and unknown types: 0).
_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
    'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
    'c128': 16, 's4': 0.5, 'u4': 0.5,
}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([\d,]*)\]')


def parse_topology(name: str) -> tuple[str, tuple[int, int, int]]:
  """(generation, chips per dimension) of a topology name; ConfigError for anything else."""
  m = _TOPOLOGY.fullmatch(name.strip().lower())
  if not m:
    raise ConfigError(f"--topology: unknown topology '{name}'; expected {TOPOLOGY_FORMS}")
  dims = tuple(int(d) for d in m.groups()[1:] if d is not None)
  if 0 in dims:
    raise ConfigError(f"--topology {name}: every dimension must be at least 1")
  return m.group(1), (dims + (1,))[:3]


def _libtpu_installed() -> bool:
  path = os.environ.get('TPU_LIBRARY_PATH')
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec('libtpu') is not None


def _no_local_tpu_env() -> None:
  """Lets libtpu load on a machine without TPU chips, quietly and next to other jax processes.

  libtpu takes /tmp/libtpu_lockfile when it loads; another jax process on the same machine
  (a test run, say) then holds it and planning fails. Compile-only devices touch no chip, so
  the lock protects nothing here. Where chips exist the environment is left alone.
  """
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pylint: disable=broad-except
    return  # Cannot tell: assume a TPU VM.
  if num_chips == 0:
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # Else a screenful of errors.


def _topology_kwargs(generation: str, dims: tuple[int, int, int]) -> dict:
  kwargs = {}
  if generation in ('v4', 'v5p'):
    # Two TensorCores per chip that a TPU VM shows as one device; libtpu's default for
    # compile-only v4 is one device per core (8 for v4:2x2x1).
    kwargs['chip_config_name'] = 'megacore'
  if all(d <= b for d, b in zip(dims, _HOST_BOUNDS)):  # v5e:1x1 and other part-host slices.
    kwargs['chips_per_host_bounds'] = dims
  return kwargs


def topology_devices(name: str, slices: int = 1) -> list:
  """Compile-only TPU devices of a slice, e.g. 'v5e:4x4' (16 devices over 4 hosts), or of
  `slices` such slices joined by the data-center network (each device knows its
  `slice_index`)."""
  generation, dims = parse_topology(name)
  if slices < 1:
    raise ConfigError(f'--slices must be at least 1, got {slices}')
  if not _libtpu_installed():
    raise ConfigError('--topology needs libtpu, which is not installed: pip install "jaxbig[tpu]"')
  _no_local_tpu_env()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    kwargs = _topology_kwargs(generation, dims)
    if slices > 1:
      kwargs['num_slices'] = slices
    desc = topologies.get_topology_desc(name.strip().lower(), 'tpu', **kwargs)
  except RuntimeError as e:  # JaxRuntimeError too: libtpu's own checks (v5e:3x7), in one line.
    first = str(e).strip().splitlines()[0]
    if 'not installed' in first:
      raise ConfigError('--topology needs libtpu: pip install "jaxbig[tpu]"') from None
    raise ConfigError(f'--topology {name}: libtpu says {first}') from None
  return list(desc.devices)


def _hbm_bytes(device) -> int | None:
  """Memory of one device: the backend's limit where it reports one, else the chip's HBM."""
  try:
    stats = device.memory_stats()  # Real TPUs and GPUs; None on CPU; raises if compile-only.
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  generation = GENERATIONS.get(device.device_kind)
  return HBM_BYTES.get(generation)


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return None if flops is None or flops < 0 else float(flops)


def _split_type(rest: str) -> tuple[str, str]:
  """(result type, the text after it) of an HLO instruction's right-hand side."""
  if not rest.startswith('('):
    typ, _, tail = rest.partition(' ')
    return typ, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  return rest, ''


def _type_bytes(typ: str) -> int:
  return int(sum(_DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else 0) * _prod(dims)
                 for dtype, dims in _ARRAY.findall(typ)))


def _prod(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(',')):
    n *= int(d)
  return n


def collectives(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
  """Counts and result bytes (per device) of each collective that one run of an optimized
  HLO module executes.

  A collective inside a while loop counts as many times as the loop runs (the scan over
  layers, gradient accumulation), nested loops multiplied: XLA's `known_trip_count` where
  the text has it, else the bound of a loop condition `counter < N` (a scan's counter, from
  0); in a loop of any other kind, once. An asynchronous pair (`all-gather-start` ...
  `all-gather-done`) counts as one; its bytes are the `-done` result. Reduce-scatters
  wrapped in `async-start` count in the computation it calls.
  """
  blocks, entry = _computations(hlo_text)
  if entry is None:  # Not a module's text: count its lines as they stand.
    return _direct_collectives(hlo_text)
  totals: dict[str, tuple[dict, dict]] = {}

  def total(name: str, active: frozenset) -> tuple[dict, dict]:
    if name not in totals:
      counts, sizes = _direct_collectives(blocks[name])
      for line in blocks[name].splitlines():
        for callee, times in _callees(line, blocks):
          if callee in blocks and callee not in active:
            c, b = total(callee, active | {name})
            for k in c:
              counts[k] = counts.get(k, 0) + times * c[k]
              sizes[k] = sizes.get(k, 0) + times * b[k]
      totals[name] = counts, sizes
    return totals[name]

  counts, sizes = total(entry, frozenset())
  return dict(counts), {k: sizes.get(k, 0) for k in counts}


def _direct_collectives(text: str) -> tuple[dict[str, int], dict[str, int]]:
  """Counts and result bytes of the collectives on `text`'s own lines."""
  counts, sizes = {}, {}
  for line in text.splitlines():
    lhs, eq, rest = line.partition(' = ')
    if not eq or lhs.lstrip().startswith('//'):
      continue
    typ, tail = _split_type(rest.strip())
    opcode = tail.partition('(')[0]
    base = opcode.removesuffix('-start').removesuffix('-done')
    if base not in COLLECTIVES:
      continue
    if not opcode.endswith('-done'):
      counts[base] = counts.get(base, 0) + 1
    if not opcode.endswith('-start'):
      sizes[base] = sizes.get(base, 0) + _type_bytes(typ)
  return counts, {k: sizes.get(k, 0) for k in counts}


_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.\-]+) ', re.M)
_CALLED = re.compile(r'(?:body|calls|to_apply|condition|branch_computations)=\{?%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _computations(hlo_text: str) -> tuple[dict[str, str], str | None]:
  """(computation name -> its text, the ENTRY computation's name) of an HLO module."""
  blocks, entry = {}, None
  starts = [(m.start(), m.group(2), bool(m.group(1))) for m in _COMPUTATION.finditer(hlo_text)
            if hlo_text[m.start():hlo_text.find('\n', m.start())].rstrip().endswith('{')]
  for (start, name, is_entry), (end, _, _) in zip(starts, starts[1:] + [(len(hlo_text), '', 0)]):
    blocks[name] = hlo_text[start:end]
    entry = name if is_entry else entry
  return blocks, entry


def _callees(line: str, blocks: dict[str, str]) -> list[tuple[str, int]]:
  """(computation, times it runs per run of `line`'s computation) for what `line` calls: a
  while loop's body its trip count (1 where unknown), its condition not at all (it holds no
  collectives), every branch of a conditional once (a bound), other calls once."""
  if ' while(' in line:
    body = re.search(r'body=%?([\w.\-]+)', line)
    cond = re.search(r'condition=%?([\w.\-]+)', line)
    trips = _TRIP_COUNT.search(line)
    n = int(trips.group(1)) if trips else _counted_to(blocks.get(cond.group(1), '') if cond else '')
    return [(body.group(1), n)] if body else []
  found = [(name, 1) for name in _CALLED.findall(line)]
  for group in _BRANCHES.findall(line):
    found += [(name.strip().lstrip('%'), 1) for name in group.split(',')[1:]]
  return found


def _counted_to(condition: str) -> int:
  """N for a loop condition whose result is `compare(counter, constant(N)), direction=LT`
  (how scans and fori_loops from 0 lower), else 1."""
  root = re.search(r'ROOT %?[\w.\-]+ = pred\[\][^ ]* compare\(%?([\w.\-]+), %?([\w.\-]+)\)'
                   r'.*direction=LT', condition)
  if not root:
    return 1
  const = re.search(rf'%?{re.escape(root.group(2))} = s32\[\][^ ]* constant\((\d+)\)', condition)
  return int(const.group(1)) if const else 1


def loops_with_matmuls(hlo_text: str) -> bool:
  """Whether some while loop of an HLO module runs a dot or a convolution.

  Loops without them (CPU's threefry rounds for dropout, say) cost next to nothing.
  """
  blocks, _ = _computations(hlo_text)
  bodies = re.findall(r'\swhile\(.*?body=%?([\w.\-]+)', hlo_text)
  seen, todo = set(), list(bodies)
  while todo:
    name = todo.pop()
    if name in seen or name not in blocks:
      continue
    seen.add(name)
    if re.search(r'\s(dot|convolution)\(', blocks[name]):
      return True
    todo += _CALLED.findall(blocks[name])
  return False


def plan(config, topology: str | None = None, slices: int = 1) -> dict[str, Any]:
  """Compiles the train step for `topology` (or the local devices; `slices` of it: a
  multi-slice run, whose mesh needs mesh.slices) and reports what it needs.

  Raises ConfigError for a bad topology name (before anything is built), missing libtpu or a
  bad config. A TPU compile that runs out of HBM is not an error here: the plan then has
  `fits` False, `error` XLA's message, and no memory figures.
  """
  if slices > 1 and topology is None:
    raise ConfigError('--slices needs --topology: the slices planned for are TPU slices')
  devices = topology_devices(topology, slices) if topology is not None else None
  s = train.setup(config, devices=devices)
  flat = list(s.mesh.devices.flat)
  device = flat[0]
  out = {
      'topology': topology,
      'slices': slices,
      'device_kind': device.device_kind,
      'platform': device.platform,
      'num_devices': len(flat),
      'num_hosts': len({d.process_index for d in flat}),
      'mesh': {k: int(v) for k, v in s.mesh.shape.items()},
      'batch_size': int(config.data.batch_size),
      'num_params': train.num_params(s),
      'memory_per_device': None,
      'hbm_bytes': _hbm_bytes(device),
      'fits': None,
      # cost_analysis of an SPMD program is that of one device's partition; the step's total
      # is that times the devices (replicated work, such as the optimizer update under pure
      # data parallelism, is counted on every device).
      'flops_per_device': None,
      'flops_per_step': None,
      # XLA's cost analysis counts a loop body once: with matmuls in loops (scan_layers,
      # accum_steps, an RNN's time steps, collective matmuls) the FLOPs are a lower bound.
      'has_loops': None,
      'collectives': {},
      'collective_bytes': {},
      # A roofline bound from the analytic FLOPs and the device table (`predict`).
      'prediction': None,
      'predicted_step_s': None,  # The prediction's bound, at the top level for scripts.
      'predicted_mfu': None,
      'compile_s': None,
      'error': None,
  }
  t0 = time.perf_counter()
  try:
    compiled = train.lower_train_step(s).compile()
  except RuntimeError as e:  # XLA:TPU refuses to compile a program that cannot fit.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    out.update(fits=False, error=str(e).strip().splitlines()[0],
               compile_s=time.perf_counter() - t0)
    return out
  out['compile_s'] = time.perf_counter() - t0
  mem = parallel.memory(compiled)
  out['memory_per_device'] = mem
  if out['hbm_bytes'] is not None:
    # XLA's own peak where it gives one (arguments, outputs and temporaries live at once,
    # aliasing counted): a program over XLA:TPU's limit does not compile at all. The sum of
    # all buffers overstates it.
    needed = mem['peak_bytes'] or mem['total_bytes']
    out['fits'] = needed <= out['hbm_bytes']
    out['hbm_margin_bytes'] = out['hbm_bytes'] - needed
  flops = xla_flops(compiled)
  if flops is not None:
    out['flops_per_device'] = flops
    out['flops_per_step'] = flops * len(flat)
  text = compiled.as_text()
  out['collectives'], out['collective_bytes'] = collectives(text)
  out['has_loops'] = loops_with_matmuls(text)
  out['prediction'] = predict(config, s.data.meta, s.policy.name, device.device_kind,
                              len(flat), _bytes_accessed(compiled),
                              sum(out['collective_bytes'].values()))
  out['predicted_step_s'] = out['prediction']['step_s']
  out['predicted_mfu'] = out['prediction']['mfu']
  return out


def _bytes_accessed(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Backends without a cost model.
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  value = (cost or {}).get('bytes accessed')
  return float(value) if value is not None and value > 0 else None


def predict(config, meta, precision: str, device_kind: str, num_devices: int,
            bytes_accessed: float | None, collective_bytes: float) -> dict | None:
  """A roofline bound on the step time: the largest of the matmul FLOPs at the device's
  dense peak (the model's FLOPs by formula plus what remat recomputes), the HBM traffic at
  its bandwidth and the collectives' bytes at the chip's interconnect bandwidth, per device.
  XLA's byte counts take a loop body once, so those two terms are lower bounds too. None
  (with the reason) where the model has no FLOP formula or the device no tabled peak."""
  batch = int(config.data.batch_size)
  model = flops.train_flops(config.model, meta, batch)
  peak = flops.peak(device_kind, precision)
  if model is None or peak is None:
    why = ('no FLOP formula for this model' if model is None else
           f'no {precision} peak tabled for {device_kind}')
    return {'step_s': None, 'mfu': None, 'reason': why}
  extra = flops.recomputed_flops(config.model, meta, batch) or 0.0
  rates = flops.bandwidths(device_kind)
  terms = {'compute': (model + extra) / num_devices / peak}
  if bytes_accessed is not None and rates['hbm']:
    terms['memory'] = bytes_accessed / rates['hbm']
  if collective_bytes and rates['ici']:
    terms['collectives'] = collective_bytes / rates['ici']
  bound = max(terms, key=terms.get)
  step = terms[bound]
  return {'step_s': step, 'mfu': model / num_devices / (step * peak), 'bound': bound,
          'model_flops_per_step': model, 'recomputed_flops_per_step': extra,
          'peak_flops_per_s': peak, 'terms_s': terms, 'reason': None}


def _count(n: float | None) -> str:
  if n is None:
    return '-'
  for prefix, size in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= size:
      return f'{n / size:.2f} {prefix}'
  return f'{n:.0f}'


def format_plan(d: dict[str, Any]) -> str:
  """A human-readable table of `plan`'s result."""
  where = d['topology'] or 'local devices'
  if d.get('slices', 1) > 1:
    where = f"{d['slices']} slices of {where}"
  hosts = f", {d['num_hosts']} hosts" if d['num_hosts'] > 1 else ''
  mesh = ' '.join(f'{k}={v}' for k, v in d['mesh'].items())
  lines = [
      f"plan for {where}: {d['num_devices']} x {d['device_kind']}{hosts}; mesh {mesh}",
      f"  parameters          {_count(d['num_params'])}",
      f"  global batch        {d['batch_size']}",
      f"  compile             {d['compile_s']:.1f} s" if d['compile_s'] is not None else '',
  ]
  hbm = fmt_bytes(d['hbm_bytes'])
  fits = {True: 'yes', False: 'NO', None: 'unknown'}[d['fits']]
  m = d['memory_per_device']
  if m is None:
    lines += [f'memory per device: does not fit {hbm} of HBM', f"  {d['error']}"]
  else:
    share = ''
    if d['hbm_bytes']:
      share = f" ({100 * (m['peak_bytes'] or m['total_bytes']) / d['hbm_bytes']:.1f}%)"
    lines += [
        'memory per device',
        f"  arguments           {fmt_bytes(m['arguments_bytes'])}",
        f"  outputs             {fmt_bytes(m['outputs_bytes'])}",
        f"  aliased (donated)  -{fmt_bytes(m['aliased_bytes'])}",
        f"  temporaries         {fmt_bytes(m['temporaries_bytes'])}",
        f"  total               {fmt_bytes(m['total_bytes'])}"
        '   (arguments + outputs - aliased + temporaries)',
        f"  peak (XLA)          {fmt_bytes(m['peak_bytes'])}",
        f"  host (offloaded)    {fmt_bytes(m['host_temporaries_bytes'])}"
        if m.get('host_temporaries_bytes') else '',
        f"  code                {fmt_bytes(m['code_bytes'])}",
        f"  HBM                 {hbm}   fits: {fits}{share}"
        + (f", {fmt_bytes(d['hbm_margin_bytes'])} to spare" if d.get('hbm_margin_bytes', -1) >= 0
           else ''),
        'compute',
        f"  FLOPs per device    {_count(d['flops_per_device'])}",
        f"  FLOPs per step      {_count(d['flops_per_step'])}   (all devices)",
    ]
    if d['has_loops']:
      lines.append('  (the step has loops, whose bodies XLA counts once: a lower bound)')
    p = d.get('prediction')
    if p and p['step_s'] is not None:
      lines += [
          'prediction (a roofline bound: the step takes at least this)',
          f"  FLOPs per step      {_count(p['model_flops_per_step'])} model + "
          f"{_count(p['recomputed_flops_per_step'])} recomputed (by formula)",
          *(f"  {name:<19} {1e3 * t:.3g} ms" for name, t in p['terms_s'].items()),
          f"  step time >=        {1e3 * p['step_s']:.3g} ms ({p['bound']}-bound)",
          f"  MFU <=              {100 * p['mfu']:.1f}%",
      ]
    elif p:
      lines.append(f"prediction: none ({p['reason']})")
    if d['collectives']:
      lines.append('collectives per step (loops by their trip counts; result bytes per device)')
      lines += [f"  {op:<19} {n:<5} {fmt_bytes(d['collective_bytes'].get(op))}"
                for op, n in sorted(d['collectives'].items())]
    else:
      lines.append('collectives: none')
  return '\n'.join(l for l in lines if l)
