"""The jaxbig command: train eval predict generate plan quantize bench sweep report prepare
import-hf export-hf.

Thin on purpose: parse arguments, call a library function, turn bad input into one line.
Exit codes: 0 done (also after a SIGTERM that saved a checkpoint), 2 bad input, 3 training
stopped because its loss or gradients stayed non-finite, 130 interrupted (Ctrl-C; `train`
saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

from jaxbig.config import ConfigError

INTERRUPTED = 130  # Exit code after Ctrl-C (SIGINT), as shells report it.


class _Parser(argparse.ArgumentParser):
  """argparse with our one-line errors (`jaxbig: error: ...`, exit 2) instead of usage + error."""

  def error(self, message: str):
    self.exit(2, f'jaxbig: error: {message} (see {self.prog} -h)\n')


def _finite_float(text: str) -> float:
  """argparse type: a float that is neither NaN nor infinite."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
  return value


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='jaxbig', description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train', help='train an experiment (resumes if --workdir has a checkpoint)')
  t.add_argument('config', help='experiment file, e.g. experiments/cnn_digits.py[:arg]')
  t.add_argument('overrides', nargs='*', help='key=value overrides, e.g. opt.lr=3e-3')
  t.add_argument('--workdir', help='output folder (default: runs/<experiment>-<timestamp>)')
  d = t.add_argument_group('multi-host (see jaxbig/distributed.py)')
  d.add_argument('--coordinator', metavar='HOST:PORT', help="process 0's address")
  d.add_argument('--num-processes', type=int, help='processes in the run')
  d.add_argument('--process-id', type=int, help="this process's index, 0 to N-1")
  d.add_argument('--distributed', action='store_true',
                 help='let jax.distributed find the cluster (TPU VM pods; SLURM and MPI are '
                 'detected without it)')
  e = sub.add_parser('eval', help="evaluate a workdir's newest checkpoint on val and test, or a "
                     'quantised model (WORKDIR/int8) against its float checkpoint')
  e.add_argument('workdir')
  q = sub.add_parser('quantize', help="post-training quantise a workdir's newest checkpoint into "
                     'WORKDIR/<to>')
  q.add_argument('workdir')
  q.add_argument('--to', default='int8', help='target type (default and only: int8)')
  i = sub.add_parser('import-hf', help='a Hugging Face GPT-2 or Llama-family folder -> a new '
                     'workdir (config, tokenizer, checkpoint of step 0)')
  i.add_argument('folder', help='local folder: config.json, *.safetensors, tokenizer.json')
  i.add_argument('overrides', nargs='*', help='key=value overrides, e.g. precision=bf16')
  i.add_argument('--workdir', help='the workdir to write (must not exist)')
  i.add_argument('--print-overrides', action='store_true',
                 help="print the model.* overrides that build the folder's architecture (for "
                 'train.init_from) and write nothing')
  x = sub.add_parser('export-hf', help="a workdir's newest checkpoint -> a Hugging Face folder "
                     'that transformers loads')
  x.add_argument('workdir')
  x.add_argument('--out', required=True, help='the folder to write (must not exist)')
  x.add_argument('--merge-lora', action='store_true',
                 help='fold LoRA adapters into the base weights: W + (A B) alpha / rank')
  r = sub.add_parser('predict', help='write predictions of a trained model for INPUT.npy')
  r.add_argument('workdir')
  r.add_argument('input', help='.npy of inputs, (N, ...) or one example')
  r.add_argument('--out', help='output .npy (default: INPUT stem + .pred.npy; .npy is added '
                 'when missing); never overwritten')
  n = sub.add_parser('plan', help='compile the train step ahead of time and report memory per '
                     'device, FLOPs and collectives')
  n.add_argument('config', help='experiment file, e.g. experiments/gpt_stdlib.py[:arg]')
  n.add_argument('overrides', nargs='*', help='key=value overrides, e.g. mesh.fsdp=4')
  n.add_argument('--topology', help='TPU slice to plan for from any machine, e.g. v5e:4x4, '
                 'v6e:2x2, v4:2x2x2, v5p:2x2x1 (needs jaxbig[tpu]); default: the local devices')
  n.add_argument('--slices', type=int, default=1,
                 help='plan for this many slices of the topology (multi-slice; sets mesh.slices)')
  n.add_argument('--json', action='store_true', help='print the plan as JSON')
  b = sub.add_parser('bench', help='time, measure and write one JSON row per configuration of '
                     'a benchmark suite')
  b.add_argument('suite', help="suite file, e.g. benchmarks/suites/smoke.py; or 'compare OLD "
                 "NEW' to compare two results")
  b.add_argument('compared', nargs='*', help=argparse.SUPPRESS)
  b.add_argument('--out', help='output folder for results.jsonl (default: '
                 'runs/bench/<suite>-<timestamp>); never overwritten')
  b.add_argument('--only', help="run only the rows whose name matches one of these globs, "
                 "e.g. 'cnn-*,gpt-fp32'")
  b.add_argument('--min-seconds', type=_finite_float, help="timed window's least length in "
                 "seconds (default: the suite's, else 10 on GPUs, 3 on CPUs)")
  b.add_argument('--min-steps', type=int, help="timed window's least number of steps")
  b.add_argument('--profile', type=int, nargs='?', const=5, default=0, metavar='STEPS',
                 help='after timing each row, trace STEPS (default 5) of its steps with '
                 'jax.profiler into OUT/profile/<row>/ (tensorboard --logdir, Profile tab)')
  w = sub.add_parser('sweep', help='train every member of a sweep file (e.g. a scaling study), '
                     'each in OUT/<member>; the same command continues an interrupted sweep')
  w.add_argument('config', help='sweep file, e.g. experiments/scaling_gpt.py[:variant]')
  w.add_argument('overrides', nargs='*', help='key=value overrides for every member')
  w.add_argument('--out', help='output folder (default: runs/sweep/<experiment>-<timestamp>)')
  o = sub.add_parser('report', help='Markdown tables of benchmark results or of a sweep '
                     '(DIR/report.md)')
  o.add_argument('results', help='a jaxbig bench --out folder, or its results.jsonl, or a '
                 'jaxbig sweep --out folder')
  g = sub.add_parser('generate', help='sample text from a trained language model')
  g.add_argument('workdir')
  g.add_argument('--prompt', default='\n', help='text to continue (default: a newline)')
  g.add_argument('--tokens', type=int, default=200, help='bytes to generate (default 200)')
  g.add_argument('--temperature', type=_finite_float, default=0.8,
                 help='softmax temperature; 0 picks the likeliest byte (default 0.8)')
  g.add_argument('--top-k', type=int, default=0, help='sample among the k likeliest (0: all)')
  g.add_argument('--seed', type=int, default=0, help='sampling seed (default 0)')
  g.add_argument('--max-tokens', type=int, default=65536,
                 help='cap on --tokens for models without a context limit, e.g. LSTMs '
                 '(default 65536; a Transformer is capped by its model.max_len)')
  r = sub.add_parser('prepare', help='tokenize a corpus into token shards (data.name=tokens), '
                     'or pack an image folder into ArrayRecord shards (data.name=imagerecords); '
                     'an interrupted run continues')
  r.add_argument('kind', choices=('text', 'images'), help='what to prepare')
  r.add_argument('source', help='text: a folder of text files, a .jsonl or .parquet file (or a '
                 'folder of them with --pattern), a datasets save_to_disk folder, or one text '
                 'file; images: a folder DIR/train/<class>/, DIR/val/<class>/ [DIR/test/<class>/]')
  r.add_argument('--out', required=True, help='output folder (new, or one this command began)')
  r.add_argument('--shard-mb', type=_finite_float, default=256.0,
                 help='text or image bytes per shard, MiB (default 256)')
  r.add_argument('--workers', type=int, default=0,
                 help='text: tokenizing processes; images: packing threads (default: cores)')
  text_only = r.add_argument_group('text only')
  text_only.add_argument('--tokenizer', default=None,
                         help="'bytes' (default), a tokenizers .json or a SentencePiece .model")
  text_only.add_argument('--pattern', default=None, help="file-name pattern in a folder "
                         "(default '*'); '*.jsonl' or '*.parquet' reads records")
  text_only.add_argument('--field', default=None, help="a record's text field (default text)")
  text_only.add_argument('--val-fraction', type=_finite_float, default=None,
                         help='default 0.05')
  text_only.add_argument('--test-fraction', type=_finite_float, default=None,
                         help='default 0.05')
  k = sub.add_parser('tokenizer', help='train a byte-level BPE tokenizer on a corpus')
  k.add_argument('action', choices=('train',))
  k.add_argument('source', help='a source as for prepare')
  k.add_argument('--vocab', type=int, required=True, help='vocabulary size, e.g. 8192')
  k.add_argument('--out', required=True, help='the tokenizer file to write (.json; must not exist)')
  k.add_argument('--pattern', default='', help="as for prepare")
  k.add_argument('--field', default='text', help="as for prepare")
  return p


