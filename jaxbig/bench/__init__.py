"""The benchmark harness: `jaxbig bench SUITE [--out DIR] [--only PATTERN]`.

A suite (`benchmarks/suites/<name>.py`) defines `rows()`: a list of dicts, each naming an
experiment and its overrides (model size, batch, precision, mesh). For each row, in this
process: build the run as `train` would (steps 3-5 of DESIGN.md), put one batch on the
devices, compile the train step (timed apart), warm up until the step time settles, then
time a window of at least `min_steps` steps and `min_seconds` seconds with the energy
meter read at its edges. Every step is synchronised (`block_until_ready`) so each one has its
own time; the window's edges are those of its first and last step.

One JSON object per row goes to `DIR/results.jsonl` as soon as the row is done:

  suite, name, framework ('jaxbig'), model, precision, emulated, batch, mesh, steps,
  step_time_s {median, p10, p90, mean}, samples_per_s, tokens_per_s (null without tokens),
  flops_per_step {analytic, xla, xla_counts_loops_once}, peak_flops_per_s, mfu, mfu_basis,
  peak_memory_bytes {compiled, device}, energy {method, joules_per_step, samples_per_joule,
  tokens_per_joule, avg_watts, reason}, loss, compile_s, warmup_steps, env {device_kind,
  num_devices, jax, jaxlib, flax, qwix, python, xla_flags, git_sha}.

MFU divides the analytic FLOPs (else XLA's) by the step time and the device's dense peak
for the precision's matmul type (`flops.PEAKS`); on CPUs by the float32 matmul rate measured
in the same run (`cpu_matmul_roof`). Energy is only ever a counter's reading.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import platform
import subprocess
import time

import numpy as np

from jaxbig.config import ConfigError

DEFAULTS = {'min_steps': 10, 'min_seconds': None, 'warmup_min': 3, 'warmup_max': 50,
            'settle': 0.1}
# Seconds of the timed window when neither the suite nor the command sets one: the NVML
# counter moves about every 100 ms, so a GPU window needs seconds to mean anything.
MIN_SECONDS = {'gpu': 10.0, 'tpu': 5.0, 'cpu': 3.0}


def load_suite(path: str) -> tuple[str, list[dict], dict]:
  """(suite name, rows, settings) of a suite file; ConfigError on a bad file."""
  if not os.path.isfile(path):
    raise ConfigError(f'suite file not found: {path}')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'jaxbig_suite_{name}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigError(f'{path}: cannot be loaded ({type(e).__name__}: {e})') from None
  if not hasattr(module, 'rows'):
    raise ConfigError(f'{path}: a suite defines rows() (a list of dicts)')
  rows = module.rows()
  settings = {**DEFAULTS, **getattr(module, 'SETTINGS', {})}
  unknown = set(settings) - set(DEFAULTS)
  if unknown:
    raise ConfigError(f"{path}: SETTINGS has unknown keys {sorted(unknown)}; known: "
                      f"{', '.join(DEFAULTS)}")
  names = [r.get('name') for r in rows]
  for i, row in enumerate(rows):
    missing = {'name', 'experiment'} - set(row)
    if missing:
      raise ConfigError(f'{path}: row {i} lacks {sorted(missing)}')
  if len(set(names)) != len(names):
    raise ConfigError(f'{path}: row names must be unique')
  # Experiment paths are relative to the repository that holds benchmarks/suites/.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  for row in rows:
    file, _, variant = row['experiment'].partition(':')
    if not os.path.isabs(file) and not os.path.exists(file):
      row['experiment'] = os.path.join(root, file) + (f':{variant}' if variant else '')
  return name, rows, settings


def _percentile(xs: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(xs), q))


def settle(times: list[float], settings: dict) -> bool:
  """Whether warm-up is over: the median of the last 3 steps is within `settle` (relative)
  of the median of the 3 before them."""
  if len(times) < max(settings['warmup_min'], 6):
    return False
  last, before = np.median(times[-3:]), np.median(times[-6:-3])
  return abs(last - before) <= settings['settle'] * before


def cpu_matmul_roof(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 n x n matmuls on the first CPU device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def git_sha() -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                         timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def environment(devices) -> dict:
  import flax
  import jax
  import jaxlib
  try:
    import qwix
    qwix_version = qwix.__version__
  except ImportError:
    qwix_version = None
  return {'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
          'num_devices': len(devices), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
          'flax': flax.__version__, 'qwix': qwix_version, 'python': platform.python_version(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'git_sha': git_sha()}


def row_config(row: dict):
  """The row's experiment config with its overrides, precision and batch applied."""
  from jaxbig import config as config_lib, precision
  overrides = list(row.get('overrides', []))
  if 'precision' in row:
    overrides.append(f"precision={row['precision']}")
  if 'batch' in row:
    overrides.append(f"data.batch_size={row['batch']}")
  try:
    config = config_lib.load(row['experiment'], overrides)
    precision.get(config)
  except ConfigError as e:
    raise ConfigError(f"row {row['name']}: {e}") from None
  if config.get('parallel') is not None and config.parallel.mode != 'jit':
    raise ConfigError(f"row {row['name']}: bench times the jit step; parallel.mode="
                      f'{config.parallel.mode} is not supported')
  return config, overrides


