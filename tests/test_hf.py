"""Tests for jaxbig.tools.hf: Hugging Face GPT-2 and Llama checkpoints read into jaxbig's
decoder give the logits and greedy tokens of `transformers`' PyTorch models, and write back
bit for bit. The models are small, random and made here (no download)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbig import config as config_lib, models
from jaxbig.config import ConfigError
from jaxbig.data import DataMeta
from jaxbig.tools import generate, hf

torch = pytest.importorskip('torch', reason='the comparisons need PyTorch (the test extra)')
transformers = pytest.importorskip('transformers',
                                   reason='the comparisons need transformers (the test extra)')

V, LENGTH, PROMPT, NEW = 300, 64, 8, 32
FAMILIES = {
    'gpt2': lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0)),
    # Grouped-query attention (2 key/value heads for 4), an untied output layer, RoPE base
    # and RMSNorm epsilon away from jaxbig's defaults.
    'llama': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
        rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
}


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, tmp_path_factory):
  """(family, HF folder, the torch model's logits for TOKENS, its 32 greedy tokens)."""
  torch.manual_seed(0)
  model = FAMILIES[request.param]().eval()
  # Weights as large as training leaves them, so that every tensor's mapping shows (norm
  # scales around 1).
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = p.ndim == 1 and name.endswith('weight')
      p.normal_(1.0 if is_scale else 0.0, 0.2)
  folder = tmp_path_factory.mktemp(request.param) / 'hf'
  model.save_pretrained(folder)
  tokens = torch.tensor(_tokens())
  with torch.no_grad():
    logits = model(tokens).logits.numpy()
    # No end token: generate would stop at it, or (with min_new_tokens) never pick it.
    model.generation_config.eos_token_id = None
    out = model.generate(tokens[:1, :PROMPT], max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)
  return request.param, str(folder), logits, out[0, PROMPT:].numpy()


def _tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, V, (2, 24)).astype(np.int64)


def _import(folder: str):
  """(jaxbig model, params) of an HF folder, built through models.build as a run would."""
  arch = hf.architecture(hf.read_config(folder))
  config = config_lib.load('experiments/gpt_stdlib.py', [
      f'model.{k}={v}' for k, v in arch.fields.items()])
  meta = DataMeta(input_shape=(LENGTH,), num_outputs=arch.vocab_size, task='lm',
                  num_classes=arch.vocab_size, sizes={}, vocab_size=arch.vocab_size)
  model = models.build(config.model, meta)
  params = hf.unflatten(dict(hf.tensors(folder, arch)))
  return arch, model, params


def _shapes(model) -> dict:
  """The model's parameters as unboxed shapes, without running its initialisers."""
  import flax.linen as nn
  return nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32), train=False)))['params']


def test_imported_logits_equal_transformers(family):
  name, folder, want, _ = family
  arch, model, params = _import(folder)
  assert arch.family == name
  hf.check_shapes(hf.flatten(_shapes(model)), hf.flatten(params), folder)
  assert sorted(hf.flatten(_shapes(model))) == sorted(hf.flatten(params))
  got = model.apply({'params': params}, jnp.asarray(_tokens(), jnp.int32), train=False)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() > 1.0  # Logits large enough for the tolerance to mean something.


def test_greedy_generation_gives_the_same_tokens(family):
  _, folder, _, want = family
  _, model, params = _import(folder)
  got = generate.sample(model, params, _tokens()[0, :PROMPT], NEW, temperature=0.0)
  np.testing.assert_array_equal(got, want)
  assert len(set(want.tolist())) > 3  # Not one token repeated.


