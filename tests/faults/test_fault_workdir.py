"""A workdir has one owner, a refused run changes no file, resume is exact or refused, and
readers never see a step deleted under them. Each case stands beside a good twin that the
same checks accept."""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import conftest
import fault_helpers as fh
from jaxbig import checkpoint, cli, config as config_lib, faults, memory, train
from jaxbig.tools import inference
from jaxbig import workdir as workdir_lib

RUN = fh.RESUMABLE


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished smoke run with checkpoints 10, 15 and 20."""
  return fh.finished_run(tmp_path_factory)


_copy = fh.copy_run


def _train(capsys, workdir, *overrides, spec=fh.CNN):
  return conftest.run_cli(capsys, 'train', spec, *RUN, *overrides, '--workdir', workdir)


def _one_line(err: str, named: str) -> None:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('jaxbig: error: ') and named in lines[0], err


# Ownership.

@pytest.mark.slow(reason='trains and resumes runs')
def test_a_second_train_is_refused_naming_the_holder(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  held = workdir_lib.lock(str(workdir), 0)  # As a running `jaxbig train` holds it.
  code, out, err = _train(capsys, workdir)
  assert code == 2 and not out
  _one_line(err, f'pid {os.getpid()} on {socket.gethostname()}')
  assert os.listdir(workdir) == ['jaxbig-0.lock']  # Nothing else written.
  os.close(held)  # The good twin: the holder ended.
  code, _, err = _train(capsys, workdir, 'train.steps=2')
  assert code == 0, err


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from jaxbig import workdir; '
       'workdir.lock(sys.argv[1], 0); print("held", flush=True); time.sleep(600)',
       str(workdir)], env=fh.env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(config_lib.ConfigError, match=f'pid {holder.pid} '):
      workdir_lib.lock(str(workdir), 0)
  finally:
    holder.kill()
    holder.wait()
  os.close(workdir_lib.lock(str(workdir), 0))  # The kernel released it with the process.


# name: (what the folder holds, what the one-line error names). The good twin of each is the
# same folder emptied.
FOREIGN = {
    'another_tools_results': ({'metrics.jsonl': '{"loss": 1}\n', 'summary.json': '{}'},
                              'not a jaxbig workdir'),
    'config_is_a_list': ({'config.json': '[]'}, 'config.json: not a jaxbig config'),
    'config_lacks_sections': ({'config.json': '{"seed": 0, "data": {}}'}, 'lacks model'),
    'user_checkpoints_only': ({'checkpoints/2023/notes.txt': 'mine'}, 'not a jaxbig workdir'),
}


@pytest.mark.parametrize('files, named', FOREIGN.values(), ids=FOREIGN.keys())
def test_a_folder_that_is_not_a_jaxbig_workdir_is_refused_untouched(files, named, tmp_path,
                                                                    capsys):
  workdir = tmp_path / 'run'
  for rel, text in files.items():
    (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
    (workdir / rel).write_text(text)
  before = fh.snapshot(workdir)
  code, _, err = _train(capsys, workdir)
  assert code == 2
  _one_line(err, named)
  assert fh.snapshot(workdir) == before
  shutil.rmtree(workdir)
  workdir.mkdir()
  workdir_lib.check_folder(str(workdir))  # The twin: an empty folder is fine.


@pytest.mark.slow(reason='trains and resumes runs')
def test_eval_of_a_workdir_whose_config_lacks_a_field_is_one_line(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  code, out, err = conftest.run_cli(capsys, 'eval', workdir)  # The twin first.
  assert code == 0 and json.loads(out)['step'] == 20, err
  saved = json.loads((workdir / 'config.json').read_text())
  del saved['train']['loss']
  (workdir / 'config.json').write_text(json.dumps(saved))
  code, _, err = conftest.run_cli(capsys, 'eval', workdir)
  assert code == 2
  _one_line(err, 'config.json: lacks a field')


@pytest.mark.slow(reason='trains and resumes runs')
def test_entries_jaxbig_did_not_write_are_left_alone_and_reported_once(finished, tmp_path,
                                                                        capfd):
  workdir = _copy(finished, tmp_path)
  ckpt = workdir / 'checkpoints'
  (ckpt / '2023').mkdir()
  (ckpt / '2023' / 'notes.txt').write_text('mine')
  (ckpt / '30').mkdir()  # Empty: no step of ours, although its name is a number.
  (ckpt / 'README').write_text('mine too')
  mine = {p: fh.snapshot(ckpt / p) for p in ('2023', '30', 'README')}
  summary = train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.steps=25']),
                                     str(workdir))
  err = capfd.readouterr().err
  assert summary['resumed_from'] == 20 and summary['step'] == 25
  assert err.count('that jaxbig did not write') == 1 and '2023' in err, err
  assert {p: fh.snapshot(ckpt / p) for p in mine} == mine
  assert fh.committed(workdir) == [15, 20, 25]
  # A folder named like a step the run will save is refused before anything is written.
  (ckpt / '30' / 'notes.txt').write_text('mine')
  before = fh.snapshot(workdir)
  with pytest.raises(config_lib.ConfigError, match='checkpoints/30: a folder jaxbig did not'):
    train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.steps=30']), str(workdir))
  assert fh.snapshot(workdir) == before
  capfd.readouterr()
  # The twin: a workdir without them resumes without the report.
  workdir2 = tmp_path / 'run2'
  shutil.copytree(finished, workdir2)
  train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.steps=25']), str(workdir2))
  assert 'did not write' not in capfd.readouterr().err


# Resume: exact or refused.

def test_fewer_steps_than_the_checkpoint_are_refused_writing_nothing(finished, tmp_path,
                                                                      capsys):
  workdir = _copy(finished, tmp_path)
  before = fh.snapshot(workdir)
  code, _, err = _train(capsys, workdir, 'train.steps=5')
  assert code == 2
  _one_line(err, 'train.steps=5')
  assert fh.snapshot(workdir) == before
  # The twin, the finished run's own command: says so, exits 0, adds no row.
  code, out, err = _train(capsys, workdir)
  assert code == 0 and json.loads(out)['finished_already'] and 'finished its 20 steps' in err
  assert fh.snapshot(workdir) == before


def test_a_refused_resume_leaves_the_original_command_working(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  (workdir / 'summary.json').unlink()  # So that the original command has work to do.
  before = fh.snapshot(workdir)
  code, _, err = _train(capsys, workdir, 'model.hidden=64')
  assert code == 2
  _one_line(err, 'model.hidden')
  assert fh.snapshot(workdir) == before  # config.json too.
  code, _, err = _train(capsys, workdir)
  assert code == 0, err


def test_a_run_killed_before_its_summary_evaluates_once(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  (workdir / 'summary.json').unlink()  # Killed after the final save, before the summary.
  rows = fh.metrics(workdir)
  train.train_and_evaluate(config_lib.load(fh.CNN, RUN), str(workdir))
  tested = [r for r in fh.metrics(workdir) if any(k.startswith('test/') for k in r)]
  assert len(tested) == 1 and tested[0]['step'] == 20
  assert fh.metrics(workdir) == rows  # The same rows, the final one written again.


@pytest.mark.slow(reason='trains and resumes runs')
def test_changed_data_is_refused_naming_the_file(tmp_path, capsys):
  rng = np.random.default_rng(0)
  data = tmp_path / 'images.npz'
  images, labels = rng.random((120, 8, 8)).astype(np.float32), np.arange(120) % 10
  np.savez(data, x=images, y=labels)
  workdir = tmp_path / 'run'
  npz = ['data.name=npz', f'data.path={data}']
  assert _train(capsys, workdir, *npz, 'train.steps=10')[0] == 0
  code, _, err = _train(capsys, workdir, *npz, 'train.steps=15')  # The twin: same data.
  assert code == 0, err
  np.savez(data, x=images * 2, y=labels)  # Replaced in place: other statistics.
  before = fh.snapshot(workdir)
  code, _, err = _train(capsys, workdir, *npz, 'train.steps=20')
  assert code == 2
  _one_line(err, str(data))
  assert fh.snapshot(workdir) == before


# Bounded memory.

@pytest.mark.slow(reason='trains and resumes runs')
def test_a_batch_larger_than_memory_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                         monkeypatch):
  workdir = tmp_path / 'run'
  code, _, err = _train(capsys, workdir, 'data.eval_batch_size=100000000')
  assert code == 2 and not workdir.exists()
  _one_line(err, 'data.eval_batch_size=100000000')
  # The compiled step against a device smaller than it needs.
  monkeypatch.setattr(memory, 'device_bytes', lambda device: 100_000)
  code, _, err = _train(capsys, workdir)
  assert code == 2 and not workdir.exists()
  # Compiling comes first, narrated by note lines; the refusal is one error line after them.
  notes = [l for l in err.splitlines() if not l.startswith('jaxbig: error: ')]
  assert all(l.startswith('jaxbig: ') for l in notes), err
  errors = '\n'.join(l for l in err.splitlines() if l not in notes)
  _one_line(errors, 'data.batch_size=32: the compiled step needs')
  monkeypatch.undo()  # The twin: the machine's real memory.
  code, _, err = _train(capsys, workdir, 'train.steps=2')
  assert code == 0, err


# Readers.

def test_a_reader_keeps_its_step_while_the_run_deletes_it(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  s = train.setup(config_lib.load(fh.CNN, RUN))
  ckpts = checkpoint.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  want = train.restore(s, ckpts, 20)[0]
  with ckpts.pinned() as (view, step):
    assert step == 20
    shutil.rmtree(workdir / 'checkpoints' / '20')  # As the run's collection does.
    with pytest.raises(Exception):  # The twin: read in place, the step is gone.
      train.restore(s, ckpts, 20)
    got = train.restore(s, view, step)[0]
  assert all(np.array_equal(a, b) for a, b in zip(fh.jax.tree.leaves(got),
                                                  fh.jax.tree.leaves(want)))
  assert not (workdir / checkpoint.READERS).exists()  # The links went with the reader.


def test_a_step_deleted_while_it_is_linked_is_passed_for_the_newest_left(finished, tmp_path,
                                                                        monkeypatch):
  workdir = _copy(finished, tmp_path)
  link = checkpoint._link_tree  # pylint: disable=protected-access
  calls = []

  def deleted_meanwhile(src, dest):
    if not calls:  # The run renames the step away while the reader starts linking it.
      os.replace(src, src + checkpoint.DELETING)
    calls.append(src)
    link(src, dest)

  monkeypatch.setattr(checkpoint, '_link_tree', deleted_meanwhile)
  assert inference.load(str(workdir))[2] == 15
  assert [os.path.basename(c) for c in calls] == ['20', '15']


@pytest.mark.slow(reason='trains and resumes runs')
def test_the_owner_removes_the_links_of_dead_readers_only(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  readers = workdir / checkpoint.READERS
  for name in ('dead', 'alive'):
    (readers / name).mkdir(parents=True)
    (readers / name / 'lock').write_text('')
  alive = open(readers / 'alive' / 'lock')
  fcntl.flock(alive, fcntl.LOCK_SH)
  try:
    train.train_and_evaluate(config_lib.load(fh.CNN, RUN + ['train.steps=21']), str(workdir))
    assert sorted(os.listdir(readers)) == ['alive']
  finally:
    alive.close()


# Ctrl-C.

def test_a_second_sigint_ends_the_run_at_once_with_one_line(monkeypatch, capsys):
  exits = []
  monkeypatch.setattr(faults.os, '_exit', lambda code: exits.append(code))
  with faults.Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.reached(1) and preemption.signal == 'SIGINT' and not exits
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [faults.INTERRUPTED]
  assert 'interrupted again' in capsys.readouterr().err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored.


def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch, capsys):
  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, '_run', interrupted)
  code, out, err = conftest.run_cli(capsys, 'eval', 'anywhere')
  assert code == 130 and not out and err.strip() == 'jaxbig: interrupted'


@pytest.mark.slow(reason='trains and resumes runs')
def test_sigint_saves_the_step_and_exits_130(tmp_path):
  workdir, log = tmp_path / 'run', tmp_path / 'log.txt'
  proc = fh.start('train', fh.CNN, 'train.log_every=1', 'train.eval_every=0', 'train.steps=100',
                  'train.ckpt_every=0', '--workdir', workdir, log=log)
  fh.wait_for(lambda: fh.logged_steps(workdir) >= 5, proc)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
  out = log.read_text()
  step = json.loads(out[out.index('{\n'):out.index('\n}') + 2])['step']
  assert f'interrupted (SIGINT): saved step {step}' in out and 'Traceback' not in out
  assert fh.committed(workdir) == [step]
