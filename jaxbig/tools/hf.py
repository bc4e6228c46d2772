"""Hugging Face checkpoints <-> jaxbig's decoder (`TransformerLM`): the GPT-2 and Llama families.

A Hugging Face model folder holds `config.json` and the weights as `*.safetensors` (one
file, or shards named by `model.safetensors.index.json`). `architecture(hf_config)` gives
the jaxbig `model.*` fields that build the same network; `load_params` reads the tensors
one at a time (safetensors memory-maps each file) and maps every one onto jaxbig's
parameter tree; `save` writes such a tree back as a folder that `transformers` loads.

Families:
  gpt2    learned positions, LayerNorm, GELU (tanh form), biases everywhere, tied output
          layer; q, k, v as one `c_attn` Conv1D (inputs x outputs).
  llama   (and mistral) RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases (or
          biases on every projection), untied or tied output layer; torch Linear weights
          (outputs x inputs).

Shape letters: E width, H heads, K key/value heads, D features per head, M MLP hidden
units, V vocabulary, P positions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from jaxbig.config import ConfigError

FAMILIES = {'gpt2': 'gpt2', 'llama': 'llama', 'mistral': 'llama'}
# The jaxbig model.* fields an architecture sets.
FIELDS = ('width', 'depth', 'heads', 'kv_heads', 'mlp_dim', 'max_len', 'pos', 'rope_theta',
          'mlp', 'bias', 'norm', 'norm_eps', 'tie_embeddings')
FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')  # What weights may be stored as.
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


@dataclass(frozen=True)
class Architecture:
  """A Hugging Face model as jaxbig sees it: its family, vocabulary and `model.*` fields."""
  family: str
  vocab_size: int
  fields: dict  # jaxbig model.* fields (width, depth, heads, kv_heads, ...).
  dtype: str  # The checkpoint's tensors' dtype, for the way back ('float32', 'bfloat16').


def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ConfigError(f'{folder}: not a Hugging Face model folder (no config.json)')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path}: not readable as JSON ({e})') from None


def architecture(hf: dict, where: str = 'config.json') -> Architecture:
  """The jaxbig fields for a Hugging Face config; ConfigError naming the first setting jaxbig
  cannot reproduce exactly."""
  model_type = hf.get('model_type')
  family = FAMILIES.get(model_type)
  if family is None:
    raise ConfigError(f"{where}: model_type '{model_type}' is not one jaxbig imports "
                      f"({', '.join(FAMILIES)})")
  dtype = str(hf.get('dtype') or hf.get('torch_dtype') or 'float32')

  def need(key: str, allowed, value=None):
    value = hf.get(key, value)
    if value not in allowed:
      raise ConfigError(f'{where}: {key}={value!r} is not supported (jaxbig builds '
                        f'{" or ".join(map(repr, allowed))})')
    return value

  if family == 'gpt2':
    width, heads = hf['n_embd'], hf['n_head']
    need('activation_function', ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new')
    need('scale_attn_weights', (True,), True)
    need('scale_attn_by_inverse_layer_idx', (False,), False)
    need('reorder_and_upcast_attn', (False,), False)
    fields = dict(width=width, depth=hf['n_layer'], heads=heads, kv_heads=0,
                  mlp_dim=hf.get('n_inner') or 4 * width,
                  max_len=hf['n_positions'], pos='learned', mlp='gelu', bias=True,
                  norm='layer', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
                  tie_embeddings=True)
    return Architecture(family, hf['vocab_size'], fields, dtype)
  width, heads = hf['hidden_size'], hf['num_attention_heads']
  need('hidden_act', ('silu',), 'silu')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind != 'default':
    raise ConfigError(f"{where}: rope_type '{kind}' is not supported (jaxbig builds plain RoPE)")
  if hf.get('head_dim', width // heads) != width // heads:
    raise ConfigError(f"{where}: head_dim={hf['head_dim']} is not hidden_size / "
                      f'num_attention_heads ({width // heads}), which jaxbig builds')
  bias = bool(hf.get('attention_bias', False))
  if bool(hf.get('mlp_bias', False)) != bias:
    raise ConfigError(f'{where}: attention_bias={bias} with mlp_bias={not bias} is not '
                      'supported (jaxbig puts biases on all projections or none)')
  if hf.get('sliding_window') not in (None, 0) and hf.get('use_sliding_window', True):
    raise ConfigError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
  theta = float(hf.get('rope_theta') or rope.get('rope_theta') or 10_000.0)
  fields = dict(width=width, depth=hf['num_hidden_layers'], heads=heads,
                kv_heads=hf.get('num_key_value_heads') or heads,
                mlp_dim=hf['intermediate_size'],
                max_len=hf['max_position_embeddings'], pos='rope', rope_theta=theta,
                mlp='swiglu', bias=bias, norm='rms', norm_eps=float(hf['rms_norm_eps']),
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  return Architecture(family, hf['vocab_size'], fields, dtype)


@dataclass(frozen=True)
class Rule:
  """Hugging Face tensors `hf` <-> jaxbig parameters `jax` (paths 'a/b/c'): `to_jax` maps
  the former's arrays to the latter's, `to_hf` back."""
  hf: tuple[str, ...]
  jax: tuple[str, ...]
  to_jax: Callable[..., tuple]
  to_hf: Callable[..., tuple]


def _same(*xs):
  return xs


def _t(*xs):
  return tuple(x.T for x in xs)


def rules(arch: Architecture) -> list[Rule]:
  """Every tensor of the family's checkpoint, block by block (unscanned jaxbig names)."""
  f = arch.fields
  e, h = f['width'], f['heads']
  d, k = e // h, f['kv_heads'] or h
  out = []
  if arch.family == 'gpt2':
    out += [Rule(('transformer.wte.weight',), ('embed/embedding',), _same, _same),
            Rule(('transformer.wpe.weight',), ('pos_embed/embedding',), _same, _same),
            Rule(('transformer.ln_f.weight', 'transformer.ln_f.bias'),
                 ('final_norm/scale', 'final_norm/bias'), _same, _same)]
    qkv = ('query', 'key', 'value')
    for i in range(f['depth']):
      hf, jx = f'transformer.h.{i}.', f'block{i}/'
      out += [
          Rule((hf + 'ln_1.weight', hf + 'ln_1.bias'),
               (jx + 'attn_norm/scale', jx + 'attn_norm/bias'), _same, _same),
          Rule((hf + 'ln_2.weight', hf + 'ln_2.bias'),
               (jx + 'mlp_norm/scale', jx + 'mlp_norm/bias'), _same, _same),
          # Conv1D c_attn: E x 3E, then q, k, v side by side.
          Rule((hf + 'attn.c_attn.weight',), tuple(f'{jx}attn/{n}/kernel' for n in qkv),
               lambda w: tuple(x.reshape(e, h, d) for x in np.split(w, 3, axis=1)),
               lambda *ws: (np.concatenate([x.reshape(e, e) for x in ws], axis=1),)),
          Rule((hf + 'attn.c_attn.bias',), tuple(f'{jx}attn/{n}/bias' for n in qkv),
               lambda b: tuple(x.reshape(h, d) for x in np.split(b, 3)),
               lambda *bs: (np.concatenate([x.reshape(e) for x in bs]),)),
          Rule((hf + 'attn.c_proj.weight', hf + 'attn.c_proj.bias'),
               (jx + 'attn/out/kernel', jx + 'attn/out/bias'),
               lambda w, b: (w.reshape(h, d, e), b), lambda w, b: (w.reshape(e, e), b)),
          Rule((hf + 'mlp.c_fc.weight', hf + 'mlp.c_fc.bias'),
               (jx + 'mlp_in/kernel', jx + 'mlp_in/bias'), _same, _same),
          Rule((hf + 'mlp.c_proj.weight', hf + 'mlp.c_proj.bias'),
               (jx + 'mlp_out/kernel', jx + 'mlp_out/bias'), _same, _same),
      ]
    return out
  out += [Rule(('model.embed_tokens.weight',), ('embed/embedding',), _same, _same),
          Rule(('model.norm.weight',), ('final_norm/scale',), _same, _same)]
  if not f['tie_embeddings']:
    out.append(Rule(('lm_head.weight',), ('logits/kernel',), _t, _t))
  bias = f['bias']
  for i in range(f['depth']):
    hf, jx = f'model.layers.{i}.', f'block{i}/'
    out += [Rule((hf + 'input_layernorm.weight',), (jx + 'attn_norm/scale',), _same, _same),
            Rule((hf + 'post_attention_layernorm.weight',), (jx + 'mlp_norm/scale',), _same,
                 _same)]
    for name, ours, heads in (('q_proj', 'query', h), ('k_proj', 'key', k),
                              ('v_proj', 'value', k)):
      # torch Linear: (heads D) x E; ours E x heads x D.
      out.append(Rule((f'{hf}self_attn.{name}.weight',), (f'{jx}attn/{ours}/kernel',),
                      lambda w, n=heads: (w.T.reshape(e, n, d),),
                      lambda w, n=heads: (w.reshape(e, n * d).T,)))
      if bias:
        out.append(Rule((f'{hf}self_attn.{name}.bias',), (f'{jx}attn/{ours}/bias',),
                        lambda b, n=heads: (b.reshape(n, d),),
                        lambda b, n=heads: (b.reshape(n * d),)))
    out.append(Rule((hf + 'self_attn.o_proj.weight',), (jx + 'attn/out/kernel',),
                    lambda w: (w.T.reshape(h, d, e),), lambda w: (w.reshape(e, e).T,)))
    for name, ours in (('gate_proj', 'mlp_gate'), ('up_proj', 'mlp_in'),
                       ('down_proj', 'mlp_out')):
      out.append(Rule((f'{hf}mlp.{name}.weight',), (f'{jx}{ours}/kernel',), _t, _t))
    if bias:
      out += [Rule((hf + 'self_attn.o_proj.bias',), (jx + 'attn/out/bias',), _same, _same)]
      out += [Rule((f'{hf}mlp.{name}.bias',), (f'{jx}{ours}/bias',), _same, _same)
              for name, ours in (('gate_proj', 'mlp_gate'), ('up_proj', 'mlp_in'),
                                 ('down_proj', 'mlp_out'))]
  return out