def _default_workdir(config_spec: str) -> str:
  name = os.path.splitext(os.path.basename(config_spec.partition(':')[0]))[0]
  return os.path.join('runs', f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run(args) -> int:
  if args.command == 'train':
    from jaxbig import config as config_lib, distributed
    config = config_lib.load(args.config, args.overrides)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           args.distributed)
    from jaxbig import train
    import jax
    if jax.process_count() > 1 and not args.workdir:
      raise ConfigError('--workdir: a multi-process run needs one folder that all processes '
                        'name (a shared file system across hosts)')
    workdir = args.workdir or _default_workdir(args.config)
    # On SIGTERM or SIGINT it saves and returns {'preempted': True, 'signal': ...}.
    summary = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
      print(json.dumps({'workdir': workdir, **summary}, indent=2))
    if summary.get('signal') == 'SIGINT':
      return INTERRUPTED
  elif args.command == 'eval':
    from jaxbig.tools import inference, quantize
    if quantize.is_quantized(args.workdir):
      print(json.dumps(quantize.evaluate(args.workdir), indent=2))
    else:
      print(json.dumps(inference.evaluate(args.workdir), indent=2))
  elif args.command == 'import-hf':
    from jaxbig import pretrained
    from jaxbig.tools import hf
    if args.print_overrides:
      print(' '.join(pretrained.overrides(hf.architecture(hf.read_config(args.folder)))))
      return 0
    if not args.workdir:
      raise ConfigError('import-hf: give --workdir (the workdir to write)')
    print(json.dumps(pretrained.import_hf(args.folder, args.workdir, args.overrides), indent=2))
  elif args.command == 'export-hf':
    from jaxbig import pretrained
    print(json.dumps(pretrained.export_hf(args.workdir, args.out, args.merge_lora), indent=2))
  elif args.command == 'quantize':
    from jaxbig.tools import quantize
    print(json.dumps(quantize.quantize(args.workdir, args.to), indent=2))
  elif args.command == 'predict':
    import numpy as np
    from jaxbig.tools import inference
    from jaxbig.data import sources
    if not os.path.isfile(args.input):
      raise ConfigError(f'input file not found: {args.input}')
    out = args.out or os.path.splitext(args.input)[0] + '.pred.npy'
    out += '' if out.endswith('.npy') else '.npy'  # What np.save would write: check that name.
    if os.path.lexists(out):
      raise ConfigError(f'{out} exists; choose another --out (outputs are never overwritten)')
    if not os.path.isdir(os.path.dirname(out) or '.'):
      raise ConfigError(f'--out: folder {os.path.dirname(out)} does not exist')
    inputs = sources.load_npy(args.input)
    if inputs.size == 0:
      raise ConfigError(f'{args.input}: holds no examples (shape {inputs.shape})')
    preds = inference.predict(args.workdir, inputs)
    partial = out + '.partial'  # Whole or not at all: written beside OUT, then renamed.
    try:
      f = open(partial, 'xb')
    except FileExistsError:
      raise ConfigError(f'{partial} exists (left by a crash?); remove it or choose another '
                        '--out') from None
    try:
      with f:
        np.save(f, preds)
      os.replace(partial, out)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
    shown = ', '.join(str(v) for v in np.asarray(preds).ravel()[:10])
    print(f'{len(preds)} predictions -> {out}: {shown}{" ..." if len(preds) > 10 else ""}')
  elif args.command == 'plan':
    from jaxbig import config as config_lib
    from jaxbig.tools import plan
    if args.topology is not None:
      plan.parse_topology(args.topology)  # A bad name fails before anything is loaded.
    overrides = list(args.overrides)
    if args.slices != 1 and not any(o.startswith('mesh.slices=') for o in overrides):
      overrides.append(f'mesh.slices={args.slices}')
    d = plan.plan(config_lib.load(args.config, overrides), args.topology, args.slices)
    print(json.dumps(d, indent=2) if args.json else plan.format_plan(d))
    if d['fits'] is False:
      return 1
  elif args.command == 'bench' and args.suite == 'compare':
    from jaxbig.tools.bench import report
    if len(args.compared) != 2:
      raise ConfigError('bench compare: give two results, OLD and NEW')
    print(report.compare(*args.compared)[1], end='')
  elif args.command == 'bench':
    from jaxbig.tools import bench
    if args.compared:
      raise ConfigError(f"unrecognized arguments: {' '.join(args.compared)}")
    if args.min_seconds is not None and args.min_seconds < 0:
      raise ConfigError(f'--min-seconds must be >= 0, got {args.min_seconds}')
    if args.min_steps is not None and args.min_steps < 1:
      raise ConfigError(f'--min-steps must be >= 1, got {args.min_steps}')
    out = args.out or bench.default_out(args.suite)
    command = shlex.join(['jaxbig', *args.argv] + ([] if args.out else ['--out', out]))
    if args.profile < 0:
      raise ConfigError(f'--profile must be >= 0, got {args.profile}')
    bench.run_suite(args.suite, out, args.only, args.min_seconds, args.min_steps, command,
                    profile=args.profile)
    print(f"results -> {os.path.join(out, 'results.jsonl')}")
  elif args.command == 'sweep':
    from jaxbig.tools.sweep import run as sweep
    out = args.out or sweep.default_out(args.config)
    command = shlex.join(['jaxbig', *args.argv] + ([] if args.out else ['--out', out]))
    state = sweep.run_sweep(args.config, out, args.overrides, command)
    if state.get('preempted'):
      print(f"jaxbig: sweep stopped in {state['preempted']}; the same command continues: "
            f'{command}', file=sys.stderr)
    else:
      print(f"sweep -> {out} ({len(state['members'])} members); jaxbig report {out}")
  elif args.command == 'report':
    from jaxbig.tools.sweep import report as sweep_report
    if sweep_report.is_sweep(args.results):
      print(sweep_report.report(args.results), end='')
    else:
      from jaxbig.tools.bench import report
      print(report.report(args.results), end='')
  elif args.command == 'prepare':
    if args.workers < 0:
      raise ConfigError(f'--workers must be >= 0, got {args.workers}')
    text_args = {'tokenizer': 'bytes', 'pattern': '', 'field': 'text', 'val_fraction': 0.05,
                 'test_fraction': 0.05}
    if args.kind == 'images':
      given = [k for k in text_args if getattr(args, k) is not None]
      if given:
        raise ConfigError(f"--{given[0].replace('_', '-')}: only for prepare text")
      from jaxbig.data import image_records
      manifest = image_records.prepare_images(args.source, args.out, shard_mb=args.shard_mb,
                                              workers=args.workers)
      counts = ', '.join(f"{s} {v['records']:,}" for s, v in manifest['splits'].items())
      print(f'prepared -> {args.out}: {counts} images, {len(manifest["classes"])} classes; '
            f'train with data.name=imagerecords data.path={args.out}')
    else:
      from jaxbig.data import prepare
      text_args.update({k: v for k in text_args if (v := getattr(args, k)) is not None})
      manifest = prepare.prepare_text(args.source, args.out, shard_mb=args.shard_mb,
                                      workers=args.workers, **text_args)
      counts = {s: manifest['splits'][s]['tokens'] for s in prepare.SPLITS}
      print(f"prepared -> {args.out}: {', '.join(f'{s} {n:,}' for s, n in counts.items())} "
            f"tokens; train with data.name=tokens data.path={args.out}")
  elif args.command == 'tokenizer':
    from jaxbig.data import tokenizer
    info = tokenizer.train_bpe(args.source, args.vocab, args.out, pattern=args.pattern,
                               field=args.field)
    print(f"tokenizer -> {info['out']}: vocabulary {info['vocab_size']}, learnt from "
          f"{info['documents']} training documents ({info['bytes'] / 2**20:.1f} MiB)")
  elif args.command == 'generate':
    from jaxbig.tools import generate
    print(generate.generate(args.workdir, args.prompt, args.tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens))
  return 0


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # The command itself (not a call from Python): huge pages for XLA:CPU.
    from jaxbig import hostmem  # pylint: disable=g-import-not-at-top
    hostmem.reexec(sys.argv[1:])
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  # Overrides may also follow --workdir (argparse stops the positional list at an option).
  options = any(e.startswith('-') for e in extra)
  if extra and args.command in ('train', 'plan', 'sweep', 'import-hf') and not options:
    args.overrides += extra
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.argv = sys.argv[1:] if argv is None else list(argv)  # For the bench's provenance.
  try:
    return _run(args)
  except KeyboardInterrupt:  # Ctrl-C outside training's own handling: one line, no traceback.
    if os.environ.get('JAXBIG_DEBUG'):
      raise
    print('\njaxbig: interrupted', file=sys.stderr)
    return INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    # A NonFiniteError comes from jaxbig.faults, imported by then (the CLI stays light).
    faults = sys.modules.get('jaxbig.faults')
    stopped = faults is not None and isinstance(e, faults.NonFiniteError)
    if not (isinstance(e, ConfigError) or stopped) or os.environ.get('JAXBIG_DEBUG'):
      raise
    print(f'jaxbig: error: {e}', file=sys.stderr)
    return 3 if stopped else 2


if __name__ == '__main__':
  sys.exit(main())