def run_row(suite: str, row: dict, settings: dict, roof: float | None = None) -> dict:
  """Builds, compiles, warms up and times one row; returns its result object."""
  import jax
  from jaxbig import plan, precision, sharding, train
  from jaxbig.bench import energy, flops

  config, overrides = row_config(row)
  s = train.setup(config)
  devices = list(s.mesh.devices.flat)
  batch_size = config.data.batch_size
  state = train.init_state(s)
  t0 = time.perf_counter()
  compiled = train.lower_train_step(s).compile()
  compile_s = time.perf_counter() - t0
  # Synthetic data already on the devices: one real batch, reused by every step.
  batch_sh = sharding.batch_sharding(s.mesh)
  local = next(s.data.train_iter(sharding.process_rows(batch_sh, batch_size)))
  batch = jax.block_until_ready(sharding.to_global(local, batch_sh, batch_size))

  def step(state):
    t = time.perf_counter()
    state, sums = compiled(state, batch)
    jax.block_until_ready(state)
    return state, sums, time.perf_counter() - t

  warm = []
  while len(warm) < settings['warmup_max'] and not settle(warm, settings):
    state, _, dt = step(state)
    warm.append(dt)
  min_seconds = settings['min_seconds'] or MIN_SECONDS.get(devices[0].platform, 3.0)
  meter = energy.meter(devices)
  times = []
  start = meter.read()
  t_window = time.perf_counter()
  while len(times) < settings['min_steps'] or time.perf_counter() - t_window < min_seconds:
    state, sums, dt = step(state)
    times.append(dt)
  window_s = time.perf_counter() - t_window
  joules = meter.joules(start, meter.read())
  sums = jax.device_get(sums)
  loss = float(sums['loss']) / float(sums['count'])

  n = len(times)
  median = _percentile(times, 50)
  meta = s.data.meta
  tokens = batch_size * meta.input_shape[0] if meta.vocab_size else None
  analytic = flops.train_flops(config.model, meta, batch_size)
  xla = plan.xla_flops(compiled)
  policy = s.policy
  if devices[0].platform == 'cpu':
    basis = 'measured float32 matmul rate of this CPU'
    peak = roof * len(devices) if roof else None
  else:
    peak_one = flops.peak(devices[0].device_kind, policy.name)
    basis = f'dense {policy.name} peak of {devices[0].device_kind}'
    peak = peak_one * len(devices) if peak_one else None
    if peak is None:
      basis = f'no {policy.name} peak tabled for {devices[0].device_kind}'
  used = analytic if analytic is not None else xla
  mfu = used / median / peak if used and peak else None
  memory = plan.memory(compiled)
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  per_step_j = joules / n if joules is not None else None
  return {
      'suite': suite, 'name': row['name'], 'framework': 'jaxbig',
      'model': config.model.name, 'experiment': row['experiment'], 'overrides': overrides,
      'precision': policy.name, 'emulated': precision.emulated(policy, devices[0]),
      'batch': batch_size,
      'mesh': {'data': s.mesh.shape['data'], 'fsdp': s.mesh.shape['fsdp'],
               'tensor': s.mesh.shape['tensor']},
      'steps': n,
      'step_time_s': {'median': median, 'p10': _percentile(times, 10),
                      'p90': _percentile(times, 90), 'mean': window_s / n},
      'samples_per_s': batch_size / median,
      'tokens_per_s': tokens / median if tokens else None,
      'flops_per_step': {'analytic': analytic, 'xla': xla,
                         'xla_counts_loops_once': plan.loops_with_matmuls(compiled.as_text())},
      'peak_flops_per_s': peak, 'mfu': mfu, 'mfu_basis': basis,
      'peak_memory_bytes': {'compiled': memory['total_bytes'],
                            'device': (stats or {}).get('peak_bytes_in_use')},
      'energy': {
          'method': meter.method,
          'joules_per_step': per_step_j,
          'samples_per_joule': batch_size / per_step_j if per_step_j else None,
          'tokens_per_joule': tokens / per_step_j if per_step_j and tokens else None,
          'avg_watts': joules / window_s if joules is not None else None,
          'reason': meter.reason,
      },
      'loss': loss, 'compile_s': compile_s, 'warmup_steps': len(warm),
      'window_s': window_s,
      'env': environment(devices),
  }


def run_suite(path: str, out_dir: str, only: str | None = None,
              min_seconds: float | None = None, min_steps: int | None = None,
              log=print) -> list[dict]:
  """Runs the suite's rows (those whose name matches the glob `only`) into out_dir."""
  suite, rows, settings = load_suite(path)
  if only:  # Globs, comma-separated.
    rows = [r for r in rows if any(fnmatch.fnmatch(r['name'], p) for p in only.split(','))]
    if not rows:
      raise ConfigError(f'--only {only}: matches no row of {path}')
  if min_seconds is not None:
    settings['min_seconds'] = min_seconds
  if min_steps is not None:
    settings['min_steps'] = min_steps
  results_path = os.path.join(out_dir, 'results.jsonl')
  if os.path.exists(results_path):
    raise ConfigError(f'{results_path} exists; choose another --out (results are never '
                      'overwritten)')
  for row in rows:  # Every row's config is checked before anything is run or written.
    row_config(row)
  import jax
  roof = cpu_matmul_roof() if jax.devices()[0].platform == 'cpu' else None
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for row in rows:
    result = run_row(suite, row, settings, roof)
    if roof:
      result['cpu_matmul_roof_flops_per_s'] = roof
    out.append(result)
    with open(results_path, 'a') as f:  # Row by row: an interrupted suite keeps its rows.
      f.write(json.dumps(result) + '\n')
    log(f"{result['name']}: {result['step_time_s']['median'] * 1e3:.2f} ms/step, "
        f"{result['samples_per_s']:.1f} samples/s, mfu {_fmt(result['mfu'])}, "
        f"energy {result['energy']['method']}")
  return out


def _fmt(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.3f}'


def default_out(path: str) -> str:
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', 'bench', f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")

