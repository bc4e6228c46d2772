"""Parameters from elsewhere: `train.init_from` (fine-tuning) and `jaxbig import-hf`.

A source is a jaxbig workdir (its newest checkpoint's parameters, whatever mesh or layer
layout trained it) or a Hugging Face model folder (jaxbig.tools.hf). Either must have the
architecture of the run's config: the same parameter names and shapes, or a one-line
ConfigError naming the first that differs. The parameters land on the run's mesh one array
at a time, each with its own sharding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator

import jax
import numpy as np
from flax import linen as nn

from jaxbig.config import ConfigError
from jaxbig.models.transformer import LORA  # In the names of adapter parameters.
from jaxbig.tools import hf


def is_hf_folder(path: str) -> bool:
  """A folder with a Hugging Face config.json (it names a model_type; jaxbig's does not)."""
  try:
    return 'model_type' in hf.read_config(path)
  except ConfigError:
    return False


def check_architecture(model_cfg, arch: hf.Architecture, vocab_size: int, where: str) -> None:
  """The config's model fields must build the Hugging Face model's network."""
  for key, value in arch.fields.items():
    mine = model_cfg.get(key)
    if mine != value and not (isinstance(value, float) and mine is not None and
                              np.isclose(float(mine), value, rtol=1e-9)):
      raise ConfigError(f'{where}: a {arch.family} model with model.{key}={value}; this config '
                        f'has model.{key}={mine}')
  if vocab_size != arch.vocab_size:
    raise ConfigError(f'{where}: a vocabulary of {arch.vocab_size}; this config builds '
                      f'{vocab_size} (set model.vocab_size={arch.vocab_size})')


ARCHITECTURE = ('name', 'vocab_size', 'mlp_ratio', 'scan_layers', *hf.FIELDS)


def check_source(s, source: str) -> None:
  """Before a run starts: `source` (train.init_from) exists and has the config's architecture
  (the fields that shape the parameters; a layer layout from scan_layers converts)."""
  where = f'train.init_from: {source}'
  if not os.path.isdir(source):
    raise ConfigError(f'{where}: not a folder')
  cfg = s.config.model
  if is_hf_folder(source):
    arch = hf.architecture(hf.read_config(source), os.path.join(source, 'config.json'))
    check_architecture(cfg, arch, cfg.get('vocab_size', 0) or s.data.meta.vocab_size, where)
    return
  from jaxbig import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(source, 'config.json')):
    raise ConfigError(f'{where}: neither a jaxbig workdir nor a Hugging Face folder (no '
                      'config.json)')
  theirs = workdir_lib.saved_config(source).get('model', {})
  for key in ARCHITECTURE:
    if key == 'scan_layers' or key not in theirs:
      continue
    if theirs[key] != cfg.get(key) and not (key == 'mlp_ratio' and theirs.get('mlp_dim')):
      raise ConfigError(f'{where}: trained with model.{key}={theirs[key]}; this config has '
                        f'model.{key}={cfg.get(key)}')


def _relayout(flat: dict, scanned: bool, depth: int) -> dict:
  """Blocks stacked for `model.scan_layers` or not, as the target wants."""
  stacked = any(k.startswith('blocks/') for k in flat)
  if scanned and not stacked:
    return hf.stack_blocks(flat, depth)
  if stacked and not scanned:
    return hf.unstack_blocks(flat, depth)
  return flat


