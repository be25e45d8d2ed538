"""The training loop: `train_and_evaluate(config, workdir)` drives the pure train step.

The step (`jaxddpm.train_step` over `factories.objective`) is jit-compiled once
per run over a mesh of every device of every process, the batch sharded on
'data', the state replicated and donated. Around it, each a named piece: checks
before any compute, setup (`_restore_or_init`, `_compile_step`), the loop
(`_loop`: steps, signals, the NaN check, the save policy `_Saves`, the sample-grid
and evaluation hooks of `jaxddpm.train_hooks`) and the finish. Writers, progress
and signals live in `jaxddpm.train_io`. A distillation round (`jaxddpm.distill`)
is the same run with a teacher, whose parameters initialise the student and are
a replicated, not donated, argument of the step. The batch of step k is a pure
function of (seed, k) and all randomness of step k comes from fold_in(state.rng,
k), so a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxddpm import checkpoint
from jaxddpm import config_utils
from jaxddpm import data as data_lib
from jaxddpm import distillation
from jaxddpm import factories
from jaxddpm import models
from jaxddpm import parallel
from jaxddpm import prompts
from jaxddpm import runtime
from jaxddpm import schedules
from jaxddpm import train_hooks
from jaxddpm import train_io
from jaxddpm import train_state
from jaxddpm import train_step
from jaxddpm import workdir as workdir_lib


class TrainError(Exception):
  """A run that cannot start or continue; the message says why. run_train.py exits 1 with it."""


class NonFiniteLossError(TrainError):
  """The loss became NaN or Inf; the run stopped without saving that state."""


class SaveError(TrainError):
  """Writing a checkpoint failed (e.g. a full disk); the message names the last good one.
  Orbax's threads of the failed save may still be unwinding, and an interpreter teardown
  under them prints pages of asyncio errors: run_train.py leaves with `os._exit`."""


def make_train_step(config, model, schedule: schedules.Schedule) -> Callable:
  """Returns train_steps(state, batches) -> (state, metrics) for config's denoising objective
  (`train_step.make_generic_train_step` over `factories.objective`)."""
  loss_fn, sampler = factories.objective(config, model, schedule)
  return train_step.make_generic_train_step(loss_fn, config.optim, timestep_sampler=sampler,
                                            frozen=train_state.has_frozen(config))


def make_distillation_step(config, model, schedule_: schedules.Schedule) -> Callable:
  """train_steps(state, batches, teacher_params) -> (state, metrics) of a distillation round.

  The student (config.diffusion.model_mean_type, 'v' or 'x0', in training mode) learns the
  teacher's two DDIM steps (`distillation.distillation_objective`); the teacher is the
  original run (distill.teacher_kind 'run': its own mean / variance types, x-hat clipped as
  config.sampling.clip_denoised) or the previous round's student ('student').
  """
  d = config.distill
  grid = factories.distillation_grid(config, schedule_)
  channels = int(config.data.channels)
  var_type = config.diffusion.model_var_type
  clip = bool(config.sampling.clip_denoised)

  def train_apply(params, x, t, cond, key):
    return models.make_model_fn(model, params, train=True, dropout_rng=key)(x, t, cond)

  def eval_apply(params, x, t, cond, key=None):
    del key
    return models.make_model_fn(model, params)(x, t, cond)

  student = distillation.student_x_hat(
      train_apply, grid, mean_type=config.diffusion.model_mean_type, channels=channels,
      var_type=var_type)
  if d.teacher_kind == 'run':
    teacher = distillation.run_x_hat(eval_apply, schedule_, grid, mean_type=d.teacher_mean_type,
                                     var_type=d.teacher_var_type, clip=clip)
  else:
    teacher = distillation.student_x_hat(eval_apply, grid, mean_type=d.teacher_mean_type,
                                         channels=channels, var_type=var_type, clip=clip)
  loss_fn = distillation.distillation_objective(
      student, teacher, grid, int(d.round_steps), weighting=d.weighting,
      cond_spec=model.config.cond_spec())
  return train_step.make_teacher_train_step(loss_fn, config.optim)


evaluate = train_hooks.evaluate  # evaluation during training, with the EMA parameters
sample_grid = train_hooks.sample_grid


# ---------------------------------------------------------------------------
# Checks before any compute, and setup.


def check_config(config) -> None:
  """Raises TrainError for a config that cannot train, before any compute.

  `config_utils.validate_config` checks the config on its own; this adds what
  depends on the machine (devices, processes) and on the training loop.
  """
  try:
    config_utils.validate_config(config)
  except ValueError as e:
    raise TrainError(f'Bad config: {e}') from e
  batch = int(config.training.batch_size)
  devices = jax.device_count()
  if batch % devices:
    raise TrainError(
        f'training.batch_size={batch} (global) is not divisible by the {devices} devices; '
        f'use a multiple of {devices}.')
  processes = jax.process_count()
  if batch % processes:
    raise TrainError(
        f'training.batch_size={batch} (global) is not divisible by the {processes} processes.')
  if int(config.training.log_every) <= 0:
    raise TrainError('training.log_every must be positive.')
  if int(config.training.sample_every) > 0 and int(config.training.num_sample_grid) <= 0:
    raise TrainError('training.num_sample_grid must be positive when sample_every > 0.')


def _untouched(message: str, workdir: str) -> str:
  steps = checkpoint.saved_steps(workdir)
  return (f'{message} The checkpoints are untouched (newest: step {steps[-1]}).' if steps
          else message)


@contextlib.contextmanager
def _as_train_error(*errors: type[Exception], workdir: str | None = None):
  """Re-raises `errors` as TrainError with their message; given `workdir`, the message adds
  that its checkpoints are untouched (for failures after checkpoints may exist)."""
  try:
    yield
  except errors as e:
    raise TrainError(str(e) if workdir is None else _untouched(str(e), workdir)) from e


def _state_init(config, model, mesh, teacher=None, pretrained=None
                ) -> tuple[Callable, train_state.TrainState]:
  """The jitted initialiser of a fresh TrainState (born replicated; from the teacher's
  parameters when given, with the `pretrained` subtrees) and its abstract state."""
  replicated = parallel.replicated(mesh)
  # Initialisation runs once: compiling it with less LLVM optimisation saves
  # more time than its execution loses.
  init_jit = jax.jit(lambda key, params, pre: train_state.create_train_state(
      config, model, key, params, pretrained=pre),
      out_shardings=replicated, compiler_options=models.INIT_COMPILER_OPTIONS)
  init_fn = lambda key: init_jit(key, teacher, pretrained)  # arguments, not constants
  abstract = jax.eval_shape(init_jit, jax.random.PRNGKey(int(config.seed)), teacher, pretrained)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  return init_fn, abstract


def _restore_or_init(config, workdir: str, batches, ckpt: checkpoint.Checkpointer, init_fn,
                     abstract) -> tuple[train_state.TrainState, int | None]:
  """The newest good checkpoint's state (`batches` moved to its step) or a fresh one, and the
  restored step (None: fresh). Also writes config.json (process 0)."""
  with _as_train_error(workdir_lib.WorkdirError):
    restored = workdir_lib.restore_newest(ckpt, abstract, workdir, batches)
  resumed = None if restored is None else restored[0]
  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
  train_io.describe_run(config, num_params, len(batches.pipeline.source), workdir, resumed)
  state = init_fn(jax.random.PRNGKey(int(config.seed))) if restored is None else restored[1]
  if parallel.is_main_process():
    with _as_train_error(workdir_lib.WorkdirError, workdir=workdir):
      workdir_lib.write_config(workdir, config)
  return state, resumed


def _compile_step(config, model, schedule, mesh, teacher=None) -> tuple[Callable, list[int]]:
  """`make_train_step` (or, with a teacher, the distillation step) jitted over the mesh,
  as step_fn(state, batches), and the count of its traces (1 expected)."""
  traces = [0]
  if teacher is None:
    train_steps = make_train_step(config, model, schedule)
    teacher_steps = lambda state, batches, _: train_steps(state, batches)
  else:
    teacher_steps = make_distillation_step(config, model, schedule)

  def counted(state, batches, teacher_params):
    traces[0] += 1  # runs at trace time only
    return teacher_steps(state, batches, teacher_params)

  replicated = parallel.replicated(mesh)
  # The state is donated: its buffers are reused for the new state.
  step_fn = jax.jit(counted, in_shardings=(
      replicated, parallel.data_sharding(mesh, batch_axis=1), replicated),
                    out_shardings=(replicated, replicated), donate_argnums=(0,),
                    compiler_options=runtime.step_compiler_options())
  if teacher is not None:
    teacher = jax.device_put(teacher, replicated)
  return (lambda state, batches: step_fn(state, batches, teacher)), traces


# ---------------------------------------------------------------------------
# The loop and its policies.


def _steps_per_call(config, start_step: int) -> int:
  """config.training.steps_per_call, reduced so that calls end exactly on every
  log/checkpoint/sample/eval step and on num_train_steps (one compilation)."""
  k = max(1, int(config.training.steps_per_call))
  t = config.training
  for every in (t.log_every, t.checkpoint_every, t.sample_every, t.eval_every,
                t.num_train_steps, start_step):
    if int(every) > 0:
      k = math.gcd(k, int(every))
  return k


def _kept(last_saved: int | None) -> str:
  return (f'the last checkpoint (step {last_saved}) is intact' if last_saved is not None
          else 'no checkpoint was written')


def _first_bad_step(steps: list[int], values: dict[str, np.ndarray], last_saved: int | None) -> None:
  """Raises NonFiniteLossError at the first step whose loss, gradient or new parameters
  are not finite; nothing of that state is saved."""
  bad = values['finite'] < 0.5
  if not bad.any():
    return
  i = int(np.argmax(bad))
  if not np.isfinite(values['loss'][i]):
    what = f'Loss is {values["loss"][i]} at step {steps[i]}'
  elif not np.isfinite(values['grad_norm'][i]):
    what = f'The gradient norm is {values["grad_norm"][i]} at step {steps[i]}'
  else:
    what = f'The update of step {steps[i]} made the parameters non-finite'
  raise NonFiniteLossError(
      f'{what}; training stopped without saving it and {_kept(last_saved)}. '
      'Try a lower optim.lr, a stronger optim.grad_clip or float32 compute.')


class _Saves:
  """The save policy: only finite states reach disk, and a failed save (at once or in
  Orbax's background) becomes a SaveError naming the last good checkpoint."""

  def __init__(self, ckpt: checkpoint.Checkpointer, workdir: str, last_saved: int | None,
               batches: data_lib.BatchIterator):
    self._ckpt, self._workdir, self._batches = ckpt, workdir, batches
    self.last_saved = last_saved  # the newest checkpoint saved or restored
    self._saving = None  # the newest save this run started

  @contextlib.contextmanager
  def _reported(self):
    try:
      yield
    except checkpoint.CheckpointError as e:
      good = checkpoint.saved_steps(self._workdir)
      raise SaveError(
          f'Checkpoint {self._saving}: {e}. The last good checkpoint is '
          + (f'step {good[-1]}' if good else 'none') + '; free the space (or fix the cause) '
          'and rerun the same command to resume from it.') from e

  def check(self) -> None:
    """Raises a failed background save."""
    with self._reported():
      self._ckpt.check_for_errors()

  def save(self, step: int, state: train_state.TrainState) -> None:
    """Saves a finite state; a non-finite one (e.g. NaN in the Adam moments) never reaches disk."""
    with self._reported():
      bad = checkpoint.nonfinite_values(state)
      if bad:
        raise NonFiniteLossError(
            f'The state at step {step} holds non-finite values '
            f'({checkpoint.describe_nonfinite(bad)}); it was not saved and '
            f'{_kept(self.last_saved)}.')
      self._ckpt.save(step, state, force=True, data=self._batches)
    self.last_saved = self._saving = step

  def finish(self, step: int, state: train_state.TrainState, *, stopped: bool) -> None:
    """Saves the last step (unless saved, or a signal stopped the run) and waits for all saves."""
    with self._reported():
      if step not in self._ckpt.all_steps() and not stopped:
        self.save(step, state)
      self._ckpt.wait()


class _Run(NamedTuple):
  """What the loop runs with, built once before the first step."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: Any
  schedule: schedules.Schedule
  step_fn: Callable  # (state, batches) -> (state, metrics); donates the state
  batches: Iterator[dict[str, Any]]
  writer: train_io.MetricWriter
  progress: train_io.Progress
  log: train_io.MetricLog
  saves: _Saves


def _loop(run: _Run, state: train_state.TrainState,
          step: int) -> tuple[train_state.TrainState, int, int | None]:
  """Trains from `step` to training.num_train_steps; returns (state, step, stopped_by).

  Each call runs `_steps_per_call` steps; at log and checkpoint steps the metrics are
  checked (and logged) and the state saved. SIGTERM / SIGINT save and stop at the next
  call boundary, every process at the same step; stopped_by is the signal number or None.
  """
  t = run.config.training
  total = int(t.num_train_steps)
  k = _steps_per_call(run.config, step)
  with train_io.StopSignal() as stop:
    while step < total:
      run.saves.check()  # a failed background save surfaces here, at once
      n = min(k, total - step)
      host = data_lib.stack_batches([next(run.batches) for _ in range(n)])
      state, metrics = run.step_fn(state, parallel.host_to_global(host, run.mesh, batch_axis=1))
      run.log.add(step, metrics)
      before, step = step, step + n
      run.progress.advance(n)

      log_now = train_hooks.crossed(before, step, int(t.log_every))
      save_now = train_hooks.crossed(before, step, int(t.checkpoint_every)) or step == total
      # Across processes, asking costs a host sync; do it where the loop syncs anyway.
      stop_now = (jax.process_count() == 1 or log_now or save_now) and stop.requested()
      if log_now or save_now or stop_now:
        steps, values = run.log.fetch()
        _first_bad_step(steps, values, run.saves.last_saved)
        if log_now:
          run.log.write(step, values)
      if save_now or stop_now:
        run.saves.save(step, state)
      with run.log.paused():
        train_hooks.run_hooks(run, state, before, step)
      if stop_now:
        logging.warning('Stopped by signal at step %d; checkpoint saved.', step)
        return state, step, stop.signum if stop.signum is not None else signal.SIGTERM
  return state, step, None


# ---------------------------------------------------------------------------
# The run: checks, setup, loop, finish.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       teacher: Any = None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint.

  teacher: for a distillation round (`jaxddpm.distill`), the teacher's parameters (host
  arrays): they initialise a fresh state and teach in `make_distillation_step`.

  Returns a summary: {'step': last step, 'loss': mean loss of the last logged
  interval (None when no step ran), 'trained_steps': steps run by this call,
  'train_step_traces': times the train step was traced (1), 'stopped_by':
  signal number or None}.

  Raises:
    TrainError: the config or workdir cannot work (before any compute), the
      workdir is locked by another run, no checkpoint can be resumed, a save
      failed, or training diverged (`NonFiniteLossError`).
  """
  if not str(workdir).strip():
    raise TrainError('workdir is empty; name the run directory, e.g. --workdir=runs/NAME.')
  workdir = os.path.abspath(workdir)
  check_config(config)
  with _as_train_error(data_lib.DatasetError, prompts.PromptError):
    # A text run's tokenizer: the workdir's (resumed), else built from the captions.
    config, tokenizer, pretrained = prompts.prepare_text(config, workdir, lambda: data_lib.captions(
        data_lib.create_source(config.data, split=config.data.split)))
    pipeline = data_lib.create_train_pipeline(
        config, process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=tokenizer)
  with _as_train_error(workdir_lib.WorkdirError):
    workdir_lib.check_writable(workdir)
  with _as_train_error(workdir_lib.WorkdirError, workdir=workdir):
    lock = workdir_lib.lock(workdir)
  try:
    if parallel.is_main_process():
      with _as_train_error(prompts.PromptError):
        prompts.save_tokenizer(config, workdir, tokenizer)
    with _as_train_error(workdir_lib.WorkdirError):
      workdir_lib.check_compatible(config, workdir,
                                   has_checkpoints=bool(checkpoint.saved_steps(workdir)))
    return _train(config, workdir, pipeline, teacher, pretrained)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir: str, pipeline, teacher, pretrained=None) -> dict[str, Any]:
  """Setup, `_loop` and the finish on a locked, checked workdir; the summary."""
  main = parallel.is_main_process()
  mesh = parallel.make_mesh()
  model, schedule = factories.create_model(config), factories.schedule(config)
  init_fn, abstract = _state_init(config, model, mesh, teacher, pretrained)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                 keep=int(config.training.keep_checkpoints))
  total = int(config.training.num_train_steps)
  writer = progress = None
  batches = pipeline.iterate(0)  # its workers start at the first batch, at the restored step
  try:
    state, resumed = _restore_or_init(config, workdir, batches, ckpt, init_fn, abstract)
    start = int(jax.device_get(state.step))
    step_fn, traces = _compile_step(config, model, schedule, mesh, teacher)
    writer = train_io.MetricWriter(workdir, main)
    progress = train_io.Progress(start, total, main)
    log = train_io.MetricLog(writer, progress, start, int(config.training.batch_size))
    saves = _Saves(ckpt, workdir, resumed, batches)
    run = _Run(config, workdir, mesh, model, schedule, step_fn, batches, writer, progress,
               log, saves)
    state, step, stopped_by = _loop(run, state, start)
    steps, values = log.fetch()  # the steps after the last log or save
    if steps:
      _first_bad_step(steps, values, saves.last_saved)
    saves.finish(step, state, stopped=stopped_by is not None)
    if traces[0] > 1:
      logging.warning('The train step was traced %d times (expected once).', traces[0])
    train_io.log_finish(step, total, start, log.last)
    return {'step': step, 'loss': None if log.last is None else log.last[0],
            'trained_steps': step - start, 'train_step_traces': traces[0],
            'stopped_by': stopped_by}
  finally:
    _close(batches, ckpt, writer, progress)


def _close(batches, ckpt: checkpoint.Checkpointer, writer, progress) -> None:
  """Stops Grain's threads and workers and closes the checkpointer and writers, on any exit."""
  batches.close()
  try:
    ckpt.close()
  except checkpoint.CheckpointError as e:
    # Already reported by `_Saves.finish`, or another error is on its way out.
    logging.warning('While closing the checkpointer: %s', e)
  if writer is not None:
    writer.close()
  if progress is not None:
    progress.close()