def weight_files(folder: str) -> dict[str, str]:
  """Tensor name -> the safetensors file that holds it; ConfigError for a folder without
  weights or an index naming a missing file."""
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding='utf-8') as f:
        weight_map = json.load(f)['weight_map']
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f'{index}: not a safetensors index ({e})') from None
    for name in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(folder, name)):
        raise ConfigError(f'{index}: names {name}, which is not in {folder}')
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  single = os.path.join(folder, WEIGHTS)
  if not os.path.isfile(single):
    raise ConfigError(f'{folder}: no weights ({WEIGHTS} or {INDEX}); jaxbig reads safetensors')
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(single, framework='numpy') as f:
    return {k: single for k in f.keys()}


def _read(path: str, name: str) -> np.ndarray:
  """One tensor, on the host. safetensors' numpy reader knows no bfloat16 (most published
  checkpoints): its flax reader does, kept on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.devices('cpu')[0]), safe_open(path, framework='flax') as f:
    return np.asarray(f.get_tensor(name))


def tensors(folder: str, arch: Architecture, by_parameter: bool = False
            ) -> Iterator[tuple[str, np.ndarray]]:
  """(jaxbig path, float32 array) for every parameter, reading one rule's tensors at a time,
  block by block (or, `by_parameter`, each parameter of every block before the next: what
  stacking for `model.scan_layers` wants); ConfigError naming a missing tensor or one of the
  wrong shape or dtype, and any tensor left over."""
  files = weight_files(folder)
  stored = _stored_names(files, arch.family)
  expected = set()
  ordered = rules(arch)
  if by_parameter:
    kind = lambda rule: re.sub(r'^block\d+/', 'block/', rule.jax[0])
    first = {}
    for i, rule in enumerate(ordered):
      first.setdefault(kind(rule), i)
    ordered = sorted(ordered, key=lambda rule: first[kind(rule)])  # Stable: blocks in order.
  for rule in ordered:
    missing = [n for n in rule.hf if stored(n) not in files]
    if missing:
      raise ConfigError(f'{folder}: tensor {missing[0]} is missing (a {arch.family} '
                        'checkpoint has it)')
    expected.update(stored(n) for n in rule.hf)
    arrays = [_read(files[stored(n)], stored(n)) for n in rule.hf]
    for n, a in zip(rule.hf, arrays):
      if a.dtype.name not in FLOAT_DTYPES:
        raise ConfigError(f'{files[stored(n)]}: tensor {stored(n)} is {a.dtype.name}; weights '
                          f'are one of {", ".join(FLOAT_DTYPES)}')
    try:
      converted = rule.to_jax(*arrays)
    except ValueError:
      shapes = ', '.join(f'{n} {a.shape}' for n, a in zip(rule.hf, arrays))
      raise ConfigError(f'{folder}: {shapes}: the wrong shape for config.json') from None
    for path, value in zip(rule.jax, converted):
      yield path, np.asarray(value, np.float32)
  extra = sorted(n for n in files if n not in expected and not _ignored(n))
  if extra:
    raise ConfigError(f'{folder}: tensor {extra[0]} is not part of a {arch.family} model that '
                      'jaxbig builds')


# The prefix of the base model's tensors in a *ForCausalLM checkpoint; a checkpoint saved
# from the base model alone (GPT-2's own files: `wte.weight`, `h.0...`) lacks it.
PREFIX = {'gpt2': 'transformer.', 'llama': 'model.'}


def _stored_names(files: dict, family: str) -> Callable[[str], str]:
  """Our tensor name -> the name the checkpoint stores it under (with or without PREFIX)."""
  prefix = PREFIX[family]
  if any(k.startswith(prefix) for k in files):
    return lambda name: name
  return lambda name: name[len(prefix):] if name.startswith(prefix) else name


def _ignored(name: str) -> bool:
  """Buffers some checkpoints carry that are no parameters (GPT-2's causal mask, RoPE
  tables), and a tied output layer saved beside its embedding."""
  return name.endswith(('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')) or (
      name == 'lm_head.weight')


def check_shapes(expected: dict, loaded: dict, where: str,
                 why: str = 'the checkpoint differs from the architecture') -> None:
  """Every loaded array has the shape of its parameter in `expected` (flat paths -> arrays or
  shapes); ConfigError naming the first that does not."""
  for path, leaf in expected.items():
    shape = tuple(getattr(leaf, 'shape', leaf))
    if path not in loaded:
      raise ConfigError(f'{where}: no tensor maps onto {path}')
    if tuple(loaded[path].shape) != shape:
      raise ConfigError(f'{where}: {path} has shape {tuple(loaded[path].shape)}, the model '
                        f'needs {shape} ({why})')


def flatten(params: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def stack_blocks(flat: dict[str, Any], depth: int) -> dict[str, Any]:
  """The `model.scan_layers` layout: block{i}/x for every i stacked into blocks/x."""
  out = {k: v for k, v in flat.items() if not k.startswith('block')}
  for path in [k for k in flat if k.startswith('block0/')]:
    rest = path[len('block0/'):]
    out['blocks/' + rest] = np.stack([flat[f'block{i}/{rest}'] for i in range(depth)])
  return out


def unstack_blocks(flat: dict[str, Any], depth: int) -> dict[str, Any]:
  out = {k: v for k, v in flat.items() if not k.startswith('blocks/')}
  for path in [k for k in flat if k.startswith('blocks/')]:
    for i in range(depth):
      out[f'block{i}/{path[len("blocks/"):]}'] = flat[path][i]
  return out


def hf_config(arch: Architecture, base: dict | None = None) -> dict:
  """A Hugging Face config.json for `arch` (over `base`, the imported one, where given)."""
  f = arch.fields
  cfg = dict(base or {})
  if arch.family == 'gpt2':
    cfg.update(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=arch.vocab_size,
               n_embd=f['width'], n_layer=f['depth'], n_head=f['heads'],
               n_inner=f['mlp_dim'], n_positions=f['max_len'],
               activation_function='gelu_new', layer_norm_epsilon=f['norm_eps'],
               tie_word_embeddings=True)
  else:
    cfg.update(model_type=cfg.get('model_type', 'llama'),
               architectures=cfg.get('architectures', ['LlamaForCausalLM']),
               vocab_size=arch.vocab_size, hidden_size=f['width'],
               num_hidden_layers=f['depth'], num_attention_heads=f['heads'],
               num_key_value_heads=f['kv_heads'] or f['heads'],
               intermediate_size=f['mlp_dim'],
               max_position_embeddings=f['max_len'], rms_norm_eps=f['norm_eps'],
               hidden_act='silu', attention_bias=f['bias'], mlp_bias=f['bias'],
               tie_word_embeddings=f['tie_embeddings'])
    if 'rope_parameters' in cfg or 'rope_theta' not in cfg:
      cfg['rope_parameters'] = {'rope_theta': f['rope_theta'], 'rope_type': 'default'}
    else:
      cfg['rope_theta'] = f['rope_theta']
  cfg['dtype'] = arch.dtype
  return cfg


# Shards of at most 2 GB (transformers 5 writes up to 50 GB each): the export holds one.
MAX_SHARD_BYTES = 2 * 10**9


def save(out: str, flat_params: dict[str, Any], arch: Architecture,
         base_config: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes `out`/config.json and the weights in the checkpoint's dtype from unscanned jaxbig
  parameters: `model.safetensors`, or past `max_shard_bytes` shards named by
  `model.safetensors.index.json`, as transformers writes them. One shard is converted and
  held at a time. `out` must not exist yet: nothing is overwritten."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise ConfigError(f'{out}: exists; export writes a new folder')
  dtype = {'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}.get(arch.dtype, np.float32)
  shards, size = [[]], 0  # Rules per shard, in order; a rule's tensors stay together.
  for rule in rules(arch):
    nbytes = sum(int(np.prod(np.shape(flat_params[p]))) for p in rule.jax) * np.dtype(
        dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(rule)
    size += nbytes
  tmp = out + '.partial'
  os.makedirs(tmp)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = WEIGHTS if len(shards) == 1 else f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    tensors_out = {}
    for rule in shard:
      arrays = rule.to_hf(*(np.asarray(flat_params[p]) for p in rule.jax))
      for hf_name, value in zip(rule.hf, arrays):
        tensors_out[hf_name] = np.ascontiguousarray(value.astype(dtype))
        weight_map[hf_name], total = name, total + tensors_out[hf_name].nbytes
    save_file(tensors_out, os.path.join(tmp, name), metadata={'format': 'pt'})
    del tensors_out
  if len(shards) > 1:
    with open(os.path.join(tmp, INDEX), 'w', encoding='utf-8') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config(arch, base_config), f, indent=2)
  os.rename(tmp, out)
