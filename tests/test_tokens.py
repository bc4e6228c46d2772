"""Token shards: `jaxbig prepare text`, `jaxbig tokenizer train` and `data.name=tokens`.

A generated corpus of small files is prepared with the bytes tokenizer (whose counts are
known exactly: one token per byte plus one per document) and with a BPE learnt from it;
training on the shards reports bits per byte on the text's scale, resumes bit-identically,
and every bad input named in issue 25 is one line that leaves the folder as it was.
"""

import json
import os
import pathlib
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import conftest
from jaxbig import config as config_lib, data as data_lib, models, train
from jaxbig.config import ConfigError
from jaxbig.data import prepare, text as text_lib, tokenizer as tokenizer_lib
from jaxbig.data import tokens as tokens_lib

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
EXPERIMENT = str(EXPERIMENTS / 'gpt_bpe_stdlib.py') + ':smoke'
_main = conftest.run_cli


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('corpus')
  rng = random.Random(0)
  words = ['def', 'return', 'self', 'import', 'class', 'for', 'in', 'if', 'else', 'x', 'y']
  for i in range(40):
    folder = root / ('a' if i % 2 else '')
    folder.mkdir(exist_ok=True)
    lines = ['    ' + ' '.join(rng.choice(words) for _ in range(6)) for _ in range(30)]
    (folder / f'f{i}.py').write_text('\n'.join(lines) + '\n')
  (root / 'binary.py').write_bytes(b'\xff\xfe\x00')  # Not UTF-8: skipped.
  return str(root)


def _prepare(corpus, out, **kw):
  kw = {'val_fraction': 0.1, 'test_fraction': 0.1, 'workers': 1, **kw}
  return prepare.prepare_text(corpus, str(out), stream=open(os.devnull, 'w'), **kw)


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory) -> tuple[str, dict]:
  out = tmp_path_factory.mktemp('prep') / 'bytes'
  return str(out), _prepare(corpus, out, shard_mb=0.02)


def test_bytes_shards_hold_every_byte_and_an_end_of_document_token(corpus, prepared):
  out, manifest = prepared
  texts = {}
  for rel in sorted(pathlib.Path(corpus).rglob('*.py')):
    data = rel.read_bytes()
    if data != b'\xff\xfe\x00':
      texts[str(rel.relative_to(corpus))] = data
  splits = manifest['splits']
  assert sum(s['documents'] for s in splits.values()) == len(texts) == 40
  assert sum(s['bytes'] for s in splits.values()) == sum(map(len, texts.values()))
  for split in splits.values():
    assert split['tokens'] == split['bytes'] + split['documents']
  assert len(splits['train']['shards']) > 1  # shard_mb=0.02: several shards.
  ids = np.concatenate([np.fromfile(os.path.join(out, e['file']), manifest['dtype'])
                        for e in splits['train']['shards']])
  assert (ids == 256).sum() == splits['train']['documents'] and ids[-1] == 256
  counts = np.load(os.path.join(out, 'unigram.npy'))
  np.testing.assert_array_equal(counts[:257], np.bincount(ids, minlength=257))
  # A document's split is the one data.name=text gives it (a hash of its path).
  expected = {'train': 0, 'val': 0, 'test': 0}
  for rel in texts:
    u = text_lib._hash_unit(rel)  # pylint: disable=protected-access
    expected['test' if u < 0.1 else 'val' if u < 0.2 else 'train'] += 1
  assert expected == {k: v['documents'] for k, v in splits.items()}


@pytest.mark.slow(reason='prepares a corpus twice in worker processes')
def test_an_interrupted_prepare_makes_only_the_missing_shards(corpus, prepared, tmp_path):
  _, manifest = prepared
  out = tmp_path / 'again'
  _prepare(corpus, out, shard_mb=0.02)
  names = [e['file'] for e in manifest['splits']['train']['shards']]
  # As if killed while writing shard 1: its .bin half there, no sidecar; no manifest yet.
  (out / names[1]).write_bytes(b'\x01\x02\x03')
  os.remove(out / names[1].replace('.bin', '.json'))
  os.remove(out / prepare.MANIFEST)
  before = {n: os.stat(out / n).st_mtime_ns for n in names if n != names[1]}
  again = _prepare(corpus, out, shard_mb=0.02, workers=2)  # Worker processes: the same.
  assert again == manifest
  assert {n: os.stat(out / n).st_mtime_ns for n in before} == before  # Not rewritten.
  assert (out / names[1]).stat().st_size == manifest['splits']['train']['shards'][1]['tokens'] * 2