def test_export_round_trip_is_bit_identical_and_loads_in_transformers(family, tmp_path):
  _, folder, want, _ = family
  arch, model, params = _import(folder)
  out = str(tmp_path / 'export')
  hf.save(out, hf.flatten(params), arch, hf.read_config(folder))
  from safetensors.numpy import load_file
  before, after = (load_file(os.path.join(f, hf.WEIGHTS)) for f in (folder, out))
  assert sorted(after) == sorted(k for k in before if not k.endswith('.attn.bias'))
  for k, v in after.items():
    np.testing.assert_array_equal(v, before[k], err_msg=k)
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    np.testing.assert_allclose(loaded(torch.tensor(_tokens())).logits.numpy(), want, atol=1e-5)
  with pytest.raises(ConfigError, match='exists'):  # Never overwritten.
    hf.save(out, hf.flatten(params), arch)
  # Past max_shard_bytes: shards and their index, as transformers writes them; both ways.
  sharded = str(tmp_path / 'sharded')
  hf.save(sharded, hf.flatten(params), arch, hf.read_config(folder), max_shard_bytes=40_000)
  files = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
  assert len(files) > 2 and files[0].startswith('model-00001-of-') and os.path.isfile(
      os.path.join(sharded, hf.INDEX)), files
  loaded = transformers.AutoModelForCausalLM.from_pretrained(sharded)
  with torch.no_grad():
    np.testing.assert_allclose(loaded(torch.tensor(_tokens())).logits.numpy(), want, atol=1e-5)
  flat = hf.flatten(params)
  for path, value in hf.tensors(sharded, arch):
    np.testing.assert_array_equal(value, flat[path], err_msg=path)


def test_scanned_layout_stacks_the_blocks(family):
  _, folder, _, _ = family
  arch, _, params = _import(folder)
  flat = hf.flatten(params)
  stacked = hf.stack_blocks(flat, arch.fields['depth'])
  assert stacked['blocks/attn/query/kernel'].shape[0] == arch.fields['depth']
  back = hf.unstack_blocks(stacked, arch.fields['depth'])
  assert sorted(back) == sorted(flat)
  for k in flat:
    np.testing.assert_array_equal(back[k], flat[k])


def _folder_with(tmp_path, family, edit=None, drop=None, config_edit=None, cast=None):
  """A copy of a saved family folder, with tensors edited (cut short, or cast to `cast`) or
  dropped, or its config changed."""
  _, src, _, _ = family
  from safetensors.numpy import load_file, save_file
  out = tmp_path / 'edited'
  out.mkdir()
  weights = load_file(os.path.join(src, hf.WEIGHTS))
  for k in list(weights):
    if drop and drop in k:
      del weights[k]
    elif edit and edit in k:
      weights[k] = weights[k].astype(cast) if cast else weights[k][..., :-1].copy()
  save_file(weights, str(out / hf.WEIGHTS))
  with open(os.path.join(src, 'config.json'), encoding='utf-8') as f:
    cfg = {**json.load(f), **(config_edit or {})}
  (out / 'config.json').write_text(json.dumps(cfg))
  return str(out)


@pytest.mark.parametrize('case', ['missing', 'shape', 'dtype', 'no_weights', 'index',
                                  'model_type'])
