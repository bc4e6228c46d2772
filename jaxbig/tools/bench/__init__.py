"""The benchmark harness: `jaxbig bench SUITE [--out DIR] [--only PATTERN]`.

A suite (`benchmarks/suites/<name>.py`) defines `rows()`: a list of dicts, each naming an
experiment and its overrides (model size, batch, precision, mesh), and optionally `SETTINGS`
(DEFAULTS' keys). Row keys (ROW_KEYS): name, experiment, overrides, precision, batch;
`pytorch` (True or 'eager', or 'compile'): also time the PyTorch reference of
`jaxbig/tools/bench/pytorch.py` on the same batch, in `rounds` alternating windows (A B, B A, ...)
so that drift of the machine hits both alike; `native_only`: skip the row (recorded as
{name, skipped: reason}) where its precision would be emulated; `loop` (a step count): also
run the training loop itself for that many steps (`loop_time`) and report its host
overhead; `input` (a batch count): also time the input pipeline alone for that many
batches (`input_time`), beside the step that consumes them. For each row, in this process: build the run as `train` would (mesh, data,
model, sharded state: `train.setup`, `train.init_state`), put one batch on the devices,
compile the train step (timed apart), warm up until the step time settles, then time a
window of at least `min_steps` steps and `min_seconds` seconds with the energy meter read at
its edges. Every step is synchronised (`block_until_ready`) so each one has its own time;
the window's edges are those of its first and last step.

One JSON object per row goes to `DIR/results.jsonl` as soon as the row is done:

  suite, name, framework ('jaxbig' or 'pytorch'), pair (a PyTorch row's jaxbig row), model,
  precision, emulated, batch, mesh, steps, step_time_s {median, p10, p90, mean}, samples_per_s,
  tokens_per_s (null without tokens), flops_per_step {analytic, xla, xla_counts_loops_once},
  peak_flops_per_s, mfu, mfu_basis, peak_memory_bytes {compiled, device}, energy {method,
  joules_per_step, samples_per_joule, tokens_per_joule, avg_watts, reason}, loss, compile_s,
  warmup_steps, warmup_settled (False when warm-up stopped at warmup_max steps or
  warmup_max_s seconds), rounds, window_s, env {device_kind, num_devices, jax, jaxlib, flax,
  qwix, python, xla_flags, glibc_tunables, git_sha; PyTorch rows add torch, torch_threads,
  torch_device}, command (the `jaxbig bench` command line);
  rows with `loop` add loop {steps, log_every, step_time_s, input_wait (the share of the
  loop's time spent waiting for batches), host_overhead}; rows with
  `input` add input {batches, batch_time_s, samples_per_s, tokens_per_s, per_step (input
  time over step time), bounds_step (per_step > 1: the pipeline cannot keep up)}.

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
            'warmup_max_s': 60.0, 'settle': 0.1, 'rounds': 4}
ROW_KEYS = {'name', 'experiment', 'overrides', 'precision', 'batch', 'pytorch', 'native_only',
            'loop', 'input'}
# Log intervals of a row's training-loop run (`loop`); the first half is its warm-up.
LOOP_INTERVALS = 10
# Seconds of the timed window when neither the suite nor the command sets one: the NVML
# counter moves about every 100 ms, so a GPU window needs seconds to mean anything.
MIN_SECONDS = {'gpu': 10.0, 'tpu': 5.0, 'cpu': 3.0}


def load_suite(path: str) -> tuple[str, list[dict], dict]:
  """(suite name, rows, settings) of a suite file; ConfigError on a bad file."""
  if not os.path.isfile(path):
    raise ConfigError(f'suite file not found: {path}')
  name, ext = os.path.splitext(os.path.basename(path))
  # Other names get no loader (spec None): say so instead of an AttributeError.
  spec = (importlib.util.spec_from_file_location(f'jaxbig_suite_{name}', path)
          if ext == '.py' else None)
  if spec is None:
    raise ConfigError(f'{path}: not a suite file (a .py file with rows())')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigError(f'{path}: cannot be loaded ({type(e).__name__}: {e})') from None
  if not hasattr(module, 'rows'):
    raise ConfigError(f'{path}: a suite defines rows() (a list of dicts)')
  try:
    rows = module.rows()
  except Exception as e:  # The user's code: where, not our traceback.
    raise ConfigError(f'{path}: rows() failed ({type(e).__name__}: {e})') from None
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise ConfigError(f'{path}: rows() must return a list of dicts')
  if not isinstance(getattr(module, 'SETTINGS', {}), dict):
    raise ConfigError(f'{path}: SETTINGS must be a dict')
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
    if not (isinstance(row['name'], str) and isinstance(row['experiment'], str)):
      raise ConfigError(f"{path}: row {i}'s name and experiment must be strings")
  if len(set(names)) != len(names):
    raise ConfigError(f'{path}: row names must be unique')
  # Experiment paths are relative to the repository that holds benchmarks/suites/.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  for row in rows:
    file, _, variant = row['experiment'].partition(':')
    if not os.path.isabs(file) and not os.path.exists(file):
      row['experiment'] = os.path.join(root, file) + (f':{variant}' if variant else '')
    unknown = set(row) - ROW_KEYS
    if unknown:
      raise ConfigError(f"{path}: row {row['name']} has unknown keys {sorted(unknown)}; known: "
                        f"{', '.join(sorted(ROW_KEYS))}")
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


def cpu_matmul_roof(n: int = 1024, repeats: int = 20) -> float:
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
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''), 'git_sha': git_sha()}


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
  loop = row.get('loop')
  if loop is not None and (isinstance(loop, bool) or not isinstance(loop, int)
                           or loop < 2 * LOOP_INTERVALS):
    raise ConfigError(f"row {row['name']}: loop must be a step count of at least "
                      f'{2 * LOOP_INTERVALS}, got {loop!r}')
  reference = row.get('pytorch', False)
  if reference not in (False, True, 'eager', 'compile'):
    raise ConfigError(f"row {row['name']}: pytorch must be True, 'eager' or 'compile', got "
                      f'{reference!r}')
  if reference:
    from jaxbig.tools.bench import pytorch
    pytorch.check(config, row['name'])
  return config, overrides


def _window(step, meter, min_steps: int, min_seconds: float):
  """Times steps until both minimums are met; (step seconds, joules or None, seconds)."""
  times = []
  start = meter.read()
  t0 = time.perf_counter()
  while len(times) < min_steps or time.perf_counter() - t0 < min_seconds:
    times.append(step())
  seconds = time.perf_counter() - t0
  return times, meter.joules(start, meter.read()), seconds


def _warm(step, settings: dict) -> tuple[int, bool]:
  """Steps until `settle` holds, or warmup_max steps or warmup_max_s seconds have passed;
  returns (steps, whether the step time settled)."""
  warm = []
  t0 = time.perf_counter()
  while not settle(warm, settings):
    if len(warm) >= settings['warmup_max'] or time.perf_counter() - t0 > settings[
        'warmup_max_s']:
      return len(warm), False
    warm.append(step())
  return len(warm), True


class _JaxRunner:
  """The row's jit train step on one batch already on the devices; `step()` -> seconds."""

  def __init__(self, config):
    import jax
    from jaxbig import sharding, train
    self.jax = jax
    self.setup = s = train.setup(config)
    self.state = train.init_state(s)
    t0 = time.perf_counter()
    self.compiled = train.lower_train_step(s).compile()
    self.compile_s = time.perf_counter() - t0
    # Synthetic data already on the devices: one real batch, reused by every step.
    batch_sh = sharding.batch_sharding(s.mesh)
    size = config.data.batch_size
    it = s.data.train_iter(sharding.process_rows(batch_sh, size))
    self.local = next(it)
    if hasattr(it, 'close'):  # Decoding worker processes (data.workers).
      it.close()
    self.batch = jax.block_until_ready(sharding.to_global(self.local, batch_sh, size))
    self.sums = None

  def step(self) -> float:
    t = time.perf_counter()
    self.state, self.sums = self.compiled(self.state, self.batch)
    self.jax.block_until_ready(self.state)
    return time.perf_counter() - t

  def final_loss(self) -> float:
    sums = self.jax.device_get(self.sums)
    return float(sums['loss']) / float(sums['count'])


