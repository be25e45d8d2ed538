"""Training: the train state, the pure train step, and the loop that drives it.

The core is `make_generic_train_step(loss_fn, ...)`: a pure function (state,
batches) -> (state, metrics) running `steps_per_call` optimizer steps of any
objective (`jaxddpm.objectives`) with `lax.scan`; `make_train_step` gives it
the config's denoising objective. It is
jit-compiled once per run over a mesh of every device of every process, the
batch sharded on 'data', the state replicated and donated.

Per step (DDPM Algorithm 1, Ho et al. 2020):

  t ~ Uniform{0..T-1} (or IDDPM's importance sampling), eps ~ N(0, I),
  loss = mean_b w(t_b) L(x_0, t, eps)  (`objectives.denoising_objective`: L_simple,
    L_vlb or hybrid, weighted uniformly, by Min-SNR-gamma or by an SNR weighting),
  g = clip_by_global_norm(grad loss),  params <- Adam(g, lr_k),
  lr_k = lr * min(1, k / warmup_steps)  (Appendix B: linear warmup),
  ema <- decay * ema + (1 - decay) * params  (`optax.incremental_update`).

All randomness of step k comes from fold_in(state.rng, k) and the batch of
step k is a pure function of (seed, k) (see `jaxddpm.data`), so a run resumed
from a checkpoint reproduces the uninterrupted run bit for bit, and the same
run on 1 or N devices agrees to float32 rounding (threefry draws do not depend
on the sharding).

`train_and_evaluate(config, workdir)` is the shell around it: checks, data,
checkpoints (resume, periodic, on SIGTERM/SIGINT, final), logging
(config.json, metrics.jsonl, TensorBoard, progress), sample grids and the
evaluation hook.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxddpm import checkpoint
from jaxddpm import config_utils
from jaxddpm import data as data_lib
from jaxddpm import evaluation
from jaxddpm import images as images_lib
from jaxddpm import models
from jaxddpm import objectives
from jaxddpm import parallel
from jaxddpm import runtime
from jaxddpm import sample
from jaxddpm import schedules
from jaxddpm import timesteps
from jaxddpm import train_io
from jaxddpm import train_state
from jaxddpm import workdir as workdir_lib
from jaxddpm import factories

PyTree = Any


class TrainError(Exception):
  """A run that cannot start or continue; the message says why. run_train.py exits 1 with it."""


class NonFiniteLossError(TrainError):
  """The loss became NaN or Inf; the run stopped without saving that state."""


class SaveError(TrainError):
  """Writing a checkpoint failed (e.g. a full disk); the message names the last good one.

  Orbax's background threads of the failed save may still be unwinding, and
  an interpreter teardown under them prints pages of asyncio errors, so
  run_train.py leaves with `os._exit` after reporting it.
  """


# ---------------------------------------------------------------------------
# The pure train step.


def make_objective(config, model, schedule: schedules.Schedule):
  """config.diffusion's denoising objective for `model`: (loss_fn, timestep_sampler).

  Conditioning dropout (e.g. labels to the null class with probability
  config.model.class_dropout, for classifier-free guidance) follows the model's
  `cond_spec()`.
  """
  def apply_fn(params, x_t, t, cond, key):
    return models.make_model_fn(model, params, train=True, dropout_rng=key)(x_t, t, cond)

  d = config.diffusion
  num_timesteps = schedule.num_timesteps
  sampler = (timesteps.loss_aware_timesteps(num_timesteps) if d.timestep_sampler == 'loss_aware'
             else timesteps.uniform_timesteps(num_timesteps))
  loss_fn = objectives.denoising_objective(
      apply_fn, schedule, **factories.diffusion_types(config),
      weighting=d.get('weighting', 'uniform'), min_snr_gamma=float(d.get('min_snr_gamma', 5.0)),
      timestep_sampler=sampler, cond_spec=model.config.cond_spec())
  return loss_fn, sampler


def make_train_step(config, model, schedule: schedules.Schedule) -> Callable:
  """Returns train_steps(state, batches) -> (state, metrics) for config's denoising objective."""
  loss_fn, sampler = make_objective(config, model, schedule)
  return make_generic_train_step(loss_fn, config.optim, timestep_sampler=sampler)