@pytest.mark.slow(reason='trains and resumes runs')
def test_training_on_shards_reports_bits_per_byte_and_resumes_bit_identically(prepared,
                                                                              tmp_path):
  out, manifest = prepared
  args = [f'data.path={out}', 'train.steps=12', 'train.log_every=1', 'train.ckpt_every=4']
  straight, resumed = tmp_path / 'a', tmp_path / 'b'
  summary = train.train_and_evaluate(config_lib.load(EXPERIMENT, args), str(straight))
  train.train_and_evaluate(config_lib.load(EXPERIMENT, args), str(resumed), stop_after=6)
  train.train_and_evaluate(config_lib.load(EXPERIMENT, args), str(resumed))
  losses = lambda wd: [json.loads(l).get('train/loss') for l in open(wd / 'metrics.jsonl')]
  assert losses(straight) == losses(resumed)
  test = summary['eval']
  per_byte = manifest['splits']['test']['tokens'] / manifest['splits']['test']['bytes']
  assert test['bits_per_byte'] == pytest.approx(test['bits_per_token'] * per_byte)
  assert test['bits_per_token'] == pytest.approx(test['loss'] / np.log(2))


@pytest.mark.slow(reason='trains a tokenizer, prepares and trains')
def test_a_bpe_tokenizer_trains_prepares_and_generates(corpus, tmp_path, capsys):
  tok_file = tmp_path / 'tok.json'
  code, out, err = _main(capsys, 'tokenizer', 'train', corpus, '--vocab', '320', '--out',
                         tok_file)
  assert code == 0, err
  tok = tokenizer_lib.load(str(tok_file))
  text = 'def x(self):\n    return y\n'
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) < len(text.encode())  # Merges learnt.
  manifest = _prepare(corpus, tmp_path / 'bpe', tokenizer=str(tok_file))
  test = manifest['splits']['test']
  assert test['tokens'] < test['bytes']
  workdir = tmp_path / 'run'
  code, _, err = _main(capsys, 'train', EXPERIMENT, f'data.path={tmp_path / "bpe"}',
                       '--workdir', workdir)
  assert code == 0, err
  meta_vocab = json.loads((workdir / 'summary.json').read_text())
  assert meta_vocab['eval']['bits_per_byte'] < meta_vocab['eval']['bits_per_token']
  code, out, err = _main(capsys, 'generate', workdir, '--prompt', 'def ', '--tokens', '8')
  assert code == 0 and out.startswith('def '), err
  # The model's vocabulary is padded to 128 rows; padding ids are never sampled.
  s = train.setup(config_lib.load(EXPERIMENT, [f'data.path={tmp_path / "bpe"}']))
  assert s.data.meta.vocab_size == 384 and s.data.meta.num_classes == tok.vocab_size


# Bad input: one line, exit 2, nothing written.

def _one_line(err: str, named: str) -> None:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('jaxbig: error: ') and named in lines[0], err


def test_prepare_never_writes_into_a_folder_it_did_not_make(corpus, tmp_path, capsys):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('keep')
  code, _, err = _main(capsys, 'prepare', 'text', corpus, '--out', mine, '--workers', '1')
  assert code == 2 and os.listdir(mine) == ['notes.txt']
  _one_line(err, 'not a jaxbig prepare folder')


def test_prepare_refuses_a_folder_made_with_another_tokenizer(corpus, prepared, tmp_path,
                                                             capsys):
  out, _ = prepared
  before = sorted(os.listdir(out))
  tok_file = tmp_path / 'tok.json'
  tokenizer_lib.train_bpe(corpus, 300, str(tok_file))
  code, _, err = _main(capsys, 'prepare', 'text', corpus, '--out', out, '--tokenizer',
                       tok_file, '--workers', '1')
  assert code == 2 and sorted(os.listdir(out)) == before
  _one_line(err, 'another tokenizer')


@pytest.mark.parametrize('content, named', [
    (b'{"not": "a tokenizer"}', 'not a tokenizers file'),
    (b'\x00\x01garbage', 'not a tokenizers file'),
])
def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path, capsys, content, named):
  bad = tmp_path / 'bad.json'
  bad.write_bytes(content)
  code, _, err = _main(capsys, 'prepare', 'text', str(tmp_path), '--out', tmp_path / 'o',
                       '--tokenizer', bad)
  assert code == 2 and not (tmp_path / 'o').exists()
  _one_line(err, named)


