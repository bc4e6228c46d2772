"""Bounded inputs: files that are not regular, sizes past a limit, forged .npz/.npy headers,
label ids, flags that are NaN or too large, files of the wrong kind. Each is refused with one
line `jaxbig: error: ...` naming the field, file or flag, exit code 2, nothing written.

Every bad row has a good twin, the same input with the one thing fixed, which is accepted:
the row's value is what is refused, not the rest. Data identities (for resume checks) and
`describe_change` are at the end.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import types
import zipfile

import numpy as np
import pytest

import conftest
import fault_helpers as fh
from jaxbig import cli, config as config_lib, data as data_lib, train
from jaxbig.tools import generate, inference
from jaxbig.tools import bench
from jaxbig.tools.bench import load_suite, report
from jaxbig.config import ConfigError
from jaxbig.data import text

GPT = str(fh.REPO / 'experiments' / 'gpt_stdlib.py') + ':smoke'
CNN, MLP = fh.CNN, fh.MLP
MIB = 2**20


@pytest.fixture(autouse=True)
def no_hang():
  """Fails a test that blocks (e.g. on opening a FIFO) instead of hanging the suite."""
  def stuck(*_):  # pytest.fail: not an OSError, which the code under test may catch.
    pytest.fail('blocked for 30 s (a FIFO opened?)')

  old = signal.signal(signal.SIGALRM, stuck)
  signal.alarm(30)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, old)


def _text(path, n: int = 12, size: int = 400) -> str:
  """A folder of `n` distinct UTF-8 files (or one file when path ends in .txt)."""
  line = lambda i: f'file {i}: def f{i}(x): return x + {i}\n'.encode()
  if path.suffix == '.txt':
    path.write_bytes(b''.join(line(i) for i in range(n * 10)))
    return str(path)
  path.mkdir()
  for i in range(n):
    (path / f'f{i:02d}.txt').write_bytes((line(i) * (size // len(line(i)) + 1))[:size])
  return str(path)


def _npy(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


def _header(shape, descr: str = '<f4') -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {'descr': descr, 'fortran_order': False,
                                             'shape': shape})
  return buf.getvalue()


def _zip(path, members: dict, compression=zipfile.ZIP_STORED) -> str:
  with zipfile.ZipFile(path, 'w', compression) as z:
    for name, data in members.items():
      z.writestr(name, data)
  return str(path)


def _claim_size(path: str, member: str, size: int) -> None:
  """Rewrites the uncompressed size the zip's central directory states for `member`."""
  raw = bytearray(open(path, 'rb').read())
  at = raw.find(b'PK\x01\x02')
  while raw[at + 46:at + 46 + struct.unpack_from('<H', raw, at + 28)[0]] != member.encode():
    at = raw.find(b'PK\x01\x02', at + 4)
  struct.pack_into('<I', raw, at + 24, size)
  open(path, 'wb').write(bytes(raw))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Every file a row names, as {name: path}."""
  d = tmp_path_factory.mktemp('b')
  out = {'folder': _text(d / 'folder', 30), 'one': _text(d / 'one.txt')}
  os.mkfifo(d / 'fifo')
  os.symlink('/dev/zero', d / 'zero')
  out.update(fifo=str(d / 'fifo'), zero=str(d / 'zero'))
  # One 1 MiB + 1 byte file; a folder of two 0.6 MiB files.
  (d / 'big.txt').write_bytes(b'big text\n' * (MIB // 9) + b'x' * (MIB % 9 + 1))
  out['big'] = str(d / 'big.txt')
  (d / 'two').mkdir()
  for i in range(2):
    (d / 'two' / f'{i}.txt').write_bytes(f'part {i}\n'.encode() * (6 * MIB // 70))
  out['two'] = str(d / 'two')
  rng = np.random.default_rng(0)
  x, y = rng.random((60, 8, 8)).astype(np.float32), np.arange(60) % 10
  out['clean'] = _zip(d / 'clean.npz', {'x.npy': _npy(x), 'y.npy': _npy(y)})
  out['object'] = _zip(d / 'object.npz', {'x.npy': _npy(x.astype(object)), 'y.npy': _npy(y)})
  forged = _header((10**12, 8, 8)) + x.tobytes()  # Claims 256 TB, holds 15 KB.
  out['forged'] = _zip(d / 'forged.npz', {'x.npy': forged, 'y.npy': _npy(y)})
  garbled = b'\x93NUMPY\x01\x00' + struct.pack('<H', 16) + b'{not a header!}\n'
  out['garbled'] = _zip(d / 'garbled.npz', {'x.npy': garbled, 'y.npy': _npy(y)})
  out['extra'] = _zip(d / 'extra.npz', {'x.npy': _npy(x), 'y.npy': _npy(y),
                                        'notes.txt': b'mine'})
  out['claims'] = _zip(d / 'claims.npz', {'x.npy': _npy(x), 'y.npy': _npy(y)},
                       zipfile.ZIP_DEFLATED)
  _claim_size(out['claims'], 'x.npy', 2**31)
  out['offset'] = _zip(d / 'offset.npz', {'x.npy': _npy(x), 'y.npy': _npy(y % 3 + 10**6)})
  out['relabelled'] = _zip(d / 'relabelled.npz', {'x.npy': _npy(x), 'y.npy': _npy(y % 3)})
  out['no_examples'] = _zip(d / 'no_examples.npz', {'x.npy': _npy(x[:0]), 'y.npy': _npy(y[:0])})
  np.save(d / 'plain.npy', x)
  out['plain'] = str(d / 'plain.npy')
  return out


# name: (experiment, bad overrides, what the message names, good overrides). Paths are
# {names} of `files`.
TABLE = {
    'path_is_a_fifo': (GPT, ['data.name=text', 'data.path={fifo}'],
                       ('data.path', 'not a regular file'), ['data.name=text', 'data.path={one}']),
    'path_links_to_dev_zero': (GPT, ['data.name=text', 'data.path={zero}'],
                               ('data.path', 'not a regular file'),
                               ['data.name=text', 'data.path={one}']),
    'file_over_max_file_mb': (GPT, ['data.name=text', 'data.path={big}', 'data.max_file_mb=1'],
                              ('data.max_file_mb', 'big.txt'),
                              ['data.name=text', 'data.path={big}', 'data.max_file_mb=2']),
    'folder_over_max_total_mb': (GPT, ['data.name=text', 'data.path={two}',
                                       'data.max_total_mb=1', 'data.val_fraction=0',
                                       'data.test_fraction=0'], ('data.max_total_mb',),
                                 ['data.name=text', 'data.path={two}', 'data.max_total_mb=2',
                                  'data.val_fraction=0', 'data.test_fraction=0']),
    'stdlib_over_max_total_mb': (GPT, ['data.max_total_mb=1'], ('data.max_total_mb',), []),
    'max_file_mb_zero': (GPT, ['data.max_file_mb=0'], ('data.max_file_mb', 'must be in'),
                         ['data.max_file_mb=1']),
    'seed_of_20_digits': (CNN, ['seed=99999999999999999999'], ('seed',), ['seed=4294967295']),
    'seed_of_2_to_the_32': (CNN, ['seed=4294967296'], ('seed',), ['seed=0']),
    'npz_object_array': (CNN, ['data.name=npz', 'data.path={object}'],
                         ('data.path', 'object arrays need pickle'),
                         ['data.name=npz', 'data.path={clean}']),
    'npz_forged_shape': (CNN, ['data.name=npz', 'data.path={forged}'],
                         ('data.path', 'declares shape'), ['data.name=npz', 'data.path={clean}']),
    'npz_garbled_header': (CNN, ['data.name=npz', 'data.path={garbled}'],
                           ('data.path', 'bad .npy header'),
                           ['data.name=npz', 'data.path={clean}']),
    'npz_member_not_npy': (CNN, ['data.name=npz', 'data.path={extra}'],
                           ('data.path', 'notes.txt is not a .npy'),
                           ['data.name=npz', 'data.path={clean}']),
    'npz_member_claims_too_much': (CNN, ['data.name=npz', 'data.path={claims}'],
                                   ('data.path', 'more than the file can hold'),
                                   ['data.name=npz', 'data.path={clean}']),
    'npz_labels_offset_by_a_million': (CNN, ['data.name=npz', 'data.path={offset}'],
                                       ('data.path', 'relabel'),
                                       ['data.name=npz', 'data.path={relabelled}']),
    'npz_without_examples': (CNN, ['data.name=npz', 'data.path={no_examples}'],
                             ('data.path', 'no examples'), ['data.name=npz', 'data.path={clean}']),
    'npy_given_as_npz': (CNN, ['data.name=npz', 'data.path={plain}'],
                         ('data.path', 'not an .npz file'), ['data.name=npz', 'data.path={clean}']),
}
ROWS = [pytest.param(*row, id=name) for name, row in TABLE.items()]


def _one_line(code: int, out: str, err: str, *needles: str) -> None:
  lines = err.strip().splitlines()
  assert code == 2 and not out, (code, out, err)
  assert len(lines) == 1 and lines[0].startswith('jaxbig: error: '), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize('spec, bad, named, good', ROWS)
def test_bad_input_is_one_line_and_writes_nothing(spec, bad, named, good, files, capsys,
                                                  tmp_path, monkeypatch):
  del good
  fh.forbid_compiling(monkeypatch)
  overrides = [o.format(**files) for o in bad]
  code, out, err = conftest.run_cli(capsys, 'train', spec, *overrides, '--workdir',
                                    tmp_path / 'wd')
  _one_line(code, out, err, *named)
  assert fh.snapshot(tmp_path) == {}


@pytest.mark.parametrize('spec, bad, named, good', ROWS)
@pytest.mark.slow(reason='reads the standard library')
def test_the_good_twin_is_accepted(spec, bad, named, good, files):
  del bad, named
  config = config_lib.load(spec, [o.format(**files) for o in good])
  data = data_lib.build(config.data, config.seed)
  assert data.meta.sizes['train'] > 0


def test_a_folder_skips_what_is_not_a_regular_file_unread(files, tmp_path, capsys,
                                                          monkeypatch):
  plain = shutil.copytree(files['folder'], tmp_path / 'plain')
  mixed = shutil.copytree(files['folder'], tmp_path / 'mixed')
  os.mkfifo(mixed / 'fifo.txt')
  os.symlink('/dev/zero', mixed / 'zero.txt')
  os.symlink(mixed / 'gone', mixed / 'broken.txt')
  monkeypatch.chdir(mixed)  # A socket's path must be short.
  with socket.socket(socket.AF_UNIX) as s:
    s.bind('sock.txt')
    args = ('data.name=text', 'data.val_fraction=0.2', 'data.test_fraction=0.2')
    config = config_lib.load(GPT, args + (f'data.path={mixed}',))
    got = data_lib.build(config.data, config.seed)
  warned = capsys.readouterr().err
  config = config_lib.load(GPT, args + (f'data.path={plain}',))
  want = data_lib.build(config.data, config.seed)
  assert got.files['not_regular'] == 4 and want.files['not_regular'] == 0
  assert [l for l in warned.splitlines() if l.startswith('jaxbig: warning: ')] == \
      warned.strip().splitlines() and warned.count('\n') == 1, warned
  assert 'skipped 4 entries' in warned
  assert not capsys.readouterr().err  # The plain folder: no warning.
  for split in data_lib.SPLITS:  # Not a byte of /dev/zero.
    np.testing.assert_array_equal(got.splits[split], want.splits[split])


def test_a_file_is_read_at_most_one_byte_past_its_limit(files, tmp_path, monkeypatch):
  big = tmp_path / 'big.txt'
  big.write_bytes(b'x' * 3 * MIB)
  reads = []
  original = io.BufferedReader.read

  class Counting(io.BufferedReader):
    def read(self, n=-1):
      data = original(self, n)
      reads.append(len(data))
      return data

  monkeypatch.setattr(text, 'open', lambda fd, mode: Counting(io.FileIO(fd, 'rb')),
                      raising=False)
  assert len(text.read_regular(str(big), MIB)) == MIB + 1
  assert sum(reads) == MIB + 1
  reads.clear()
  assert len(text.read_regular(str(big), 4 * MIB)) == 3 * MIB
  assert text.read_regular(files['zero'], MIB) is None
  assert text.read_regular(files['fifo'], MIB) is None
  assert sum(reads) == 3 * MIB  # Nothing of /dev/zero or the FIFO.


def test_configs_saved_without_the_limits_still_load(files):
  config = config_lib.load(GPT, ['data.name=text', f"data.path={files['folder']}"])
  saved = config_lib.to_dict(config)
  assert saved['data'].pop('max_file_mb') == 256 and saved['data'].pop('max_total_mb') == 4096
  old = config_lib.from_dict(saved)
  assert 'max_file_mb' not in old.data
  data = data_lib.build(old.data, old.seed)
  new = data_lib.build(config.data, config.seed)
  np.testing.assert_array_equal(data.splits['train'], new.splits['train'])


# (argv, what the one line names); `{x}` etc. are files of the `cli_files` fixture.
CLI_BAD = {
    'train_readme': (['train', '{readme}'], ('README.md', 'not an experiment file')),
    'plan_readme': (['plan', '{readme}'], ('README.md', 'not an experiment file')),
    'bench_readme': (['bench', '{readme}', '--out', '{tmp}/b'], ('README.md', 'not a suite')),
    'report_binary': (['report', '{binary}'], ('binary.jsonl', 'not a text file')),
    'report_other_json': (['report', '{other_json}'], ('other.jsonl:1', 'not a jaxbig bench')),
    'report_binary_sweep': (['report', '{binary_sweep}'], ('sweep.json', 'not a readable')),
    'report_binary_summary': (['report', '{binary_summary}'], ('summary.json', 'not a run')),
    'predict_no_examples': (['predict', '{tmp}', '{empty}'], ('empty.npy', 'no examples')),
    'predict_forged_npy': (['predict', '{tmp}', '{forged_npy}'], ('forged.npy', 'declares')),
    'predict_over_npy_of_the_out_name': (['predict', '{tmp}', '{x}', '--out', '{tmp}/precious'],
                                         ('precious.npy', 'exists')),
    'bench_min_seconds_nan': (['bench', 'benchmarks/suites/smoke.py', '--min-seconds', 'nan'],
                              ('--min-seconds', 'finite')),
    'generate_temperature_nan': (['generate', '{tmp}', '--temperature', 'nan'],
                                 ('--temperature', 'finite')),
    'generate_temperature_inf': (['generate', '{tmp}', '--temperature', 'inf'],
                                 ('--temperature', 'finite')),
    'generate_seed_too_large': (['generate', '{tmp}', '--seed', str(2**40)], ('--seed',)),
    'generate_rnn_tokens_over_cap': (['generate', '{rnn}', '--tokens', '70000'],
                                     ('--max-tokens', '70000')),
}
# The same commands with the one value fixed: each gets past the check (to the fake model,
# a written prediction, a loaded suite or report).
CLI_GOOD = {
    'train_readme': None,  # An experiment file: loaded below.
    'plan_readme': None,
    'bench_readme': None,  # A suite file: loaded below.
    'report_binary': ['report', '{good_rows}'],
    'report_other_json': ['report', '{good_rows}'],
    'report_binary_sweep': ['report', '{good_sweep}'],
    'report_binary_summary': ['report', '{good_sweep}'],
    'predict_no_examples': ['predict', '{tmp}', '{x}', '--out', '{tmp}/fresh'],
    'predict_forged_npy': ['predict', '{tmp}', '{x}', '--out', '{tmp}/fresh'],
    'predict_over_npy_of_the_out_name': ['predict', '{tmp}', '{x}', '--out', '{tmp}/fresh'],
    'bench_min_seconds_nan': None,  # Parsed below.
    'generate_temperature_nan': ['generate', '{rnn}', '--temperature', '0.5'],
    'generate_temperature_inf': ['generate', '{rnn}', '--temperature', '0'],
    'generate_seed_too_large': ['generate', '{rnn}', '--seed', str(2**32 - 1)],
    'generate_rnn_tokens_over_cap': ['generate', '{rnn}', '--tokens', '70000',
                                     '--max-tokens', '70000'],
}


@pytest.fixture
def cli_files(tmp_path, monkeypatch):
  """Files the CLI rows name, a fake trained model for predict and generate (nothing is
  loaded or compiled), and the calls that reached it."""
  t = tmp_path
  (t / 'README.md').write_text('# Not Python\n')
  (t / 'binary.jsonl').write_bytes(bytes(range(256)) * 8)
  (t / 'other.jsonl').write_text('{"seed": 0, "data": {}}\n')
  for name in ('binary_sweep', 'good_sweep'):
    (t / name / 'm0').mkdir(parents=True)
    member = {'name': 'm0', 'overrides': [], 'params': 10, 'non_embedding_params': 8,
              'flops_per_step': 100.0, 'unit': 'tokens', 'units_per_step': 64, 'steps': 4}
    (t / name / 'sweep.json').write_text(json.dumps({'experiment': GPT, 'members': [member]}))
    (t / name / 'm0' / 'summary.json').write_text(json.dumps({
        'step': 4, 'train_loss': 2.0, 'val': {'loss': 2.1}, 'wall_s': 1.0,
        'device_kind': 'cpu', 'num_devices': 1, 'precision': 'fp32'}))
  (t / 'binary_sweep' / 'sweep.json').write_bytes(b'\xff\xfe\x00' * 100)
  shutil.copytree(t / 'good_sweep', t / 'binary_summary')
  (t / 'binary_summary' / 'm0' / 'summary.json').write_bytes(b'\x89PNG\r\n\x1a\n\x00')
  row = json.loads(open(fh.REPO / 'benchmarks' / 'results' / 'cpu' / 'precision' /
                        'results.jsonl').readline())
  (t / 'rows').mkdir()
  (t / 'rows' / 'results.jsonl').write_text(json.dumps(row) + '\n')
  np.save(t / 'empty.npy', np.zeros((0, 8, 8), np.float32))
  np.save(t / 'x.npy', np.ones((3, 8, 8), np.float32))
  (t / 'forged.npy').write_bytes(_header((10**12, 8, 8)) + b'\0' * 64)
  (t / 'precious.npy').write_bytes(b'keep me')
  (t / 'rnn').mkdir()
  paths = {k: str(t / v) for k, v in (
      ('readme', 'README.md'), ('binary', 'binary.jsonl'), ('other_json', 'other.jsonl'),
      ('binary_sweep', 'binary_sweep'), ('good_sweep', 'good_sweep'),
      ('binary_summary', 'binary_summary'), ('good_rows', 'rows'), ('empty', 'empty.npy'),
      ('x', 'x.npy'), ('forged_npy', 'forged.npy'), ('rnn', 'rnn'))}
  paths['tmp'] = str(t)
  reached = []

  def load(workdir, step=None):  # An LSTM: no max_len.
    del step
    if workdir != paths['rnn']:
      raise AssertionError('a model was loaded before the flags were checked')
    reached.append('load')
    config = types.SimpleNamespace(model=types.SimpleNamespace(name='lstm'),
                                   data=types.SimpleNamespace(name='stdlib'))
    return (types.SimpleNamespace(config=config, model=object(), policy=None,
                                  data=types.SimpleNamespace()),  # Bytes: no tokenizer.
            types.SimpleNamespace(params={}), 1,
            types.SimpleNamespace(task='lm', vocab_size=256, num_classes=256))

  def sample(model, params, prompt, num_tokens, **kwargs):
    reached.append(('sample', num_tokens))
    return np.full(num_tokens, ord('a'), np.int32)

  def predict(workdir, inputs):
    reached.append(('predict', inputs.shape))
    return np.arange(len(inputs), dtype=np.int32)

  def run_suite(path, *args, **kwargs):  # Loads the suite as the real one does; runs nothing.
    load_suite(path)
    raise AssertionError('the suite would have run')

  monkeypatch.setattr(bench, 'run_suite', run_suite)
  monkeypatch.setattr(inference, 'load', load)
  monkeypatch.setattr(inference, 'predict', predict)
  monkeypatch.setattr(generate, 'sample', sample)
  monkeypatch.setattr(generate.precision, 'tracing', lambda policy: contextlib.nullcontext())
  monkeypatch.chdir(fh.REPO)
  return paths, reached


def _cli(capsys, argv) -> tuple[int, str, str]:
  """`run_cli`, with argparse's exit turned into its code."""
  try:
    return conftest.run_cli(capsys, *argv)
  except SystemExit as e:
    out, err = capsys.readouterr()
    return e.code, out, err


