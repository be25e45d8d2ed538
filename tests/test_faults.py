"""Fault injection on whole tiny runs: the last good checkpoint always survives and is named.

Each fault is one the training system must absorb without losing data: an
update that turns the parameters to NaN while its loss is still finite, a
damaged newest checkpoint, a failed background save, a config.json write cut
short by a full disk, a second run on a locked workdir. Runs happen in
subprocesses (tests/train_subprocess.py injects the faults) sharing one
compilation cache with the rest of this module.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxddpm import checkpoint
from jaxddpm import train
from jaxddpm import workdir as workdir_lib
from test_train import BASE, REPO, STEPS, _assert_trees_equal, _configure, _params, _run, \
    _tree_digest, cache_dir  # noqa: F401  pylint: disable=unused-import


def _error_lines(err):
  return [l for l in err.splitlines() if l.startswith('error:')]


@pytest.fixture(scope='module')
def base_run(tmp_path_factory, cache_dir):  # pylint: disable=redefined-outer-name
  """An 8-step run with checkpoints 4 and 8 and one held-out evaluation at step 8."""
  workdir = tmp_path_factory.mktemp('base')
  code, summary, err = _run(workdir, cache_dir, {
      'training.sample_every': 0, 'training.eval_every': 8, 'eval.num_samples': 0,
      'eval.bpd_num_examples': 16})
  assert code == 0, err
  return workdir, summary, err


def test_first_lines_eval_lines_and_final_line(base_run):
  workdir, summary, err = base_run
  assert 'parameters, 4 cpu device(s) in 1 process(es), global batch 16' in err
  assert "Data: digits, split 'train', 1500 images of 8x8x1." in err
  assert 'starting from step 0, training to step 8' in err
  assert 'tensorboard --logdir' in err
  log_lines = [l for l in err.splitlines() if 'step 6/8' in l]
  assert len(log_lines) == 1 and 'ETA' in log_lines[0], err
  assert 'Evaluating at step 8' in err
  evaluated = [l for l in err.splitlines() if 'Evaluation at step 8 took' in l]
  assert len(evaluated) == 1 and 'bpd ' in evaluated[0], err
  # The final line: the mean of the last logged interval, as metrics.jsonl has it.
  last = [json.loads(l) for l in open(workdir / 'metrics.jsonl') if '"loss"' in l][-1]
  assert summary['loss'] == pytest.approx(last['loss'], rel=1e-6)
  assert f'Finished at step 8: mean loss {last["loss"]:.5f} over the last 2 steps' in err


def test_nothing_to_train_says_so(base_run, tmp_path, cache_dir):  # pylint: disable=redefined-outer-name
  ref_dir, _, _ = base_run
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  code, summary, err = _run(workdir, cache_dir, {
      'training.sample_every': 0, 'training.eval_every': 8, 'eval.num_samples': 0,
      'eval.bpd_num_examples': 16})
  assert code == 0, err
  assert summary['trained_steps'] == 0 and summary['loss'] is None
  assert 'Nothing to train: the workdir is at step 8' in err
  assert 'loss None' not in err


def test_nan_update_with_keep_1_keeps_the_last_good_checkpoint(base_run, tmp_path, cache_dir):  # pylint: disable=redefined-outer-name
  ref_dir, _, _ = base_run
  # The update of step 6 (0-based count 5) is NaN; the loss of step 6 was computed before it.
  code, _, err = _run(tmp_path, cache_dir, {'training.keep_checkpoints': 1,
                                            'training.sample_every': 0}, NAN_UPDATE_AT=5)
  assert code == 1, err
  [line] = _error_lines(err)
  assert 'The update of step 6 made the parameters non-finite' in line
  assert 'the last checkpoint (step 4) is intact' in line
  assert checkpoint.saved_steps(str(tmp_path)) == [4]
  for ema in (False, True):
    _assert_trees_equal(_params(tmp_path, ema, step=4), _params(ref_dir, ema, step=4))


def _corrupt(directory):
  """Overwrites the largest data file under `directory` with 0xFF bytes (NaN as float32)."""
  files = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names]
  target = max(files, key=os.path.getsize)
  size = os.path.getsize(target)
  with open(target, 'r+b') as f:
    f.seek(size // 4)
    f.write(b'\xff' * (size // 2))


def test_damaged_latest_checkpoint_is_moved_aside_and_training_redone(base_run, tmp_path,
                                                                       cache_dir):  # pylint: disable=redefined-outer-name
  ref_dir, _, _ = base_run
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  _corrupt(workdir / 'checkpoints' / '8' / 'ema_params')
  good_4 = _tree_digest(workdir / 'checkpoints' / '4')
  code, summary, err = _run(workdir, cache_dir, {
      'training.sample_every': 0, 'training.eval_every': 0})
  assert code == 0, err
  warned = [l for l in err.splitlines() if 'Checkpoint 8 ' in l and 'Moved to' in l]
  assert len(warned) == 1 and 'resuming from checkpoint 4' in warned[0], err
  assert summary['trained_steps'] == STEPS - 4
  # Steps 5..8 redone from checkpoint 4 give bitwise the uninterrupted run's parameters.
  for ema in (False, True):
    _assert_trees_equal(_params(workdir, ema), _params(ref_dir, ema))
  assert os.listdir(workdir / checkpoint.DAMAGED_DIR) == ['8']  # kept, not deleted
  assert _tree_digest(workdir / 'checkpoints' / '4') == good_4


def test_sampling_falls_back_past_a_damaged_checkpoint(base_run, tmp_path, caplog):
  ref_dir, _, _ = base_run
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  _corrupt(workdir / 'checkpoints' / '8' / 'ema_params')
  params, step = checkpoint.load_params_and_step(str(workdir))
  assert step == 4
  _assert_trees_equal(jax.device_get(params), _params(ref_dir, True, step=4))
  assert any('Checkpoint 8' in r.getMessage() and 'using checkpoint 4' in r.getMessage()
             for r in caplog.records)
  with pytest.raises(checkpoint.CheckpointError, match='Checkpoint 8 .*'):
    checkpoint.load_params(str(workdir), step=8)


def test_failed_background_save_is_one_line_naming_the_last_good(tmp_path, cache_dir):  # pylint: disable=redefined-outer-name
  code, _, err = _run(tmp_path, cache_dir, {'training.checkpoint_every': 2,
                                            'training.sample_every': 0}, FAIL_SAVE_AT=4)
  assert code == 1, err
  [line] = _error_lines(err)
  assert 'Checkpoint 4: saving a checkpoint failed' in line and 'No space left on device' in line
  assert 'The last good checkpoint is step 2' in line
  assert 'Traceback' not in err
  assert checkpoint.saved_steps(str(tmp_path)) == [2]


def test_failed_config_write_keeps_the_old_config(base_run, tmp_path, cache_dir):  # pylint: disable=redefined-outer-name
  ref_dir, _, _ = base_run
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  before = (workdir / 'config.json').read_text()
  checkpoints = _tree_digest(workdir / 'checkpoints')
  # A longer run changes config.json, so it is rewritten, and the disk is full.
  code, _, err = _run(workdir, cache_dir, {'training.num_train_steps': 12,
                                           'training.sample_every': 0}, FAIL_CONFIG_WRITE=1)
  assert code == 1, err
  [line] = _error_lines(err)
  assert 'No space left on device' in line and 'the previous config.json is unchanged' in line
  assert 'newest: step 8' in line
  assert (workdir / 'config.json').read_text() == before
  assert not [n for n in os.listdir(workdir) if n.startswith('.config.json')]
  assert _tree_digest(workdir / 'checkpoints') == checkpoints


def test_config_json_is_written_only_when_it_changes(tmp_path):
  config = tiny.get_config()
  assert workdir_lib.write_config(str(tmp_path), config)
  mtime = os.stat(tmp_path / 'config.json').st_mtime_ns
  time.sleep(0.01)
  assert not workdir_lib.write_config(str(tmp_path), config)
  assert os.stat(tmp_path / 'config.json').st_mtime_ns == mtime
  config.training.num_train_steps = 99
  assert workdir_lib.write_config(str(tmp_path), config)
  assert json.load(open(tmp_path / 'config.json'))['training']['num_train_steps'] == 99


def test_locked_workdir_is_refused_before_anything_changes(base_run, tmp_path, monkeypatch):
  ref_dir, _, _ = base_run
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  monkeypatch.setattr(train, 'make_train_step', lambda *a, **k: pytest.fail('compute'))
  holder = workdir_lib.WorkdirLock(str(workdir))
  holder.acquire()
  before = _tree_digest(workdir)
  config = _configure(tiny.get_config(), {**BASE, 'training.sample_every': 0,
                                          'training.eval_every': 8, 'eval.num_samples': 0,
                                          'eval.bpd_num_examples': 16})
  try:
    with pytest.raises(train.TrainError, match=rf'in use by another training run \(pid '
                       rf'{os.getpid()} on host .*newest: step 8'):
      train.train_and_evaluate(config, str(workdir))
    assert _tree_digest(workdir) == before
  finally:
    holder.release()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  code = ('import sys, time; sys.path.insert(0, sys.argv[2]); from jaxddpm import workdir; '
          'workdir.WorkdirLock(sys.argv[1]).acquire(); print("locked", flush=True); '
          'time.sleep(60)')
  proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path), REPO],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  with pytest.raises(workdir_lib.WorkdirError, match=f'pid {proc.pid} on host'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  lock.acquire()  # the kernel released the dead holder's flock
  assert lock.stale is not None and f'pid {proc.pid} on host' in lock.stale
  record = json.load(open(tmp_path / workdir_lib.LOCK_FILE))
  assert record['pid'] == os.getpid()
  lock.release()
  assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == ''


def test_keep_zero_is_refused_by_the_checkpointer(tmp_path):
  with pytest.raises(ValueError, match='at least one checkpoint'):
    checkpoint.Checkpointer(str(tmp_path), keep=0)


def test_nonfinite_values_are_counted_per_field():
  state = {'params': {'w': jnp.array([1.0, np.nan, np.inf])}, 'step': jnp.int32(3),
           'ema_params': {'w': jnp.ones(3)}}
  assert checkpoint.nonfinite_values(state) == {'params': 2}