def test_damaged_shards_and_another_tokenizer_are_refused_before_training(prepared, corpus,
                                                                          tmp_path, capsys):
  out, manifest = prepared
  copy = tmp_path / 'copy'
  copy.mkdir()
  for name in os.listdir(out):
    (copy / name).write_bytes((pathlib.Path(out) / name).read_bytes())
  shard = copy / manifest['splits']['val']['shards'][0]['file']
  shard.write_bytes(shard.read_bytes()[:-2])  # Truncated.
  workdir = tmp_path / 'run'
  code, _, err = _main(capsys, 'train', EXPERIMENT, f'data.path={copy}', '--workdir', workdir)
  assert code == 2 and not workdir.exists()
  _one_line(err, 'truncated')
  tok_file = tmp_path / 'tok.json'
  tokenizer_lib.train_bpe(corpus, 300, str(tok_file))
  code, _, err = _main(capsys, 'train', EXPERIMENT, f'data.path={out}',
                       f'data.tokenizer={tok_file}', '--workdir', workdir)
  assert code == 2 and not workdir.exists()
  _one_line(err, 'is not the tokenizer that made the shards')
  with pytest.raises(ConfigError, match='has no manifest.json'):
    tokens_lib.read_manifest(str(tmp_path))


@pytest.mark.slow(reason='trains a run')
def test_gpt_124m_smoke_trains_with_chunked_logits_and_packed_documents(prepared, tmp_path,
                                                                        capsys):
  out, _ = prepared
  spec = str(EXPERIMENTS / 'gpt_124m.py') + ':smoke'
  config = config_lib.load(spec, [f'data.path={out}', 'data.pack=true'])
  assert config.model.logits_chunk < config.data.seq_len
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(summary['eval']['bits_per_byte']) and summary['step'] == 10
  # Sampling one document: the prompt opened by the end token, the text cut at the next.
  code, text, err = _main(capsys, 'generate', tmp_path / 'run', '--prompt', 'def ',
                          '--tokens', '16', '--seed', '3')
  assert code == 0 and text.startswith('def '), err
  # The full config (for a GPU) at GPT-2's vocabulary: its parameters, counted abstractly.
  full = config_lib.load(str(EXPERIMENTS / 'gpt_124m.py'), [])
  meta = data_lib.DataMeta(input_shape=(1024,), num_outputs=50304, task='lm',
                           num_classes=50257, sizes={}, vocab_size=50304)
  model = models.build(full.model, meta)
  x = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, train=False), x)
  count = sum(a.size for a in jax.tree.leaves(nn.meta.unbox(shapes['params'])))
  assert 124e6 < count < 125e6, count