@pytest.mark.parametrize('name', list(CLI_BAD))
def test_bad_command_is_one_line_and_writes_nothing(name, cli_files, capsys, tmp_path):
  paths, reached = cli_files
  argv, named = CLI_BAD[name]
  before = fh.snapshot(tmp_path)
  code, out, err = _cli(capsys, [a.format(**paths) for a in argv])
  _one_line(code, out, err, *named)
  assert fh.snapshot(tmp_path) == before
  assert not [r for r in reached if r != 'load'], reached  # No sampling, no predicting.


@pytest.mark.parametrize('name', list(CLI_BAD))
def test_the_good_command_is_accepted(name, cli_files, capsys, tmp_path):
  paths, reached = cli_files
  argv = CLI_GOOD[name]
  if name in ('train_readme', 'plan_readme'):
    assert config_lib.load(CNN).train.steps > 0
    return
  if name == 'bench_readme':
    assert load_suite('benchmarks/suites/smoke.py')[1]
    return
  if name == 'bench_min_seconds_nan':
    args = cli._parser().parse_args(['bench', 'benchmarks/suites/smoke.py', '--min-seconds', '1'])
    assert args.min_seconds == 1.0
    return
  code, out, err = _cli(capsys, [a.format(**paths) for a in argv])
  assert code == 0, err
  if argv[0] == 'predict':
    assert np.load(tmp_path / 'fresh.npy').tolist() == [0, 1, 2] and 'fresh.npy' in out
    assert not list(tmp_path.glob('*.partial'))
  if argv[0] == 'generate':
    assert reached[-1][0] == 'sample'