def test_bad_folders_are_one_config_error(family, tmp_path, case):
  name, _, _, _ = family
  embed = 'wte' if name == 'gpt2' else 'embed_tokens'
  if case == 'missing':
    folder, named = _folder_with(tmp_path, family, drop='.0.mlp.'), 'is missing'
  elif case == 'shape':
    folder, named = _folder_with(tmp_path, family, edit=embed), 'shape'
  elif case == 'dtype':
    folder, named = _folder_with(tmp_path, family, edit='.1.', cast=np.int32), 'is int32'
  elif case == 'no_weights':
    folder = _folder_with(tmp_path, family)
    os.remove(os.path.join(folder, hf.WEIGHTS))
    named = 'no weights'
  elif case == 'index':
    folder = _folder_with(tmp_path, family)
    os.rename(os.path.join(folder, hf.WEIGHTS), os.path.join(folder, 'part-1.safetensors'))
    with open(os.path.join(folder, hf.INDEX), 'w') as f:
      json.dump({'weight_map': {'x': 'part-1.safetensors', 'y': 'part-2.safetensors'}}, f)
    named = 'part-2.safetensors'
  else:
    folder, named = _folder_with(tmp_path, family, config_edit={'model_type': 'bert'}), 'bert'
  with pytest.raises(ConfigError, match=named) as e:
    arch, model, params = _import(folder)
    hf.check_shapes(hf.flatten(_shapes(model)), hf.flatten(params), folder)
  assert '\n' not in str(e.value)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A GPT-2 folder with a BPE tokenizer trained here, imported into a workdir by the CLI."""
  from jaxbig.data import tokenizer
  root = tmp_path_factory.mktemp('imported')
  corpus = root / 'corpus'
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = 'def class return import self value print range list dict for while if else'.split()
  for i in range(20):
    (corpus / f'f{i}.py').write_text('\n'.join(' '.join(rng.choice(words, 12))
                                               for _ in range(50)))
  torch.manual_seed(0)
  folder = root / 'gpt2'
  FAMILIES['gpt2']().save_pretrained(folder)
  tokenizer.train_bpe(str(corpus), V, str(folder / 'tokenizer.json'))
  return root, corpus, folder


def test_import_generate_export_and_fine_tune_from_the_cli(imported, capsys):
  import conftest
  from safetensors.numpy import load_file
  root, corpus, folder = imported
  work = root / 'base'
  code, out, err = conftest.run_cli(capsys, 'import-hf', folder, '--workdir', work)
  assert code == 0, err
  assert json.loads(out)['family'] == 'gpt2'
  assert sorted(os.listdir(work)) == ['checkpoints', 'config.json', 'hf_config.json',
                                      'tokenizer.json']
  # Step 0 holds the parameters and no optimizer state: a run from it starts a fresh one.
  from jaxbig import checkpoint
  ckpts = checkpoint.Checkpoints(str(work / 'checkpoints'), read_only=True)
  assert ckpts.steps() == [0] and 'opt_state' not in ckpts.saved_fields(0)
  assert {'params', 'step', 'rng'} <= ckpts.saved_fields(0)
  code, out, err = conftest.run_cli(capsys, 'generate', work, '--prompt', 'def ', '--tokens',
                                    '8', '--temperature', '0')
  assert code == 0 and out.startswith('def '), err
  code, _, err = conftest.run_cli(capsys, 'export-hf', work, '--out', root / 'export')
  assert code == 0, err
  original = load_file(str(folder / hf.WEIGHTS))
  exported = load_file(str(root / 'export' / hf.WEIGHTS))
  for k, v in exported.items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)
  assert (root / 'export' / 'tokenizer.json').read_bytes() == (
      folder / 'tokenizer.json').read_bytes()
  # Fine-tuning: corpus prepared with the model's tokenizer, a run started from the import.
  code, _, err = conftest.run_cli(capsys, 'prepare', 'text', corpus, '--tokenizer',
                                  work / 'tokenizer.json', '--out', root / 'prepared')
  assert code == 0, err
  code, out, _ = conftest.run_cli(capsys, 'import-hf', folder, '--print-overrides')
  arch = out.split()
  run = ['experiments/finetune_hf.py', *arch, f'data.path={root / "prepared"}',
         'data.seq_len=32', 'data.batch_size=4', 'data.eval_batch_size=4', 'data.eval_windows=8',
         'train.steps=1', 'opt.warmup_steps=0', 'opt.lr=1e-9', 'precision=fp32']
  code, _, err = conftest.run_cli(capsys, 'train', *run, f'train.init_from={work}',
                                  '--workdir', root / 'tuned')
  assert code == 0, err
  # One step at a learning rate of 1e-9: the parameters are the imported ones, give or take.
  code, _, err = conftest.run_cli(capsys, 'export-hf', root / 'tuned', '--out', root / 'tuned-hf')
  assert code == 0, err
  tuned = load_file(str(root / 'tuned-hf' / hf.WEIGHTS))
  for k, v in tuned.items():
    np.testing.assert_allclose(v, original[k], atol=1e-6, err_msg=k)
  # Another architecture than the source's: one line, nothing written.
  code, _, err = conftest.run_cli(capsys, 'train', *run, 'model.mlp_dim=64',
                                  f'train.init_from={folder}', '--workdir', root / 'other')
  assert code == 2 and err.count('\n') == 1 and 'train.init_from' in err, err
  # LoRA targets that match no projection, or LoRA on a model without them: the same.
  for bad, named in ((['lora.rank=4', 'lora.targets=q,qq'], "lora.targets: 'qq'"),
                     (['lora.rank=4', 'lora.targets='], 'lora.targets'),
                     (['lora.rank=4', 'model.name=lstm'], 'lora.rank=4')):
    code, _, err = conftest.run_cli(capsys, 'train', *run, *bad, f'train.init_from={work}',
                                    '--workdir', root / 'other')
    assert code == 2 and err.count('\n') == 1 and named in err, (bad, err)
  assert not (root / 'other').exists()


def test_import_refuses_bad_input_in_one_line(imported, capsys, tmp_path):
  import conftest
  root, _, folder = imported
  small = tmp_path / 'small-vocab'
  small.mkdir()
  for name in ('model.safetensors', 'tokenizer.json'):
    (small / name).write_bytes((folder / name).read_bytes())
  cfg = json.loads((folder / 'config.json').read_text())
  (small / 'config.json').write_text(json.dumps({**cfg, 'vocab_size': 100}))
  (tmp_path / 'exists').mkdir()
  for args, named in (
      ([small, '--workdir', tmp_path / 'w1'], 'vocabulary'),
      ([folder, '--workdir', tmp_path / 'exists'], 'exists'),
      ([tmp_path, '--workdir', tmp_path / 'w2'], 'no config.json')):
    code, _, err = conftest.run_cli(capsys, 'import-hf', *args)
    assert code == 2 and err.count('\n') == 1 and named in err, err
  assert not (tmp_path / 'w1').exists() and not (tmp_path / 'w2').exists()


SHARDED = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxbig import config as config_lib, parallel, pretrained, train
from jaxbig.tools import hf
folder, tokens = sys.argv[1], np.asarray(json.loads(sys.argv[2]), np.int32)
arch = hf.architecture(hf.read_config(folder))
config = config_lib.load('experiments/finetune_hf.py', pretrained.overrides(arch) + [
    'data.name=none', f'data.seq_len={tokens.shape[1]}', 'mesh.data=1', 'mesh.fsdp=4',
    'mesh.tensor=2', 'precision=fp32', f'model.scan_layers={sys.argv[3]}'])
s = train.setup(config)
params = pretrained.load_params(s, folder)
split = max(int(np.prod(x.shape) // np.prod(x.sharding.shard_shape(x.shape)))
            for x in jax.tree.leaves(params))
with parallel.tracing(s):
  logits = jax.jit(lambda p, t: s.model.apply({'params': p}, t, train=False))(params, tokens)
print(json.dumps({'split': split, 'scanned': 'blocks' in params,
                  'logits': np.asarray(logits).tolist()}))
'''


@pytest.mark.slow(reason='imports onto 8 fake devices in a subprocess')
def test_import_onto_a_sharded_mesh_gives_the_same_logits(family, tmp_path):
  """fsdp 4 x tensor 2 on 8 fake CPU devices: every parameter placed with its sharding as it
  is read (Llama's blocks stacked for model.scan_layers as they arrive), and the logits those
  of transformers."""
  import subprocess
  import sys
  name, folder, want, _ = family
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'}
  run = subprocess.run([sys.executable, '-c', SHARDED, folder, json.dumps(_tokens().tolist()),
                        str(name == 'llama').lower()],
                       capture_output=True, text=True, env=env, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got['split'] == 8  # Some kernel split both ways: fsdp 4 x tensor 2.
  assert got['scanned'] == (name == 'llama')
  np.testing.assert_allclose(np.asarray(got['logits']), want, atol=1e-4, rtol=1e-4)


def test_a_model_trained_here_exports_to_a_gpt2_folder(tmp_path, capsys):
  """finetune_hf.py:smoke trains a GPT-2-shaped model from scratch; export-hf names its
  family from the fields, and transformers computes the logits jaxbig does."""
  import conftest
  from jaxbig.tools import inference
  work = tmp_path / 'smoke'
  code, _, err = conftest.run_cli(capsys, 'train', 'experiments/finetune_hf.py:smoke',
                                  '--workdir', work)
  assert code == 0, err
  code, out, err = conftest.run_cli(capsys, 'export-hf', work, '--out', tmp_path / 'hf')
  assert code == 0 and json.loads(out)['family'] == 'gpt2', err
  s, state, _, _ = inference.load(str(work))
  tokens = _tokens()
  want = s.model.apply({'params': state.params}, jnp.asarray(tokens, jnp.int32), train=False)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')
  with torch.no_grad():
    got = loaded(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # A decoder of neither family (RMSNorm with GELU and learned positions) has no folder to
  # go to; the Llama fields do.
  from jaxbig import pretrained
  model = config_lib.load('experiments/finetune_hf.py:smoke').model
  with pytest.raises(ConfigError, match='neither GPT-2'):
    pretrained.family_of(config_lib.load('experiments/finetune_hf.py:smoke',
                                         ['model.norm=rms']).model)
  assert pretrained.family_of(model) == 'gpt2'
  assert pretrained.family_of(config_lib.load('experiments/finetune_hf.py:smoke', [
      'model.norm=rms', 'model.pos=rope', 'model.mlp=swiglu', 'model.bias=false']).model) == 'llama'


def test_lora_trains_adapters_only_and_merges_into_the_export(imported, capsys, tmp_path):
  """20 LoRA steps (rank 4 on q, v and the MLP) from the GPT-2 folder: the loss falls, the
  base parameters stay bit-identical, and --merge-lora writes W + (A B) alpha / rank, whose
  logits in transformers are the LoRA model's."""
  import conftest
  from safetensors.numpy import load_file, save_file
  from jaxbig import checkpoint, pretrained, train
  from jaxbig.tools import inference
  root, corpus, folder = imported
  prepared = tmp_path / 'prepared'
  assert conftest.run_cli(capsys, 'prepare', 'text', corpus, '--tokenizer',
                          folder / 'tokenizer.json', '--out', prepared)[0] == 0
  arch = hf.architecture(hf.read_config(str(folder)))
  base = tmp_path / 'base'  # A copy: changed below.
  shutil.copytree(folder, base)
  work = tmp_path / 'lora'
  args = [*pretrained.overrides(arch), f'train.init_from={base}', f'data.path={prepared}',
          'data.seq_len=32', 'data.batch_size=8', 'data.eval_batch_size=8',
          'data.eval_windows=8', 'train.steps=20', 'train.log_every=5', 'train.ckpt_every=10',
          'opt.warmup_steps=0', 'opt.lr=1e-2', 'precision=fp32', 'lora.rank=4',
          'lora.targets=q,v,mlp']
  code, _, err = conftest.run_cli(capsys, 'train', 'experiments/finetune_hf.py', *args,
                                  '--workdir', work)
  assert code == 0, err
  losses = [json.loads(l)['train/loss'] for l in (work / 'metrics.jsonl').read_text().splitlines()
            if 'train/loss' in l]
  assert losses[-1] < losses[0] - 0.05, losses
  s, state, _, _ = inference.load(str(work))  # The adapters, on the base from init_from.
  trained = hf.flatten(jax.device_get(state.params))
  source = dict(hf.tensors(str(folder), arch))
  adapters = [k for k in trained if '_lora_' in k]
  assert len(adapters) == 2 * 2 * 4  # q, v, mlp_in, mlp_out in 2 blocks: A and B each.
  for k, v in source.items():  # The base, bit for bit.
    np.testing.assert_array_equal(trained[k], v, err_msg=k)
  assert all(np.abs(trained[k]).max() > 0 for k in adapters if k.endswith('_b'))
  # The checkpoint holds the adapters, their optimizer state and a reference to the base.
  ckpts = checkpoint.Checkpoints(str(work / 'checkpoints'), read_only=True)
  saved = ckpts.manager.item_metadata(20)['state']
  saved = hf.flatten(dict(getattr(saved, 'tree', saved)['params']))
  assert sorted(saved) == sorted(adapters)
  assert ckpts.saved_fingerprint(20)['base']['path'] == str(base)
  # No optimizer state for frozen parameters: Adam's two moments for the adapters only.
  full, _, _ = train.restore(s, ckpts, 20)
  moments = sum(x.size for x in jax.tree.leaves(full.opt_state) if np.ndim(x) > 0)
  assert moments == 2 * sum(trained[k].size for k in adapters)
  code, _, err = conftest.run_cli(capsys, 'export-hf', work, '--out', tmp_path / 'merged',
                                  '--merge-lora')
  assert code == 0, err
  merged = load_file(str(tmp_path / 'merged' / hf.WEIGHTS))
  a, b = trained['block0/mlp_in_lora_a'], trained['block0/mlp_in_lora_b']
  np.testing.assert_allclose(merged['transformer.h.0.mlp.c_fc.weight'],
                             source['block0/mlp_in/kernel'] + a @ b * (16.0 / 4), atol=1e-6)
  tokens = _tokens()
  want = s.model.apply({'params': state.params}, jnp.asarray(tokens, jnp.int32), train=False)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged')
  with torch.no_grad():
    np.testing.assert_allclose(loaded(torch.tensor(tokens)).logits.numpy(), want, atol=1e-4)
  code, out, err = conftest.run_cli(capsys, 'eval', work)  # As on any run.
  assert code == 0 and json.loads(out)['step'] == 20, err
  # Resumed from step 10's adapters (the base read again from init_from): the same run.
  resumed = tmp_path / 'resumed'
  config = config_lib.load('experiments/finetune_hf.py', args)
  assert train.train_and_evaluate(config, str(resumed), stop_after=10) is None
  train.train_and_evaluate(config, str(resumed))
  _, again, _, _ = inference.load(str(resumed))
  for k, v in hf.flatten(jax.device_get(again.params)).items():
    np.testing.assert_array_equal(v, trained[k], err_msg=k)
  # A base changed since: the adapters are refused on it, in one line.
  weights = load_file(str(base / hf.WEIGHTS))
  weights['transformer.h.0.mlp.c_fc.weight'] += 1e-3
  save_file(weights, str(base / hf.WEIGHTS), metadata={'format': 'pt'})
  capsys.readouterr()
  code, _, err = conftest.run_cli(capsys, 'generate', work, '--prompt', 'def ', '--tokens', '2')
  assert code == 2 and err.count('\n') == 1 and 'is not the base' in err, err


def test_lora_optimizer_state_is_under_two_percent_of_full_fine_tuning():
  """GPT-2 small's shape (124M parameters, 50257 tokens), rank 8 on q, k, v, o: the
  optimizer state's bytes against full fine-tuning's, from the abstract states."""
  from jaxbig import train
  gpt2 = ['model.width=768', 'model.depth=12', 'model.heads=12', 'model.mlp_dim=3072',
          'model.max_len=1024', 'model.pos=learned', 'model.norm=layer', 'model.bias=true',
          'model.vocab_size=50257', 'data.name=random_tokens', 'data.vocab_size=50257',
          'data.seq_len=64']
  state_bytes = {}
  for rank in (0, 8):
    s = train.setup(config_lib.load('experiments/finetune_hf.py', gpt2 + [f'lora.rank={rank}']))
    state = train.abstract_state(s)
    state_bytes[rank] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
    if rank == 0:
      assert 120e6 < train.num_params(s) < 130e6
  assert state_bytes[8] < 0.02 * state_bytes[0], state_bytes


def test_checkpoints_of_the_base_model_alone_import_too(family, tmp_path):
  """GPT-2's published files hold the base model's tensors without the `transformer.` prefix
  (Llama's without `model.`) and GPT-2's causal-mask buffers: the same parameters."""
  from safetensors.numpy import load_file, save_file
  name, folder, _, _ = family
  prefix = hf.PREFIX[name]
  weights = {k[len(prefix):] if k.startswith(prefix) else k: v
             for k, v in load_file(os.path.join(folder, hf.WEIGHTS)).items()}
  if name == 'gpt2':
    weights['h.0.attn.bias'] = np.tril(np.ones((1, 1, LENGTH, LENGTH), np.float32))
  out = tmp_path / 'base-only'
  out.mkdir()
  save_file(weights, str(out / hf.WEIGHTS))
  (out / 'config.json').write_bytes(open(os.path.join(folder, 'config.json'), 'rb').read())
  arch = hf.architecture(hf.read_config(str(out)))
  got, want = dict(hf.tensors(str(out), arch)), dict(hf.tensors(folder, arch))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_a_bfloat16_checkpoint_imports_and_exports_bit_identically(family, tmp_path):
  """Published checkpoints are mostly bfloat16: read exactly (float32 parameters) and
  written back in bfloat16, bit for bit."""
  import ml_dtypes
  from safetensors.numpy import load_file, save_file
  _, folder, _, _ = family
  src = tmp_path / 'bf16'
  src.mkdir()
  weights = {k: v.astype(ml_dtypes.bfloat16)
             for k, v in load_file(os.path.join(folder, hf.WEIGHTS)).items()}
  save_file(weights, str(src / hf.WEIGHTS))
  cfg = {**hf.read_config(folder), 'dtype': 'bfloat16'}
  (src / 'config.json').write_text(json.dumps(cfg))
  arch = hf.architecture(cfg)
  params = dict(hf.tensors(str(src), arch))
  assert all(v.dtype == np.float32 for v in params.values())
  hf.save(str(tmp_path / 'out'), params, arch, cfg)
  back = load_file(str(tmp_path / 'out' / hf.WEIGHTS))
  assert sorted(back) == sorted(k for k in weights if not k.endswith('.attn.bias'))
  for k, v in back.items():
    assert v.dtype == weights[k].dtype and v.tobytes() == weights[k].tobytes(), k


# The refused save leaves an Orbax callback for its closed event loop (not ours to close).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_bounded_checkpoint_io_takes_arrays_above_the_bound_and_names_missing_leaves(tmp_path):
  """Orbax refuses an array as large as its in-flight bound: `bound_gb` raises the bound to
  the largest array (a 1 GB embedding must not stop an import or a reader). A partial
  restore that lacks a leaf of the target is an error naming it, not an abstract leaf."""
  from flax import struct
  from jaxbig import checkpoint

  @struct.dataclass
  class State:
    params: dict
    opt_state: dict

  state = State(params={'w': jnp.ones((64, 64)), 'b': jnp.zeros(64)}, opt_state=None)
  tiny = 1e-6  # 1 KB, below the 16 KB kernel.
  raw = checkpoint.Checkpoints(str(tmp_path / 'raw'), async_save=False, concurrent_gb=tiny)
  raw.open_for_writing()
  with pytest.raises(ValueError, match='more bytes than'):
    raw.save(0, state, {}, {})
  raw.manager.close()
  bound = checkpoint.bound_gb(state.params, tiny)
  assert bound == 2 * 64 * 64 * 4 / 1e9
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'ok'), async_save=False, concurrent_gb=bound)
  ckpts.open_for_writing()
  ckpts.save(0, state, {}, {})
  ckpts.close()
  reader = checkpoint.Checkpoints(str(tmp_path / 'ok'), read_only=True, concurrent_gb=bound)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=x.sharding), state)
  got, _, _ = reader.restore(0, target, skip=('opt_state',))
  np.testing.assert_array_equal(got.params['w'], state.params['w'])
  assert got.opt_state is None and sorted(reader.saved_params(0)) == ['b', 'w']
  wider = target.replace(params={**target.params, 'extra': target.params['b']})
  with pytest.raises(ValueError, match="no .*'extra'"):
    reader.restore(0, wider, skip=('opt_state',))