def _fabricate(folder: pathlib.Path, tokens: int) -> None:
  """A prepared folder of `tokens` bytes-tokenizer ids in 4 train shards, written directly
  (as `jaxbig prepare text` lays it out) so that a large corpus costs no tokenizing."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  splits = {}
  for split, count, shards in (('train', tokens, 4), ('val', 4096, 1), ('test', 4096, 1)):
    entries = []
    for i in range(shards):
      ids = rng.integers(0, 257, count // shards, dtype=np.uint16)
      name = f'{split}-{i:05d}.bin'
      ids.tofile(folder / name)
      entries.append({'file': name, 'tokens': len(ids), 'documents': 1, 'bytes': len(ids),
                      'sha256': ''})
    splits[split] = {'shards': entries, 'tokens': count, 'documents': shards, 'bytes': count}
  np.save(folder / 'unigram.npy', np.ones(384, np.int64))
  manifest = {'format': 'jaxbig-tokens-1', 'dtype': '<u2', 'splits': splits,
              'tokenizer': {'identity': 'bytes', 'file': '', 'vocab_size': 257, 'eos_id': 256,
                            'source': 'bytes'}}
  (folder / prepare.MANIFEST).write_text(json.dumps(manifest))


_PEAK_RSS = '''
import sys
from jaxbig import config, data
spec, *overrides = sys.argv[1:]
cfg = config.load(spec, overrides)
tokens = data.build(cfg.data, cfg.seed)
it = tokens.train_iter()
for _ in range(50):
  next(it)
list(tokens.eval_batches('val'))
with open('/proc/self/status') as f:  # Anonymous pages: the shards' own pages are the
  print(next(l.split()[1] for l in f if l.startswith('RssAnon:')))  # kernel's file cache.
'''


@pytest.mark.slow(reason='reads 20 MB and 200 MB of shards in two subprocesses')
def test_resident_memory_does_not_grow_with_the_corpus(tmp_path):
  """The anonymous resident memory of a process that opens the shards and draws 50 training
  batches and an evaluation from 10x the tokens stays within 20 MB of the 1x one: the
  shards are memory-mapped (their pages are file cache the kernel can drop) and nothing
  copies them. (The train step's memory does not depend on the corpus.)"""
  import subprocess  # pylint: disable=g-import-not-at-top
  peaks = []
  for scale in (1, 10):
    folder = tmp_path / f'x{scale}'
    _fabricate(folder, 10_000_000 * scale)
    args = [EXPERIMENT, f'data.path={folder}', 'data.batch_size=64']
    out = subprocess.run([sys.executable, '-c', _PEAK_RSS, *map(str, args)],
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
                         text=True, timeout=300, check=True)
    peaks.append(int(out.stdout.split()[-1]) * 1024)  # In KiB.
  assert peaks[1] - peaks[0] < 20 * 2**20, peaks


@pytest.mark.parametrize('lines, named', [
    (b'{"text": "ok"}\n[1, 2]\n', ':2: not a UTF-8 JSON object'),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', ':2: not a UTF-8 JSON object'),
    (b'{"text": "\\ud800"}\n', ":1: field 'text' is not valid Unicode"),
    (b'{"body": "no text field"}\n', ":1: not a UTF-8 JSON object with a string field 'text'"),
])
def test_bad_jsonl_lines_are_one_line_naming_the_line(tmp_path, capsys, lines, named):
  source = tmp_path / 'docs.jsonl'
  source.write_bytes(lines)
  code, _, err = _main(capsys, 'prepare', 'text', source, '--out', tmp_path / 'o')
  assert code == 2 and not (tmp_path / 'o').exists()
  _one_line(err, f'{source}{named}')


def test_a_split_too_short_for_one_window_is_refused_at_the_start(prepared, tmp_path, capsys):
  out, manifest = prepared
  longest = max(e['tokens'] for e in manifest['splits']['val']['shards'])
  workdir = tmp_path / 'run'
  code, _, err = _main(capsys, 'train', EXPERIMENT, f'data.path={out}',
                       f'data.seq_len={longest}', f'model.max_len={longest + 1}',
                       '--workdir', workdir)
  assert code == 2 and not workdir.exists()
  _one_line(err, 'longest val shard')


# Sources: records in jsonl, parquet and datasets folders, and one large text file.

def _docs(n: int = 30) -> list[str]:
  rng = random.Random(1)
  return [' '.join(rng.choice(['alpha', 'beta', 'gamma', 'é', '\n']) for _ in range(40))
          for _ in range(n)]


def _token_text(out, manifest) -> dict:
  """Per split, the shards' ids (bytes tokenizer) as text, documents cut at the eos token."""
  texts = {}
  for split, info in manifest['splits'].items():
    ids = np.concatenate([np.fromfile(os.path.join(out, e['file']), manifest['dtype'])
                          for e in info['shards']] or [np.zeros(0, np.uint16)])
    texts[split] = bytes(ids[ids != 256].astype(np.uint8)).decode('utf-8')
  return texts


def test_parquet_files_folders_and_datasets_folders_give_the_jsonl_documents(tmp_path):
  pa = pytest.importorskip('pyarrow', reason='the sources extra (pyarrow) is not installed')
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  datasets = pytest.importorskip('datasets', reason='the sources extra is not installed')
  docs = _docs()
  with open(tmp_path / 'docs.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs))
  pq.write_table(pa.table({'id': list(range(30)), 'text': docs}), tmp_path / 'docs.parquet')
  (tmp_path / 'parts').mkdir()
  for k, part in enumerate((docs[:12], docs[12:])):
    pq.write_table(pa.table({'text': part}), tmp_path / 'parts' / f'p{k}.parquet')
  datasets.Dataset.from_dict({'text': docs}).save_to_disk(str(tmp_path / 'hf'))
  made = {}
  for name, pattern in (('docs.jsonl', ''), ('docs.parquet', ''), ('parts', '*.parquet'),
                        ('hf', '')):
    out = tmp_path / f'out-{name}'
    made[name] = _token_text(out, _prepare(str(tmp_path / name), out, pattern=pattern))
  assert made['docs.parquet'] == made['docs.jsonl'] == made['parts'] == made['hf']
  assert sorted(''.join(made['hf'].values())) == sorted(''.join(docs))


def test_a_datasets_dict_keeps_its_own_test_split(tmp_path):
  datasets = pytest.importorskip('datasets', reason='the sources extra is not installed')
  docs = _docs(40)
  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'text': docs[:30]}),
      'test': datasets.Dataset.from_dict({'text': docs[30:]}),
      'unsupervised': datasets.Dataset.from_dict({'text': ['left out'] * 5}),
  }).save_to_disk(str(tmp_path / 'hf'))
  manifest = _prepare(str(tmp_path / 'hf'), tmp_path / 'out', val_fraction=0.3)
  splits = manifest['splits']
  assert splits['test']['documents'] == 10 and splits['test']['bytes'] == sum(
      len(d.encode()) for d in docs[30:])
  assert splits['train']['documents'] + splits['val']['documents'] == 30
  assert splits['val']['documents'] > 0  # Drawn from train by hash: the dict has none.
  with pytest.raises(ConfigError, match="has no column 'body'"):
    _prepare(str(tmp_path / 'hf'), tmp_path / 'out2', field='body')