def test_report_reads_the_committed_results_row(cli_files):
  paths, _ = cli_files
  assert len(report.read(paths['good_rows'])) == 1


# Data identities, for resume checks.


def _build(*overrides: str):
  config = config_lib.load(GPT, ['data.val_fraction=0.2', 'data.test_fraction=0.2',
                                 *overrides])
  return data_lib.build(config.data, config.seed)


def test_text_identity_names_a_changed_added_or_removed_file(files, tmp_path):
  root = shutil.copytree(files['folder'], tmp_path / 'c')
  moved = shutil.copytree(files['folder'], tmp_path / 'moved')
  args = ('data.name=text',)
  first = _build(*args, f'data.path={root}').identity()
  json.dumps(first)
  assert first == _build(*args, f'data.path={root}').identity()
  assert data_lib.describe_change(first, _build(*args, f'data.path={moved}').identity()) is None
  (root / 'f03.txt').write_bytes(b'file 3 was edited\n' * 20)
  changed = _build(*args, f'data.path={root}').identity()
  assert data_lib.describe_change(first, changed) == 'data.path: file f03.txt changed'
  (root / 'new.txt').write_text('a new file\n' * 30)
  (root / 'f05.txt').unlink()
  later = _build(*args, f'data.path={root}').identity()
  assert data_lib.describe_change(changed, later) == \
      'data.path: file new.txt added, file f05.txt removed'
  one = _build(*args, f"data.path={files['one']}").identity()
  assert list(one['files']) == ['one.txt']