def make_generic_train_step(loss_fn, optim_config, *,
                            timestep_sampler: timesteps.TimestepSampler | None = None
                            ) -> Callable:
  """Returns train_steps(state, batches) -> (state, metrics), pure and jit-able, for any
  objective `loss_fn(params, batch, key, timestep_state) -> (loss, metrics)`.

  Per step k (DDPM Algorithm 1 for the denoising objective):
    key = fold_in(state.rng, k), (loss, metrics), g = value_and_grad(loss_fn)(params, batch, key),
    g = clip_by_global_norm(g), params <- Adam(g, lr_k), ema <- decay ema + (1 - decay) params
  and the timestep sampler's state is updated with the step's per-example losses.

  Args of the returned function:
    state: train_state.TrainState.
    batches: {'x': float32 [k, B, ...] in [-1, 1], 'cond': {key: [k, B, ...]}} (the
      conditioning pytree, e.g. {'label': int32 [k, B]}; {} when unconditional): the
      batches of k consecutive steps.

  Returns:
    The state after k steps, and metrics: dict of float32 [k] (the objective's scalar metrics,
    e.g. loss, mse and vb; grad_norm, lr, and finite: 1 when the loss, the gradient norm and the
    updated parameters are all finite), one entry per step.
  """
  tx = train_state.make_optimizer(optim_config)
  lr_schedule = train_state.learning_rate_schedule(optim_config)
  ema_decay = float(optim_config.ema_decay)

  def one_step(state: train_state.TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, state.timestep_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    timestep_state = state.timestep_state
    if timestep_sampler is not None and timestep_state is not None:
      timestep_state = timestep_sampler.update(timestep_state, aux['_t'], aux['_loss'])
    grad_norm = optax.tree.norm(grads)
    # The loss of step k is computed before its update, so a bad update shows only in the
    # new parameters; `finite` lets the loop refuse to save (or continue from) such a state.
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {k: v for k, v in aux.items() if not k.startswith('_')}
    metrics.update(
        grad_norm=grad_norm,
        lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
        finite=(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite).astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, timestep_state=timestep_state)
    return new_state, metrics

  def train_steps(state: train_state.TrainState, batches):
    if jax.tree.leaves(batches)[0].shape[0] == 1:
      # A single step needs no loop.
      state, metrics = one_step(state, jax.tree.map(lambda b: b[0], batches))
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(one_step, state, batches)

  return train_steps


# ---------------------------------------------------------------------------
# Sample grids and the evaluation hook.


def sample_grid(config, params, mesh) -> np.ndarray:
  """The training grid: float32 [N, H, W, C] in [-1, 1], N = config.training.num_sample_grid.

  `sample.generate` with config.sampling.train_grid_sampler / train_grid_steps (DDIM by
  default) and the run's seed, so every grid of a run starts from the same noise. All
  processes must call it (the parameters are global arrays).
  """
  num = int(config.training.num_sample_grid)
  return sample.generate(
      config, params, num_samples=num, batch_size=num,
      sampler=config.sampling.train_grid_sampler,
      steps=min(int(config.sampling.train_grid_steps), int(config.diffusion.num_timesteps)),
      mesh=mesh)['samples']


def evaluate(config, model, schedule: schedules.Schedule, state: train_state.TrainState, mesh,
             workdir: str | None = None) -> dict[str, float]:
  """Evaluation during training, every config.training.eval_every steps.

  Held-out bits/dim and sample-quality metrics (FID / IS / KID: the digits
  classifier for digits, Inception when config.eval.inception_weights is set),
  computed with the EMA parameters; see `evaluation.training_metrics`.
  Returns {name: value}; the loop writes them to metrics.jsonl and TensorBoard
  under 'eval/<name>'. All processes call it.
  """
  return evaluation.training_metrics(config, model, schedule, state.ema_params, mesh,
                                     step=int(jax.device_get(state.step)), workdir=workdir)


# ---------------------------------------------------------------------------
# Checks before any compute.


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


# ---------------------------------------------------------------------------
# The loop.


def _crossed(before: int, after: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (before, after]."""
  return every > 0 and after // every > before // every


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


def _host_metrics(pending: list[tuple[int, dict[str, jax.Array]]]) -> tuple[list[int], dict[str, np.ndarray]]:
  """Device metrics of past calls -> (steps, {name: [n] NumPy}) in step order."""
  steps, values = [], {}
  for first_step, metrics in pending:
    host = jax.device_get(metrics)
    n = len(next(iter(host.values())))
    steps.extend(range(first_step + 1, first_step + n + 1))
    for k, v in host.items():
      values.setdefault(k, []).append(np.asarray(v))
  return steps, {k: np.concatenate(v) for k, v in values.items()}


def _first_bad_step(steps: list[int], values: dict[str, np.ndarray], last_saved: int | None) -> None:
  """Raises NonFiniteLossError at the first step whose loss, gradient or new parameters
  are not finite; nothing of that state is saved."""
  bad = values['finite'] < 0.5
  if not bad.any():
    return
  i = int(np.argmax(bad))
  kept = (f'the last checkpoint (step {last_saved}) is intact' if last_saved is not None
          else 'no checkpoint was written')
  if not np.isfinite(values['loss'][i]):
    what = f'Loss is {values["loss"][i]} at step {steps[i]}'
  elif not np.isfinite(values['grad_norm'][i]):
    what = f'The gradient norm is {values["grad_norm"][i]} at step {steps[i]}'
  else:
    what = f'The update of step {steps[i]} made the parameters non-finite'
  raise NonFiniteLossError(
      f'{what}; training stopped without saving it and {kept}. '
      'Try a lower optim.lr, a stronger optim.grad_clip or float32 compute.')


def _describe_run(config, abstract: train_state.TrainState, pipeline, workdir: str,
                  resumed: int | None) -> None:
  """The first log lines: what is trained, on what, from where."""
  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
  devices = jax.devices()
  logging.info('Training %s: %s parameters, %d %s device(s) in %d process(es), global batch %d.',
               config.model.get('name', 'unet'), f'{num_params:,}', len(devices),
               devices[0].platform, jax.process_count(), int(config.training.batch_size))
  logging.info('Data: %s, split %r, %d images of %dx%dx%d.', config.data.dataset,
               config.data.split, len(pipeline.source), int(config.data.image_size),
               int(config.data.image_size), int(config.data.channels))
  start = (f'resuming from checkpoint {resumed}' if resumed is not None
           else 'starting from step 0')
  logging.info('Workdir %s: %s, training to step %d. Logs: metrics.jsonl there; '
               'TensorBoard: pip install tensorboard && tensorboard --logdir %s', workdir,
               start, int(config.training.num_train_steps), workdir)


def _evaluate_and_log(config, model, schedule, state, mesh, workdir, writer, step) -> None:
  logging.info('Evaluating at step %d (held-out bits/dim, %d samples for FID-style metrics)...',
               step, int(config.eval.num_samples))
  began = time.perf_counter()
  results = evaluate(config, model, schedule, state, mesh, workdir)
  figures = ', '.join(f'{name} {value:.4g}' for name, value in sorted(results.items()))
  logging.info('Evaluation at step %d took %.0f s: %s.', step, time.perf_counter() - began,
               figures or 'no metric applies to this config')
  if results:
    writer.write(step, {f'eval/{name}': float(v) for name, v in results.items()})


def _save(ckpt: checkpoint.Checkpointer, step: int, state: train_state.TrainState,
          last_saved: int | None) -> None:
  """Saves a finite state; a non-finite one (e.g. NaN in the Adam moments) never reaches disk."""
  bad = checkpoint.nonfinite_values(state)
  if bad:
    kept = (f'the last checkpoint (step {last_saved}) is intact' if last_saved is not None
            else 'no checkpoint was written')
    raise NonFiniteLossError(
        f'The state at step {step} holds non-finite values ({checkpoint.describe_nonfinite(bad)}); '
        f'it was not saved and {kept}.')
  ckpt.save(step, state, force=True)


def _untouched(message: str, workdir: str) -> str:
  steps = checkpoint.saved_steps(workdir)
  if not steps:
    return message
  return f'{message} The checkpoints are untouched (newest: step {steps[-1]}).'


def _save_failed(error: checkpoint.CheckpointError, step: int | None, workdir: str) -> SaveError:
  good = checkpoint.saved_steps(workdir)
  return SaveError(
      f'Checkpoint {step}: {error}. The last good checkpoint is '
      + (f'step {good[-1]}' if good else 'none') + '; free the space (or fix the cause) and '
      'rerun the same command to resume from it.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint.

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
  try:
    pipeline = data_lib.create_train_pipeline(
        config, process_index=jax.process_index(), process_count=jax.process_count())
  except data_lib.DatasetError as e:
    raise TrainError(str(e)) from e
  try:
    workdir_lib.check_writable(workdir)
  except workdir_lib.WorkdirError as e:
    raise TrainError(str(e)) from e
  try:
    lock = workdir_lib.lock(workdir)
  except workdir_lib.WorkdirError as e:
    raise TrainError(_untouched(str(e), workdir)) from e
  try:
    return _train_locked(config, workdir, pipeline)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(config, workdir: str, pipeline) -> dict[str, Any]:
  try:
    workdir_lib.check_compatible(config, workdir,
                                 has_checkpoints=bool(checkpoint.saved_steps(workdir)))
  except workdir_lib.WorkdirError as e:
    raise TrainError(str(e)) from e
  main = parallel.is_main_process()
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  model = factories.create_model(config)
  schedule = factories.schedule(config)
  # Initialisation runs once: compiling it with less LLVM optimisation saves
  # more time than its execution loses.
  init_fn = jax.jit(lambda key: train_state.create_train_state(config, model, key),
                    out_shardings=replicated, compiler_options=models.INIT_COMPILER_OPTIONS)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(int(config.seed)))
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)

  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                 keep=int(config.training.keep_checkpoints))
  writer = progress = batches = None
  try:
    try:
      restored = workdir_lib.restore_newest(ckpt, abstract, workdir)
    except workdir_lib.WorkdirError as e:
      raise TrainError(str(e)) from e
    latest = None if restored is None else restored[0]
    _describe_run(config, abstract, pipeline, workdir, latest)
    state = init_fn(jax.random.PRNGKey(int(config.seed))) if restored is None else restored[1]
    if main:
      try:
        workdir_lib.write_config(workdir, config)
      except workdir_lib.WorkdirError as e:
        raise TrainError(_untouched(str(e), workdir)) from e

    step = int(jax.device_get(state.step))
    total = int(config.training.num_train_steps)
    k = _steps_per_call(config, step)
    traces = [0]
    train_steps = make_train_step(config, model, schedule)

    def counted(state, batches):
      traces[0] += 1  # runs at trace time only
      return train_steps(state, batches)

    # The state is donated: its buffers are reused for the new state.
    step_fn = jax.jit(
        counted,
        in_shardings=(replicated, parallel.data_sharding(mesh, batch_axis=1)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=runtime.step_compiler_options())

    writer = train_io.MetricWriter(workdir, main)
    progress = train_io.Progress(step, total, main)
    t = config.training
    start_step = step
    last_saved, saving = latest, None
    logged_loss = None
    pending = []
    log_time, log_step = time.perf_counter(), step
    batches = pipeline.iterate(step)
    stopped_by = None
    with train_io.StopSignal() as stop:
      while step < total:
        try:
          ckpt.check_for_errors()  # a failed background save surfaces here, at once
        except checkpoint.CheckpointError as e:
          raise _save_failed(e, saving, workdir) from e
        n = min(k, total - step)
        host = data_lib.stack_batches([next(batches) for _ in range(n)])
        state, metrics = step_fn(state, parallel.host_to_global(host, mesh, batch_axis=1))
        pending.append((step, metrics))
        before, step = step, step + n
        progress.advance(n)

        log_now = _crossed(before, step, int(t.log_every))
        save_now = _crossed(before, step, int(t.checkpoint_every)) or step == total
        # Across processes, asking costs a host sync; do it where the loop syncs anyway.
        stop_now = ((jax.process_count() == 1 or log_now or save_now)
                    and stop.requested())
        if log_now or save_now or stop_now:
          steps, values = _host_metrics(pending)
          pending = []
          _first_bad_step(steps, values, last_saved)
          if log_now:
            now = time.perf_counter()
            rate = (step - log_step) / max(now - log_time, 1e-9)
            logged = {name: float(np.mean(v[-(step - log_step):]))
                      for name, v in values.items() if name != 'finite'}
            logged['lr'] = float(values['lr'][-1])
            logged.update(steps_per_sec=rate, images_per_sec=rate * int(t.batch_size))
            writer.write(step, logged)
            progress.log(step, logged)
            logged_loss = (logged['loss'], step - log_step)
            log_time, log_step = now, step
        if save_now or stop_now:
          try:
            _save(ckpt, step, state, last_saved)
          except checkpoint.CheckpointError as e:
            raise _save_failed(e, saving, workdir) from e
          last_saved = saving = step
        paused = time.perf_counter()
        if _crossed(before, step, int(t.sample_every)):
          images = sample_grid(config, state.ema_params, mesh)
          if main:
            os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
            grid = images_lib.image_grid(images)
            images_lib.save_png(grid, os.path.join(workdir, 'samples', f'step_{step:06d}.png'))
            writer.image(step, 'samples', grid)
        if _crossed(before, step, int(t.eval_every)):
          _evaluate_and_log(config, model, schedule, state, mesh, workdir, writer, step)
        # Sample grids and evaluations are not training: keep them out of steps/s and the ETA.
        log_time += time.perf_counter() - paused
        if stop_now:
          stopped_by = stop.signum if stop.signum is not None else signal.SIGTERM
          logging.warning('Stopped by signal at step %d; checkpoint saved.', step)
          break
    if pending:
      steps, values = _host_metrics(pending)
      _first_bad_step(steps, values, last_saved)
    try:
      if step not in ckpt.all_steps() and stopped_by is None:
        _save(ckpt, step, state, last_saved)
        saving = step
      ckpt.wait()
    except checkpoint.CheckpointError as e:
      raise _save_failed(e, saving, workdir) from e
    if traces[0] > 1:
      logging.warning('The train step was traced %d times (expected once).', traces[0])
    _log_finish(step, total, start_step, logged_loss)
    return {'step': step, 'loss': None if logged_loss is None else logged_loss[0],
            'trained_steps': step - start_step, 'train_step_traces': traces[0],
            'stopped_by': stopped_by}
  finally:
    if batches is not None:
      batches.close()  # stops the prefetching threads
    try:
      ckpt.close()
    except checkpoint.CheckpointError as e:
      # Already reported by ckpt.wait() above, or another error is on its way out.
      logging.warning('While closing the checkpointer: %s', e)
    if writer is not None:
      writer.close()
    if progress is not None:
      progress.close()


def _log_finish(step: int, total: int, start_step: int, logged_loss) -> None:
  if step == start_step:
    logging.info('Nothing to train: the workdir is at step %d and training.num_train_steps '
                 'is %d. Raise it to train longer.', step, total)
  elif logged_loss is None:
    logging.info('Finished at step %d (trained %d steps, fewer than training.log_every).',
                 step, step - start_step)
  else:
    logging.info('Finished at step %d: mean loss %.5f over the last %d steps.',
                 step, logged_loss[0], logged_loss[1])
