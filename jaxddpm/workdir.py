"""The training workdir: its config.json, the check that it fits a config, and its lock.

`run_train.py` owns one folder per run (see DESIGN.md, "The workdir"). This
module keeps the folder consistent:

- `write_config` replaces `config.json` atomically (a temporary file in the
  same folder, flushed to disk, then renamed over the old one), and only when
  its content changes, so a full disk or a kill mid-write leaves the previous
  file whole.
- `check_compatible` refuses a config whose model, diffusion or data sections
  differ from the ones the workdir's checkpoints were trained with, and a
  workdir that has checkpoints but lost its config.json (nothing left to check
  the new config against).
- `restore_newest` resumes from the newest checkpoint that fits the config
  and reads back whole and finite, moving damaged newer ones aside, and puts
  the data iterator where that checkpoint's data state says, checking that it
  is the same data order at the same step.
- `WorkdirLock` lets one training run at a time use the folder. It is an
  advisory `flock` on `workdir/.lock`, which the kernel releases when the
  holder dies however it dies (SIGKILL, OOM, a crash), so a stale lock never
  blocks a new run; the file also records the holder's host, pid and start
  time for the message another run prints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from absl import logging

from jaxddpm import checkpoint
from jaxddpm import data as data_lib
from jaxddpm import parallel

PyTree = Any

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'

# Sections of config.json that must match for a workdir's checkpoints to be resumed.
COMPATIBLE_SECTIONS = ('model', 'diffusion', 'data')
# data fields that say where the data lives or how it is read, not what it is: allowed to
# change on resume (the data iterator's saved state checks the order itself).
_RELOCATABLE_DATA_FIELDS = ('data_dir', 'num_workers')


class WorkdirError(Exception):
  """The workdir cannot be used for this run; the message says why and what to do."""


def config_dict(config) -> dict:
  """A ConfigDict as the plain JSON dict that config.json holds."""
  return json.loads(config.to_json_best_effort())


def config_text(config) -> str:
  return config.to_json_best_effort(indent=2) + '\n'


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves a file can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
      pass
  except OSError as e:
    raise WorkdirError(f'Cannot write to workdir {workdir!r}: {e}') from e


def write_config(workdir: str, config) -> bool:
  """Writes config.json atomically when its content differs; returns whether it wrote.

  On failure (e.g. ENOSPC) the old file is untouched, the temporary file is
  removed, and WorkdirError says so.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  text = config_text(config)
  try:
    with open(path) as f:
      if f.read() == text:
        return False
  except OSError:
    pass  # absent or unreadable: write it
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix='.config.json.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    kept = 'the previous config.json is unchanged' if os.path.exists(path) else (
        'no config.json was written')
    raise WorkdirError(f'Cannot write {path}: {e}; {kept}.') from e
  return True


# Keys added to the config after runs were saved without them, with the value those runs had.
_ADDED_KEYS = {
    'model': {'name': 'unet', 'text': {'encoder': '', 'width': 64, 'num_layers': 2,
                                       'num_heads': 4, 'caption_dropout': 0.1, 'clip_dir': '',
                                       'vocab_size': 0, 'null_tokens': [0],
                                       'clip_arch': ''}},
    'data': {'low_res_size': 0, 'photo_size': 128, 'image_width': 0, 'max_text_length': 16},
}
# Keys removed from the config that older runs' config.json still hold; they never changed
# what was trained (data.shuffle_buffer: the order has been a full shuffle per epoch).
_REMOVED_KEYS = {'data': ('shuffle_buffer',)}


def _comparable(section_name: str, section: dict) -> dict:
  added = _ADDED_KEYS.get(section_name, {})
  section = {**added, **section}
  for key, value in added.items():  # a nested group saved before some of its keys existed
    if isinstance(value, dict) and isinstance(section[key], dict):
      section[key] = {**value, **section[key]}
  section = {k: v for k, v in section.items() if k not in _REMOVED_KEYS.get(section_name, ())}
  if section_name == 'data':
    return {k: v for k, v in section.items() if k not in _RELOCATABLE_DATA_FIELDS}
  return section


def _diff_keys(old: dict, new: dict, prefix: str) -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      diffs.append(f'{prefix}.{key}: {old.get(key)!r} (saved) vs {new.get(key)!r}')
  return diffs


