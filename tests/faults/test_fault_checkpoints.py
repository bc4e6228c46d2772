"""Checkpoints that cannot be trusted: corrupt steps are detected by their checksums and
passed over with a warning, the only good one is kept, leftovers of killed saves are removed,
and a changed model fails by name."""

import hashlib
import json
import os
import shutil

import pytest

import conftest
import fault_helpers as fh
from jaxbig import checkpoint, config as config_lib, train
from jaxbig.config import ConfigError

pytestmark = pytest.mark.slow(reason='resumes a finished run for each kind of damage')

RUN = fh.RESUMABLE


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished smoke run keeping its 3 newest checkpoints (10, 15, 20), and its losses."""
  workdir = fh.finished_run(tmp_path_factory)
  return workdir, fh.losses(workdir)


def _copy(finished, tmp_path, summary: bool = False):
  """The finished run, by default as if killed before its summary (it resumes from 20)."""
  return fh.copy_run(finished[0], tmp_path, summary)


def _sha(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _largest_file(step_dir):
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.name != checkpoint.MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


def _corrupt(step_dir, how: str) -> str:
  """Damages one file of the step; returns its path relative to the step."""
  target = _largest_file(step_dir)
  data = bytearray(target.read_bytes())
  if how == 'bit_flip':
    data[len(data) // 2] ^= 0x10
  elif how == 'truncated':
    data = data[:len(data) // 2]
  target.write_bytes(bytes(data))
  if how == 'missing_file':
    target.unlink()
  return str(target.relative_to(step_dir))


@pytest.mark.parametrize('how', ['bit_flip', 'truncated', 'missing_file'])
def test_a_corrupt_newest_checkpoint_is_passed_over(finished, how, tmp_path, capfd):
  workdir = _copy(finished, tmp_path)
  step20 = workdir / 'checkpoints' / '20'
  manifest = json.loads((step20 / checkpoint.MANIFEST).read_text())
  rel = _corrupt(step20, how)
  damaged = step20 / rel
  # The damage is real: the file no longer matches what the manifest recorded.
  assert not damaged.exists() or _sha(damaged) != manifest['files'][rel]['sha256']
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN), str(workdir))
  err = capfd.readouterr().err
  assert 'checkpoint step 20 is corrupt' in err and rel in err
  assert summary['resumed_from'] == 15
  assert (workdir / 'checkpoints_corrupt' / '20').is_dir()  # Moved aside, not deleted.
  assert fh.committed(workdir) == [10, 15, 20]  # 20 saved again; 10 and 15 kept.
  assert fh.losses(workdir) == finished[1]  # Steps 16-20 again, bit for bit.


def test_an_intact_checkpoint_is_not_passed_over(finished, tmp_path, capfd):
  """The control: the same resume without damage trains nothing and warns of nothing."""
  workdir = _copy(finished, tmp_path, summary=True)
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN), str(workdir))
  assert summary['finished_already'] and summary['step'] == 20  # Resumed at 20: finished.
  assert 'corrupt' not in capfd.readouterr().err


def test_no_good_checkpoint_stops_the_run_instead_of_starting_over(tmp_path, capsys):
  """With one checkpoint kept, a corrupt newest step leaves nothing to resume: the run stops
  (exit 2), trains nothing, and leaves the corrupt step where it is, for inspection."""
  workdir = tmp_path / 'run'
  config = config_lib.load(fh.CNN, RUN + ['train.keep_checkpoints=1'])
  train.train_and_evaluate(config, str(workdir))
  assert fh.committed(workdir) == [20]  # The others were collected as the run went on.
  _corrupt(workdir / 'checkpoints' / '20', 'bit_flip')
  before = (workdir / 'metrics.jsonl').read_bytes()
  code, _, err = conftest.run_cli(capsys, 'train', fh.CNN, *RUN, 'train.keep_checkpoints=1',
                                  '--workdir', workdir)
  assert code == 2 and 'no checkpoint passes its checksums (corrupt: 20)' in err
  assert (workdir / 'metrics.jsonl').read_bytes() == before  # Not started over.
  assert os.listdir(workdir / 'checkpoints') == ['20']  # A refused run moves nothing.
  assert not (workdir / 'checkpoints_corrupt').exists()


def test_the_last_good_checkpoint_outlives_a_failing_save(finished, tmp_path, monkeypatch):
  """Steps 15 and 20 corrupt, so 10 is the only good one; the resumed run keeps one
  checkpoint and its next save fails after Orbax's commit (say, the disk filled up). Step 10
  must survive: old steps are collected only once a newer one has its manifest."""
  workdir = _copy(finished, tmp_path)
  for step in ('15', '20'):
    _corrupt(workdir / 'checkpoints' / step, 'bit_flip')
  write = checkpoint.write_manifest

  def full_disk(path, step, print_):
    if step > 10:
      raise OSError(28, 'No space left on device')
    write(path, step, print_)

  monkeypatch.setattr(checkpoint, 'write_manifest', full_disk)
  config = config_lib.load(fh.CNN, RUN + ['train.keep_checkpoints=1'])
  with pytest.raises(OSError, match='No space left'):
    train.train_and_evaluate(config, str(workdir))
  assert fh.committed(workdir) == [10]
  assert checkpoint.verify(str(workdir / 'checkpoints' / '10')) is None
  monkeypatch.setattr(checkpoint, 'write_manifest', write)  # The disk has room again.
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['resumed_from'] == 15  # Orbax committed it: adopted.
  assert fh.committed(workdir) == [20]
  assert fh.losses(workdir) == finished[1]


def test_a_save_that_never_committed_is_removed(finished, tmp_path, capfd):
  """What a save killed half way leaves: Orbax's temporary folder of step 25."""
  workdir = _copy(finished, tmp_path)
  ckpt = workdir / 'checkpoints'
  shutil.copytree(ckpt / '20', ckpt / '25.orbax-checkpoint-tmp')
  (ckpt / '25.orbax-checkpoint-tmp' / checkpoint.MANIFEST).unlink()
  config = config_lib.load(fh.CNN, RUN + ['train.steps=25'])
  summary = train.train_and_evaluate(config, str(workdir))
  assert 'a save that did not finish' in capfd.readouterr().err
  assert summary['resumed_from'] == 20
  assert sorted(os.listdir(ckpt)) == ['15', '20', '25']