def test_stdlib_identity_is_small_and_has_every_file():
  ident = _build().identity()
  assert len(ident['files']) > 1000 and len(json.dumps(ident)) < 100_000
  assert ident['source'] == 'stdlib' and len(ident['digest']) == 64


def test_array_identities(files, tmp_path):
  path = str(shutil.copy(files['clean'], tmp_path / 'd.npz'))
  npz = lambda: data_lib.build(config_lib.load(CNN, ['data.name=npz', f'data.path={path}']).data,
                               0).identity()
  first = npz()
  with open(path, 'rb') as f:
    assert first == {'source': 'npz', 'path': path, 'size': os.path.getsize(path),
                     'sha256': hashlib.sha256(f.read()).hexdigest()}
  shutil.copy(files['relabelled'], path)
  second = npz()
  assert data_lib.describe_change(first, second) == (
      f"data.path: {path} changed (size {first['size']} -> {second['size']})")
  digits = data_lib.build(config_lib.load(CNN).data, 0).identity()
  assert digits == data_lib.build(config_lib.load(CNN).data, 0).identity()
  assert len(digits['sha256']) == 64 and len(json.dumps(digits)) < 200
  assert data_lib.describe_change(digits, {**digits, 'sha256': '0' * 64}) == \
      'data.name=digits: the loaded arrays changed'
  assert 'source changed' in data_lib.describe_change(digits, first)
  synthetic = config_lib.load(CNN, ['data.name=synthetic', 'data.size=100'])
  assert data_lib.build(synthetic.data, 0).identity() == {}