def check_compatible(config, workdir: str, *, has_checkpoints: bool) -> None:
  """Raises WorkdirError when `workdir`'s checkpoints were trained with a different config.

  Compares the `COMPATIBLE_SECTIONS` of config.json with `config`; other
  sections (training length, logging, sampling, the optimizer's values) may
  change when a run is resumed. The optimizer's *structure* is checked
  against the checkpoint itself when it is restored.
  """
  if not has_checkpoints:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise WorkdirError(
        f'Workdir {workdir!r} holds checkpoints but no {CONFIG_FILE}, so nothing says which '
        'model and diffusion they were trained with. Put the run\'s config.json back, or '
        'train this config in a new workdir.')
  with open(path) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      raise WorkdirError(
          f'{path} is not valid JSON ({e}); cannot check it matches this run. Restore it, or '
          'train in a new workdir.') from e
  current = config_dict(config)
  diffs = []
  for section in COMPATIBLE_SECTIONS:
    diffs += _diff_keys(_comparable(section, saved.get(section, {})),
                        _comparable(section, current.get(section, {})), section)
  if diffs:
    raise WorkdirError(
        f'Workdir {workdir!r} holds checkpoints of a different run; its config.json differs in '
        + '; '.join(diffs) + '. Use a new workdir (or delete the old one) to train this config.')


def _describe_holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return (f'pid {holder["pid"]} on host {holder["host"]}, started '
            f'{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))}')
  except (ValueError, KeyError, TypeError):
    return 'a process that left no readable record'


class WorkdirLock:
  """An exclusive lock on a workdir for the lifetime of one training run.

    with WorkdirLock(workdir) as lock:   # raises WorkdirError if another run holds it
      ...
  `stale` is the record (host, pid, start) of a dead run that had held it, or None.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.stale: str | None = None
    self._fd: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      text = os.pread(fd, 4096, 0).decode(errors='replace')
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise WorkdirError(f'Cannot lock {self.path}: {e}') from e
      raise WorkdirError(
          f'Workdir {os.path.dirname(self.path)!r} is in use by another training run '
          f'({_describe_holder(text)}; lock file {self.path}). Wait for it to finish or stop '
          'it, or train in another workdir.') from None
    previous = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    # We hold the lock, so whoever wrote a record here has died without releasing it.
    self.stale = _describe_holder(previous) if previous else None
    record = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                         'started': time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode() + b'\n', 0)
    self._fd = fd

  def release(self) -> None:
    """Clears the record and unlocks. The file stays: unlinking a locked file races
    with a run that opened it a moment earlier and would then lock a deleted inode."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    os.close(self._fd)  # releases the flock
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------
# Resuming.


def lock(workdir: str) -> WorkdirLock | None:
  """Takes the workdir's lock on process 0 (returned; None elsewhere).

  Every process raises WorkdirError when another run holds it. All processes must call it.
  """
  held, error = None, None
  if parallel.is_main_process():
    held = WorkdirLock(workdir)
    try:
      held.acquire()
    except WorkdirError as e:
      held, error = None, str(e)
  if parallel.any_process(error is not None):
    raise WorkdirError(error or f'Workdir {workdir!r} is in use by another run (see process 0).')
  if held is not None and held.stale:
    logging.info('Took over the lock of a run that ended without releasing it (%s).', held.stale)
  return held


def _check_fits(ckpt: checkpoint.Checkpointer, step: int, abstract_state,
                workdir: str) -> None:
  """Rejects checkpoint `step` as damaged (CheckpointError) or this config as not fitting it
  (WorkdirError), reading metadata only."""
  try:
    names = ckpt.item_names(step)
    if 'train' not in names:
      raise checkpoint.CheckpointError(
          f'is missing its train item (optimizer state); items: {names}')
    diffs = ckpt.layout_differences(step, abstract_state)
  except checkpoint.CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.CheckpointError(
        f'cannot be read ({checkpoint.first_line(e)})') from e
  if not diffs:
    return
  what = ('a different model (parameter shapes differ from this config)'
          if any(d.startswith(('params/', 'ema_params/')) for d in diffs) else
          'an optimizer state of another structure (optim.grad_clip, optim.weight_decay or '
          'diffusion.timestep_sampler changed?)')
  raise WorkdirError(
      f'Checkpoint {step} in {workdir!r} holds {what}: {diffs[0]}'
      + (f' (and {len(diffs) - 1} more)' if len(diffs) > 1 else '')
      + '. Resume with the settings it was trained with, or use a new workdir.')