def test_a_parquet_file_without_the_field_is_one_line(tmp_path, capsys):
  pa = pytest.importorskip('pyarrow', reason='the sources extra (pyarrow) is not installed')
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({'body': ['x']}), tmp_path / 'd.parquet')
  code, _, err = _main(capsys, 'prepare', 'text', tmp_path / 'd.parquet', '--out',
                       tmp_path / 'o')
  assert code == 2 and not (tmp_path / 'o').exists()
  _one_line(err, "no column 'text' (--field); it has body")


def test_one_text_file_is_cut_at_line_ends_into_shards(tmp_path):
  lines = [f'line {i} ' + 'é' * (i % 7) + '\n' for i in range(3000)]
  source = tmp_path / 'one.txt'
  source.write_text(''.join(lines))
  prepare.PIECE_BYTES, old = 1000, prepare.PIECE_BYTES  # Pieces of a few lines.
  try:
    manifest = _prepare(str(source), tmp_path / 'out', shard_mb=0.01)
  finally:
    prepare.PIECE_BYTES = old
  splits = manifest['splits']
  assert len(splits['train']['shards']) > 3 and all(s['documents'] == 1 for s in
                                                     splits.values())
  texts = _token_text(tmp_path / 'out', manifest)
  assert texts['train'] + texts['val'] + texts['test'] == ''.join(lines)
  assert all(t.endswith('\n') for t in texts.values())  # Ranges end at line ends.
  assert len(texts['val'].encode()) == pytest.approx(0.1 * source.stat().st_size, abs=30)


def test_an_out_folder_inside_the_source_is_not_read_as_documents(corpus, tmp_path):
  source = tmp_path / 'src'
  source.mkdir()
  for rel in ('f0.py', 'f2.py', 'a/f1.py'):
    (source / rel).parent.mkdir(exist_ok=True)
    (source / rel).write_bytes((pathlib.Path(corpus) / rel).read_bytes())
  first = _prepare(str(source), source / 'prepared', val_fraction=0.0, test_fraction=0.0)
  assert first['splits']['train']['documents'] == 3
  assert _prepare(str(source), source / 'prepared', val_fraction=0.0,
                  test_fraction=0.0) == first