def test_a_base_is_known_by_its_content_wherever_it_is(imported, tmp_path):
  """A LoRA run's record of its base compares content: a copy elsewhere is the same base; a
  workdir base is pinned to a step, and another manifest at that step is another base."""
  from jaxbig import pretrained
  _, _, folder = imported
  pretrained.import_hf(str(folder), str(tmp_path / 'w'))
  hf_id, work_id = pretrained.identity(str(folder)), pretrained.identity(str(tmp_path / 'w'))
  assert work_id['step'] == 0 and work_id['manifest_sha256']
  shutil.copytree(folder, tmp_path / 'copy')
  shutil.copytree(tmp_path / 'w', tmp_path / 'w2')
  assert pretrained.same_base(hf_id, pretrained.identity(str(tmp_path / 'copy')))
  assert pretrained.same_base(work_id, pretrained.identity(str(tmp_path / 'w2'), 0))
  manifest = tmp_path / 'w2' / 'checkpoints' / '0' / 'jaxbig_manifest.json'
  manifest.write_text(manifest.read_text().replace('"step": 0', '"step":  0'))
  assert not pretrained.same_base(work_id, pretrained.identity(str(tmp_path / 'w2'), 0))
  assert not pretrained.same_base(work_id, {**work_id, 'step': 1})
  assert not pretrained.same_base(hf_id, work_id)