def quarantine(ckpt: checkpoint.Checkpointer, steps: list[int], workdir: str) -> str:
  """Moves checkpoints `steps` to workdir/checkpoints.damaged/ (nothing is deleted).

  They would otherwise stay the "latest" checkpoint and block new saves at their steps.
  Process 0 moves; every process must call this. Returns the folder they went to.
  """
  target = os.path.join(os.path.abspath(workdir), checkpoint.DAMAGED_DIR)
  if parallel.is_main_process():
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest, suffix = os.path.join(target, str(step)), 1
      while os.path.exists(dest):  # damaged twice at one step: keep both
        dest, suffix = os.path.join(target, f'{step}.{suffix}'), suffix + 1
      shutil.move(os.path.join(ckpt.directory, str(step)), dest)
  parallel.barrier('jaxddpm_checkpoint_quarantine')
  ckpt.reload()
  return target


def restore_newest(ckpt: checkpoint.Checkpointer, abstract_state, workdir: str,
                   batches: data_lib.BatchIterator | None = None) -> tuple[int, PyTree] | None:
  """(step, state) of the newest checkpoint that fits and reads back finite; None if none exist.

  `abstract_state` is the train state's tree of `jax.ShapeDtypeStruct`s.
  Newer checkpoints that are damaged are moved to workdir/checkpoints.damaged/
  (so they neither count as the latest nor block saves at their steps) and
  named in a warning. `batches`, the training data iterator, is moved to the
  restored step (`restore_data_state`). Raises WorkdirError when checkpoints
  exist but none is usable (nothing is moved then), or when this config (or
  its data) does not fit them.
  """
  steps = ckpt.all_steps()
  if not steps:
    return None
  if not any('train' in _safe_item_names(ckpt, s) for s in steps):
    raise WorkdirError(
        f'The checkpoints in {workdir!r} hold parameters only (no optimizer state), so '
        'training cannot resume from them (converted weights?). Use a new workdir.')
  step, state, rejected = ckpt.restore_newest_good(
      abstract_state, check=lambda s: _check_fits(ckpt, s, abstract_state, workdir))
  reasons = '; '.join(f'checkpoint {s} {why}' for s, why in rejected)
  if step is None:
    raise WorkdirError(
        f'No checkpoint in {ckpt.directory} can be resumed: {reasons}. They are left in '
        'place; move them away to start again from step 0.')
  if rejected:
    moved_to = quarantine(ckpt, [s for s, _ in rejected], workdir)
    logging.warning('%s. Moved to %s; resuming from checkpoint %d, the newest good one.',
                    reasons[0].upper() + reasons[1:], moved_to, step)
  if batches is not None:
    restore_data_state(ckpt, step, batches, workdir)
  return step, state


def restore_data_state(ckpt: checkpoint.Checkpointer, step: int,
                       batches: data_lib.BatchIterator, workdir: str) -> None:
  """Restores the data iterator state saved with checkpoint `step` into `batches`.

  The saved state must be this pipeline's data order (`BatchIterator.set_state`) and
  continue at `step`; a checkpoint without one (older runs, or another number of
  processes) or with an unreadable one puts `batches` at `step`, which defines the batches
  as well. Raises WorkdirError when the data order does not fit.
  """
  try:
    restored = ckpt.restore_data(step, batches)
  except data_lib.DatasetError as e:
    raise WorkdirError(f'Checkpoint {step} in {workdir!r}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('The data state of checkpoint %d cannot be read (%s); continuing the '
                    'data order from step %d.', step, checkpoint.first_line(e), step)
    restored = False
  if not restored:
    batches.set_state({**batches.get_state(), 'next_step': int(step)})
  elif batches.step != step:
    raise WorkdirError(
        f'Checkpoint {step} in {workdir!r} holds a data state for step {batches.step}, not '
        f'{step}; the checkpoint is inconsistent. Move it away to resume from an older one.')


def _safe_item_names(ckpt: checkpoint.Checkpointer, step: int) -> list[str]:
  try:
    return ckpt.item_names(step)
  except Exception:  # pylint: disable=broad-except
    return []