_PREPARE_RSS = '''
import os, resource, sys
from jaxbig.data import prepare
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare.prepare_text(sys.argv[1], sys.argv[2], shard_mb=2, workers=1,
                     stream=open(os.devnull, 'w'))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


@pytest.mark.slow(reason='prepares 4 MB and 32 MB in subprocesses')
def test_prepare_never_holds_the_whole_corpus(tmp_path):
  """Preparing one text file in 2 MB shards raises the peak RSS by the same amount (within
  24 MB) for 4 MB and 32 MB: the source is streamed, one shard per split at a time.
  Holding the text, as before, took 1.2 GB for a 64 MB file."""
  import subprocess  # pylint: disable=g-import-not-at-top
  line = b'the quick brown fox jumps over the lazy dog 0123456789\n'
  growth = []
  for mb in (4, 32):
    source = tmp_path / f'{mb}.txt'
    with open(source, 'wb') as f:
      for _ in range(mb):
        f.write(line * (2**20 // len(line)))
    out = subprocess.run([sys.executable, '-c', _PREPARE_RSS, str(source),
                          str(tmp_path / f'o{mb}')], env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                         capture_output=True, text=True, timeout=300, check=True)
    before, after = (int(v) * 1024 for v in out.stdout.split())
    growth.append(after - before)
  assert growth[1] - growth[0] < 24 * 2**20, growth


def test_data_pack_gives_the_model_the_end_of_document_token(prepared):
  out, _ = prepared
  s = train.setup(config_lib.load(EXPERIMENT, [f'data.path={out}', 'data.pack=true']))
  assert s.data.meta.doc_eos == s.model.doc_eos == 256
  s = train.setup(config_lib.load(EXPERIMENT, [f'data.path={out}']))
  assert s.data.meta.doc_eos == s.model.doc_eos == -1
  lstm = config_lib.load(str(EXPERIMENTS / 'lstm_stdlib.py') + ':smoke', [])
  with pytest.raises(ConfigError, match='data.pack: packed documents need model.name='):
    models.build(lstm.model, s.data.meta.__class__(**{**vars(s.data.meta), 'doc_eos': 256}))


def test_random_tokens_size_a_model_at_any_vocabulary_without_a_corpus():
  args = ['data.name=random_tokens', 'data.vocab_size=1000']
  s = train.setup(config_lib.load(EXPERIMENT, args))
  assert (s.data.meta.vocab_size, s.data.meta.num_classes) == (1024, 1000)
  batch = next(s.data.train_iter())
  assert batch['x'].shape == (8, 32) and 0 <= batch['x'].min() and batch['x'].max() < 1000
  with pytest.raises(ConfigError, match='data.vocab_size: data.name=random_tokens needs'):
    train.setup(config_lib.load(EXPERIMENT, ['data.name=random_tokens']))


def test_one_file_without_line_ends_is_cut_between_characters(tmp_path, monkeypatch):
  text = 'é€𝄞a' * 700  # 2-, 3- and 4-byte characters, no newline.
  source = tmp_path / 'one.txt'
  source.write_text(text)
  monkeypatch.setattr(prepare, 'PIECE_BYTES', 1000)
  manifest = _prepare(str(source), tmp_path / 'out', val_fraction=0.0, test_fraction=0.0)
  assert _token_text(tmp_path / 'out', manifest)['train'] == text


@pytest.mark.parametrize('content', [b'ok\n\xff\xfe\n' * 10, b'\xff\n' + b'x' * 5000])
def test_one_file_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch, content):
  monkeypatch.setattr(prepare, 'PIECE_BYTES', 1000)
  source = tmp_path / 'one.txt'
  source.write_bytes(content)
  code, _, err = _main(capsys, 'prepare', 'text', source, '--out', tmp_path / 'o')
  assert code == 2 and not (tmp_path / 'o').exists()
  _one_line(err, f'{source}: not UTF-8 text (byte ')


def test_runs_saved_before_the_new_token_fields_still_resume(tmp_path):
  """A config.json without data.pack, data.vocab_size (gpt_bpe_stdlib) and
  model.logits_chunk (lstm_stdlib), as runs saved before them have, matches the defaults;
  a different value does not."""
  from jaxbig import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  for spec, fields in ((EXPERIMENT, ('data.pack', 'data.vocab_size')),
                       (str(EXPERIMENTS / 'lstm_stdlib.py') + ':smoke', ('model.logits_chunk',))):
    run = tmp_path / pathlib.Path(spec).stem
    run.mkdir()
    old = config_lib.to_dict(config_lib.load(spec, []))
    for field in fields:
      section, name = field.split('.')
      del old[section][name]
    (run / 'config.json').write_text(json.dumps(old))
    workdir_lib.check_config(str(run), config_lib.load(spec, []))
    changed = f"{fields[0]}={'true' if fields[0] == 'data.pack' else 7}"
    with pytest.raises(ConfigError, match=f'different config .{fields[0]}'):
      workdir_lib.check_config(str(run), config_lib.load(spec, [changed]))