def test_a_checkpoint_without_a_manifest_is_adopted(finished, tmp_path, capfd):
  """Committed by Orbax, killed before the manifest (or saved by an older jaxbig)."""
  workdir = _copy(finished, tmp_path)
  (workdir / 'checkpoints' / '20' / checkpoint.MANIFEST).unlink()
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN), str(workdir))
  assert 'adopting it' in capfd.readouterr().err and summary['resumed_from'] == 20
  assert fh.committed(workdir) == [10, 15, 20]


@pytest.mark.parametrize('field, value', [('model.hidden', 64), ('model.features', [8, 8])])
def test_resuming_a_changed_model_fails_naming_the_field(finished, field, value, tmp_path):
  """config.json edited to the new value (so that only the checkpoint knows the old one)."""
  workdir = _copy(finished, tmp_path)
  saved = json.loads((workdir / 'config.json').read_text())
  section, _, leaf = field.rpartition('.')
  (saved[section] if section else saved)[leaf] = value
  (workdir / 'config.json').write_text(json.dumps(saved))
  value_text = ','.join(map(str, value)) if isinstance(value, list) else str(value)
  config = config_lib.load(fh.CNN, RUN + [f'{field}={value_text}'])
  with pytest.raises(ConfigError, match=f'checkpoint step 20 .* different config: {field} '):
    train.train_and_evaluate(config, str(workdir))
  assert fh.committed(workdir) == [10, 15, 20]  # Nothing moved or deleted.