def source_arrays(s, source: str, step: int | None = None
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """(unscanned path, host array) for every parameter of `source` (a workdir's checkpoint
  `step`, default the newest), one at a time; with `model.scan_layers`, each parameter of
  every block before the next."""
  cfg = s.config.model
  if is_hf_folder(source):
    arch = hf.architecture(hf.read_config(source), os.path.join(source, 'config.json'))
    check_architecture(cfg, arch, cfg.get('vocab_size', 0) or s.data.meta.vocab_size,
                       f'train.init_from: {source}')
    yield from hf.tensors(source, arch, by_parameter=bool(cfg.get('scan_layers', False)))
    return
  from jaxbig.tools import inference  # pylint: disable=g-import-not-at-top
  _, state, _, _ = inference.load(source, step)
  flat = hf.flatten(state.params)
  del state
  for path in list(flat):
    value = flat.pop(path)
    if path.startswith('blocks/'):
      for i in range(value.shape[0]):
        yield f'block{i}/{path[len("blocks/"):]}', np.asarray(value[i])
    else:
      yield path, np.asarray(value)


def adapters(params: dict) -> dict:
  """The LoRA adapters of a parameter tree (what a LoRA run's checkpoints hold)."""
  return hf.unflatten({k: v for k, v in hf.flatten(params).items() if LORA in k})


def load_params(s, source: str, fresh=None, fresh_wins: bool = False,
                step: int | None = None):
  """The run's parameter tree from `source` (a workdir's checkpoint `step`, default the
  newest), streamed: each array is placed with its sharding as it is read, so the host
  holds one tensor at a time (with `model.scan_layers`, one stacked parameter, or the few
  that one Hugging Face tensor splits into). LoRA adapters the source lacks come from
  `fresh` (the run's initialised parameters); with `fresh_wins` (a LoRA checkpoint's own
  adapters over its base's) the source's adapters are skipped."""
  abstract = hf.flatten(nn.meta.unbox(s.abstract_boxed).params)
  own = {k: v for k, v in hf.flatten(fresh or {}).items() if LORA in k}
  shardings = hf.flatten(s.shardings.params)
  where = f'train.init_from: {source}'
  why = 'its architecture differs from this config\'s'
  depth = s.config.model.get('depth', 0)
  placed, stacks = {}, {}  # Stacks: blocks/x -> (host buffer, layers filled so far).

  def place(path: str, value: np.ndarray) -> None:
    # Each device takes its own slice; with several processes, each places only its
    # devices' slices (every process reads the same files).
    value = value.astype(abstract[path].dtype, copy=False)
    placed[path] = jax.make_array_from_callback(value.shape, shardings[path],
                                                lambda index: value[index])

  for path, value in source_arrays(s, source, step):
    block, _, rest = path.partition('/')
    target = path
    if block.startswith('block') and block[5:].isdigit() and path not in abstract:
      target = 'blocks/' + rest  # Scanned: block i is row i of the stacked parameter.
    if fresh_wins and target in own:
      continue
    if target not in abstract or target in placed:
      raise ConfigError(f'{where} has {path}, which this config does not build')
    shape = tuple(abstract[target].shape)[0 if target == path else 1:]
    if tuple(value.shape) != shape:
      raise ConfigError(f'{where}: {path} has shape {tuple(value.shape)}, the model needs '
                        f'{shape} ({why})')
    if target == path:
      place(path, value)
      continue
    buf, filled = stacks.get(target) or (np.empty(abstract[target].shape,
                                                  abstract[target].dtype), set())
    layer = int(block[5:])
    if not 0 <= layer < depth or layer in filled:
      raise ConfigError(f'{where} has {path}, which this config does not build (model.depth='
                        f'{depth})')
    buf[layer] = value
    filled.add(layer)
    stacks[target] = (buf, filled)
    if len(filled) == depth:
      place(target, stacks.pop(target)[0])
  kept = {k: own[k] for k in abstract if k not in placed and k in own}
  missing = [k for k in abstract if k not in placed and k not in kept]
  if missing:
    raise ConfigError(f'{where}: no tensor maps onto {missing[0]} ({why})')
  return hf.unflatten({**placed, **kept})


def identity(source: str, step: int | None = None) -> dict:
  """What a LoRA run's checkpoints record of the base they refer to: its absolute path and
  the SHA-256 of its weights and config (a Hugging Face folder), or a workdir's checkpoint
  `step` (default: its newest) and the SHA-256 of that step's manifest, which holds the
  SHA-256 of every file. `same_base` compares two."""
  source = os.path.abspath(source)
  if is_hf_folder(source):
    files = sorted(set(hf.weight_files(source).values())) + [os.path.join(source, 'config.json')]
    return {'path': source, 'sha256': {os.path.basename(f): _sha256(f) for f in files}}
  from jaxbig import checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = checkpoint.Checkpoints(os.path.join(source, 'checkpoints'), read_only=True)
  if step is None:
    step = (ckpts.steps() or [None])[-1]
  manifest = os.path.join(source, 'checkpoints', str(step), checkpoint.MANIFEST)
  return {'path': source, 'step': step,
          'manifest_sha256': _sha256(manifest) if os.path.isfile(manifest) else None}


def same_base(recorded: dict, now: dict) -> bool:
  """Whether two `identity` records name the same weights (wherever the folder is now; a
  step without a manifest then, adopted since, is not a change)."""
  if 'sha256' in recorded or 'sha256' in now:
    return recorded.get('sha256') == now.get('sha256')
  shas = (recorded.get('manifest_sha256'), now.get('manifest_sha256'))
  return recorded.get('step') == now.get('step') and (None in shas or shas[0] == shas[1])


_HASHES: dict = {}  # (path, size, mtime) -> SHA-256: a run hashes its base once.


def _sha256(path: str) -> str:
  from jaxbig.data import sources  # pylint: disable=g-import-not-at-top
  st = os.stat(path)
  key = (path, st.st_size, st.st_mtime_ns)
  if key not in _HASHES:
    _HASHES[key] = sources.file_sha256(path)[1]
  return _HASHES[key]


EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'experiments', 'finetune_hf.py')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model')  # HF tokenizers, SentencePiece.
HF_CONFIG = 'hf_config.json'  # The imported config.json, kept for export-hf.