def _timing(times: list[float], joules, seconds: float, batch: int, tokens) -> dict:
  """The step-time, throughput and energy fields of a result."""
  n = len(times)
  median = _percentile(times, 50)
  per_step_j = joules / n if joules is not None else None
  return {
      'steps': n,
      'step_time_s': {'median': median, 'p10': _percentile(times, 10),
                      'p90': _percentile(times, 90), 'mean': seconds / n},
      'samples_per_s': batch / median,
      'tokens_per_s': tokens / median if tokens else None,
      'energy_fields': {
          'joules_per_step': per_step_j,
          'samples_per_joule': batch / per_step_j if per_step_j else None,
          'tokens_per_joule': tokens / per_step_j if per_step_j and tokens else None,
          'avg_watts': joules / seconds if joules is not None else None,
      },
      'window_s': seconds,
  }


def loop_time(config, steps: int) -> dict:
  """The training loop's time per step, run as `jaxbig train` runs it.

  `steps` steps of `train_and_evaluate` in a temporary workdir: the real input pipeline,
  a fresh batch every step, metrics fetched and logged every `steps // LOOP_INTERVALS`
  steps, TensorBoard and progress output; no evaluation, no checkpoint (the run stops
  before its last step, as an interrupted one). The time per step is the median over the
  second half of the log intervals: the first ones hold the first executions, and on
  XLA:CPU the step takes some 30 steps to settle (the allocator's pages).
  """
  import tempfile
  from jaxbig import config as config_lib, train
  log_every = steps // LOOP_INTERVALS
  d = config_lib.to_dict(config)
  # Stopped after `steps` of at least steps + 1 (the run's own schedule where it is longer):
  # no final evaluation or save.
  d['train'].update(steps=max(d['train']['steps'], steps + 1), log_every=log_every,
                    eval_every=0, ckpt_every=0)
  config = config_lib.from_dict(d)
  with tempfile.TemporaryDirectory(prefix='jaxbig-loop-') as workdir:
    train.train_and_evaluate(config, workdir, stop_after=steps)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = rows[len(rows) // 2:]
  return {'steps': steps, 'log_every': log_every,
          'step_time_s': float(np.median([1.0 / r['steps_per_s'] for r in rows])),
          'input_wait': float(np.median([r['input_wait'] for r in rows]))}


def input_time(config, batches: int) -> dict:
  """The input pipeline alone: the mean time to make one training batch for this process
  (the rows its devices hold), over `batches` batches after a warm-up of a tenth of them.
  The mean, not the median: prefetched batches arrive in bursts, most calls take nothing."""
  import jax
  from jaxbig import data as data_lib
  data = data_lib.build(config.data, config.seed)
  rows = config.data.batch_size // jax.process_count()
  lo = jax.process_index() * rows
  it = data.train_iter((lo, lo + rows) if jax.process_count() > 1 else None)
  for _ in range(max(batches // 10, 1)):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  batch_time = (time.perf_counter() - t0) / batches
  if hasattr(it, 'close'):
    it.close()
  tokens = rows * config.data.seq_len if data.meta.vocab_size else None
  return {'batches': batches, 'batch_time_s': batch_time, 'samples_per_s': rows / batch_time,
          'tokens_per_s': tokens / batch_time if tokens else None}


def profile_steps(step, folder: str, steps: int) -> None:
  """A jax.profiler trace of `steps` calls of `step`, each annotated, into `folder`
  (FOLDER/plugins/profile/<time>/: `tensorboard --logdir FOLDER`, Profile tab)."""
  import jax
  with jax.profiler.trace(folder):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        step()


def run_row(suite: str, row: dict, settings: dict, roof: float | None = None,
            profile_dir: str | None = None) -> list[dict]:
  """Builds, compiles, warms up and times one row; returns its result objects: one, or two
  when the row also runs the PyTorch reference (timed in alternating windows). With
  `settings['profile']` steps and a `profile_dir`, traces that many jaxbig steps after the
  timed windows."""
  from jaxbig import parallel, precision
  from jaxbig.tools import plan
  from jaxbig.tools.bench import energy, flops

  config, overrides = row_config(row)
  jx = _JaxRunner(config)
  s = jx.setup
  devices = list(s.mesh.devices.flat)
  platform_ = devices[0].platform
  runners = {'jaxbig': jx}
  compile_s = {'jaxbig': jx.compile_s}
  reference = row.get('pytorch')
  reference_error = None
  if reference:
    from jaxbig.tools.bench import pytorch
    torch_runner = pytorch.Runner(config, s.data.meta, jx.local, platform_)
    try:  # The first step (compiling, with 'compile'); some kernels exist on some CPUs only.
      first = torch_runner.step() if reference != 'compile' else pytorch.compiled(torch_runner)
    except RuntimeError as e:
      reference_error = f'PyTorch failed: {str(e).splitlines()[0]}'
    else:
      compile_s['pytorch'] = first if reference == 'compile' else None
      runners['pytorch'] = torch_runner
  warm = {name: _warm(r.step, settings) for name, r in runners.items()}

  min_seconds = settings['min_seconds'] or MIN_SECONDS.get(platform_, 3.0)
  meter = energy.meter(devices)
  rounds = settings['rounds'] if len(runners) > 1 else 1
  windows = {name: ([], [], []) for name in runners}  # times, joules, seconds.
  order = list(runners)
  for i in range(rounds):  # A B, B A, A B, ...: linear drift hits both alike.
    for name in (order if i % 2 == 0 else order[::-1]):
      times, joules, seconds = _window(runners[name].step, meter,
                                       -(-settings['min_steps'] // rounds), min_seconds / rounds)
      windows[name][0].extend(times)
      windows[name][1].append(joules)
      windows[name][2].append(seconds)

  if settings.get('profile') and profile_dir:
    profile_steps(jx.step, profile_dir, settings['profile'])
  loop = loop_time(config, row['loop']) if row.get('loop') else None
  inputs = input_time(config, row['input']) if row.get('input') else None

  batch_size = config.data.batch_size
  meta = s.data.meta
  tokens = batch_size * meta.input_shape[0] if meta.vocab_size else None
  analytic = flops.train_flops(config.model, meta, batch_size)
  xla = plan.xla_flops(jx.compiled)
  policy = s.policy
  if platform_ == 'cpu':
    basis = 'measured float32 matmul rate of this CPU'
    peak = roof * len(devices) if roof else None
  else:
    peak_one = flops.peak(devices[0].device_kind, policy.name)
    basis = f'dense {policy.name} peak of {devices[0].device_kind}'
    peak = peak_one * len(devices) if peak_one else None
    if peak is None:
      basis = f'no {policy.name} peak tabled for {devices[0].device_kind}'
  env = environment(devices)
  memory = parallel.memory(jx.compiled)
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  out = []
  for name, runner in runners.items():
    times, joules, seconds = windows[name]
    joules = None if any(j is None for j in joules) else sum(joules)
    t = _timing(times, joules, sum(seconds), batch_size, tokens)
    jax_row = name == 'jaxbig'
    used = analytic if analytic is not None else (xla if jax_row else None)
    result = {
        'suite': suite, 'name': row['name'] if jax_row else f"{row['name']}-pytorch",
        'framework': name, 'pair': None if jax_row or not reference else row['name'],
        'model': config.model.name, 'experiment': row['experiment'], 'overrides': overrides,
        'precision': policy.name,
        'emulated': precision.emulated(policy, devices[0]) if jax_row else False,
        'batch': batch_size,
        'mesh': {k: int(v) for k, v in s.mesh.shape.items()},
        'steps': t['steps'], 'step_time_s': t['step_time_s'],
        'samples_per_s': t['samples_per_s'], 'tokens_per_s': t['tokens_per_s'],
        'remat': str(config.model.get('remat', 'none')).lower(),
        'flops_per_step': {
            'analytic': analytic, 'xla': xla if jax_row else None,
            # What model.remat recomputes, by formula (MFU counts the model's FLOPs only).
            'recomputed': flops.recomputed_flops(config.model, meta, batch_size),
            'xla_counts_loops_once': (plan.loops_with_matmuls(jx.compiled.as_text())
                                      if jax_row else None)},
        'peak_flops_per_s': peak,
        'mfu': used / t['step_time_s']['median'] / peak if used and peak else None,
        'mfu_basis': basis,
        'peak_memory_bytes': (
            {'compiled': memory['total_bytes'], 'device': (stats or {}).get('peak_bytes_in_use')}
            if jax_row else {'compiled': None, 'device': runner.peak_memory()}),
        'energy': {'method': meter.method, **t['energy_fields'], 'reason': meter.reason},
        'loss': runner.final_loss(), 'compile_s': compile_s[name],
        'warmup_steps': warm[name][0], 'warmup_settled': warm[name][1],
        'rounds': rounds, 'window_s': t['window_s'],
        'env': env if jax_row else {**env, **runner.environment()},
    }
    if reference and not jax_row:
      result['pytorch_mode'] = 'compile' if reference == 'compile' else 'eager'
    if loop and jax_row:
      # The share of the loop's step that the step itself does not take: input, logging and
      # dispatch. The timed step waits for its result each time, the loop does not, so a
      # loop that hides all of it measures a little below zero.
      result['loop'] = {**loop,
                        'host_overhead': 1.0 - t['step_time_s']['median'] / loop['step_time_s']}
    if inputs and jax_row:
      per_step = inputs['batch_time_s'] / t['step_time_s']['median']
      result['input'] = {**inputs, 'per_step': per_step, 'bounds_step': per_step > 1.0}
    out.append(result)
  if reference_error:
    out.append({'suite': suite, 'name': f"{row['name']}-pytorch", 'framework': 'pytorch',
                'pair': row['name'], 'skipped': reference_error})
  return out


def skip_reason(row: dict, config) -> str | None:
  """Why a `native_only` row is skipped on this machine (its precision is emulated here)."""
  if not row.get('native_only'):
    return None
  import jax
  from jaxbig import precision
  device = jax.devices()[0]
  policy = precision.get(config)
  if precision.emulated(policy, device):
    return f'{policy.name} is emulated on {device.device_kind}'
  return None


def run_suite(path: str, out_dir: str, only: str | None = None,
              min_seconds: float | None = None, min_steps: int | None = None,
              command: str | None = None, log=print, profile: int = 0) -> list[dict]:
  """Runs the suite's rows (those whose name matches the glob `only`) into out_dir; with
  `profile` > 0, a trace of that many steps of each row in OUT_DIR/profile/<row>/."""
  suite, rows, settings = load_suite(path)
  settings['profile'] = profile
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
  # Every row's config is checked before anything is run or written.
  configs = [row_config(row)[0] for row in rows]
  import jax
  roof = cpu_matmul_roof() if jax.devices()[0].platform == 'cpu' else None
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for row, config in zip(rows, configs):
    reason = skip_reason(row, config)
    if reason:
      results = [{'suite': suite, 'name': row['name'], 'skipped': reason}]
      log(f"{row['name']}: skipped ({reason})")
    else:
      folder = os.path.join(out_dir, 'profile', row['name']) if profile else None
      results = run_row(suite, row, settings, roof, folder)
      if folder:
        results[0]['profile'] = folder
    for result in results:
      if roof and 'skipped' not in result:
        result['cpu_matmul_roof_flops_per_s'] = roof
      result['command'] = command
    out += results
    with open(results_path, 'a') as f:  # Row by row: an interrupted suite keeps its rows.
      for result in results:
        f.write(json.dumps(result) + '\n')
    for r in results:
      if 'skipped' not in r:
        log(f"{r['name']}: {r['step_time_s']['median'] * 1e3:.2f} ms/step, "
            f"{r['samples_per_s']:.1f} samples/s, mfu {_fmt(r['mfu'])}, "
            f"energy {r['energy']['method']}")
        if r.get('input'):
          i = r['input']
          log(f"{r['name']}: input {i['batch_time_s'] * 1e3:.2f} ms/batch, "
              f"{i['per_step']:.3f} of the step"
              + ('; the input pipeline bounds the step' if i['bounds_step'] else ''))
  return out


def _fmt(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.3f}'


def default_out(path: str) -> str:
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', 'bench', f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")