def overrides(arch: hf.Architecture) -> list[str]:
  """key=value overrides that make an experiment build `arch` (`import-hf --print-overrides`)."""
  return [f'model.{k}={v}' for k, v in arch.fields.items()] + [
      f'model.vocab_size={arch.vocab_size}', 'model.name=transformer']


def _tokenizer(folder: str, vocab_size: int) -> str:
  """The folder's tokenizer file; its vocabulary must fit the embedding."""
  from jaxbig.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  for name in TOKENIZER_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      tok = tokenizer_lib.load(path, field=path)
      if tok.vocab_size > vocab_size:
        raise ConfigError(f'{path}: a vocabulary of {tok.vocab_size}, more than the model\'s '
                          f'{vocab_size} embedding rows')
      return path
  raise ConfigError(f'{folder}: no tokenizer ({" or ".join(TOKENIZER_FILES)})')


def import_hf(folder: str, workdir: str, extra: list[str] = ()) -> dict:
  """Writes `workdir` (which must not exist): config.json (experiments/finetune_hf.py with the
  folder's architecture, data.name=none and its tokenizer), the tokenizer, the imported
  config.json and a checkpoint of step 0 holding the parameters (no optimizer state: a run
  from it starts a fresh one). The tensors stream onto the devices one at a time.
  Everything is checked and built before the first file is written, into a sibling folder
  renamed into place at the end."""
  from jaxbig import checkpoint, config as config_lib, train  # pylint: disable=g-import-not-at-top
  from jaxbig import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  hf_cfg = hf.read_config(folder)
  arch = hf.architecture(hf_cfg, os.path.join(folder, 'config.json'))
  tokenizer = _tokenizer(folder, arch.vocab_size)
  if os.path.exists(workdir):
    raise ConfigError(f'--workdir {workdir}: exists; import-hf writes a new workdir')
  workdir = os.path.abspath(workdir)
  partial = workdir + '.importing'
  tok_path = os.path.join(workdir, os.path.basename(tokenizer))
  seq_len = min(arch.fields['max_len'], 512)
  fields = lambda tok: overrides(arch) + [
      'data.name=none', f'data.tokenizer={tok}', f'data.seq_len={seq_len}', *extra]
  config = config_lib.load(EXPERIMENT, fields(tok_path))  # As saved: the copied tokenizer.
  s = train.setup(config_lib.load(EXPERIMENT, fields(tokenizer)))  # Built from the source's.
  state = train.params_state(s, load_params(s, folder))  # The optimizer starts when a run does.
  if os.path.exists(partial):
    raise ConfigError(f'{partial}: exists (an interrupted import?); remove it first')
  os.makedirs(partial)
  try:
    shutil.copyfile(tokenizer, os.path.join(partial, os.path.basename(tokenizer)))
    with open(os.path.join(partial, HF_CONFIG), 'w', encoding='utf-8') as f:
      json.dump(hf_cfg, f, indent=2)
    workdir_lib.write_config(partial, config)
    # The fingerprint of the config as saved (its tokenizer in the workdir; the same file).
    # A synchronous, uncompressed save that copies about 1 GB to the host at a time: the
    # host never holds a second copy of the model.
    ckpts = checkpoint.Checkpoints(
        os.path.join(partial, 'checkpoints'), 1, async_save=False,
        fingerprint=train.run_fingerprint(dataclasses.replace(s, config=config)),
        concurrent_gb=checkpoint.bound_gb(state.params), compress=False)
    ckpts.open_for_writing()
    ckpts.save(0, state, {}, s.data.meta.to_json())
    ckpts.close()
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)  # Ours: made above.
    raise
  os.rename(partial, workdir)
  return {'workdir': workdir, 'family': arch.family, 'num_params': train.num_params(s),
          'tokenizer': tok_path}


def merge_lora(flat: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
  """Unscanned parameters with every adapter folded into its kernel: W + (A B) alpha / rank."""
  out = {k: v for k, v in flat.items() if LORA not in k}
  for path in [k for k in flat if k.endswith(LORA + 'a')]:
    base = path[:-len(LORA + 'a')]
    a, b = np.asarray(flat[path]), np.asarray(flat[base + LORA + 'b'])
    rank = a.shape[-1]
    kernel = np.asarray(out[base + '/kernel'])
    delta = (a.reshape(-1, rank).astype(np.float64) @ b.reshape(rank, -1)) * (alpha / rank)
    out[base + '/kernel'] = (kernel + delta.reshape(kernel.shape)).astype(kernel.dtype)
  return out


def export_hf(workdir: str, out: str, merge: bool = False) -> dict:
  """Writes `out` (which must not exist) as a Hugging Face folder from the newest checkpoint
  of `workdir`: config.json (over the imported one where the run was imported), the weights
  in model.safetensors, and the run's tokenizer file."""
  from jaxbig.tools import inference  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise ConfigError(f'--out {out}: exists; export-hf writes a new folder')
  s, state, step, meta = inference.load(workdir)
  cfg = s.config.model
  base_path, base = os.path.join(workdir, HF_CONFIG), None
  if os.path.isfile(base_path):
    with open(base_path, encoding='utf-8') as f:
      base = json.load(f)
  family = hf.FAMILIES.get((base or {}).get('model_type'), None) or family_of(cfg)
  fields = {k: cfg.get(k) for k in hf.FIELDS}
  fields['kv_heads'] = fields['kv_heads'] or 0
  fields['mlp_dim'] = fields['mlp_dim'] or int(round(cfg.width * cfg.mlp_ratio))
  vocab = cfg.get('vocab_size', 0) or meta.vocab_size
  dtype = (base or {}).get('dtype') or (base or {}).get('torch_dtype') or 'float32'
  arch = hf.Architecture(family, vocab, fields, str(dtype))
  # Converted to host arrays one parameter at a time as each shard is written (stacked
  # blocks all at once: their rows are views).
  flat = {k: np.asarray(v) if k.startswith('blocks/') else v
          for k, v in hf.flatten(state.params).items()}
  flat = _relayout(flat, False, cfg.depth)
  if any(LORA in k for k in flat):
    if not merge:
      raise ConfigError(f'export-hf: {workdir} trained LoRA adapters; --merge-lora writes the '
                        'base weights with the adapters folded in')
    flat = merge_lora(flat, float(s.config.lora.alpha))
  hf.save(out, flat, arch, base)
  tok = getattr(s.data, 'tokenizer', None)
  if tok is not None and getattr(tok, 'path', ''):
    shutil.copyfile(tok.path, os.path.join(out, os.path.basename(tok.path)))
  return {'out': out, 'step': step, 'family': family}


def family_of(cfg) -> str:
  """The Hugging Face family a jaxbig decoder's fields describe; ConfigError if none."""
  if cfg.name != 'transformer':
    raise ConfigError(f'export-hf: model.name={cfg.name} has no Hugging Face counterpart here')
  if cfg.get('norm', 'rms') == 'layer' and cfg.pos == 'learned' and cfg.get('mlp') == 'gelu' \
      and cfg.get('bias') and cfg.tie_embeddings and not cfg.get('kv_heads'):
    return 'gpt2'
  if cfg.get('norm', 'rms') == 'rms' and cfg.pos == 'rope' and cfg.get('mlp') == 'swiglu':
    return 'llama'
  raise ConfigError('export-hf: this decoder is neither GPT-2 (model.norm=layer, pos=learned, '
                    'mlp=gelu, bias=true, tied) nor Llama-style (norm=rms, pos=rope, '
                    'mlp=swiglu)')
