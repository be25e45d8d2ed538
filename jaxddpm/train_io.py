"""What the training loop writes and listens to: metrics files, progress, signals.

- `MetricWriter`: metrics.jsonl (one JSON object per log step) and TensorBoard
  events in the workdir, on process 0.
- `MetricLog`: the metrics of each train call, kept on the device until the loop
  fetches them, averaged over each log interval and written.
- `describe_run`, `log_finish`: the first and the last log lines of a run.
- `Progress`: a tqdm bar on a terminal, and a log line with the ETA at every
  log step whether or not there is one.
- `StopSignal`: records SIGTERM / SIGINT so the loop can save and stop at the
  next step boundary, on every process at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import contextlib
import threading
import time

from absl import logging
import jax
import numpy as np

from jaxddpm import factories
from jaxddpm import parallel


class MetricWriter:
  """metrics.jsonl + TensorBoard events in the workdir (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = tensorboardX.SummaryWriter(workdir)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': int(step), **metrics}) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def image(self, step: int, tag: str, grid: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, grid, int(step), dataformats='HWC')

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar on a terminal; a log line with the ETA at every log step in any case."""

  def __init__(self, start: int, total: int, enabled: bool):
    self._bar = None
    if enabled and sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)
    self.enabled = enabled
    self.total = total

  def advance(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def log(self, step: int, metrics: dict[str, float]) -> None:
    if self._bar is not None:
      self._bar.set_postfix(loss=f'{metrics["loss"]:.4f}', refresh=False)
    if self.enabled:
      eta = (self.total - step) / max(metrics['steps_per_sec'], 1e-9)
      logging.info('step %d/%d  loss %.5f  grad_norm %.3f  lr %.2e  %.2f steps/s  '
                   '%.1f images/s  ETA %s', step, self.total, metrics['loss'],
                   metrics['grad_norm'], metrics['lr'], metrics['steps_per_sec'],
                   metrics['images_per_sec'], _duration(eta))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class MetricLog:
  """The metrics of each train call, held on the device until the loop fetches them (a
  fetch syncs the host: the loop does it at log, save and stop steps only), then
  averaged over the log interval and written to the writer and the progress line."""

  def __init__(self, writer: MetricWriter, progress: Progress, step: int, batch_size: int):
    self._writer, self._progress, self._batch_size = writer, progress, batch_size
    self._pending = []
    self._time, self._step = time.perf_counter(), step
    self.last = None  # (mean loss, steps) of the last logged interval

  def add(self, first_step: int, metrics: dict[str, jax.Array]) -> None:
    """Metrics of the call that ran steps first_step + 1, ...: {name: [n]} device arrays."""
    self._pending.append((first_step, metrics))

  def fetch(self) -> tuple[list[int], dict[str, np.ndarray]]:
    """The metrics added since the last fetch: (steps, {name: [n] NumPy}) in step order."""
    steps, values = [], {}
    for first_step, metrics in self._pending:
      host = jax.device_get(metrics)
      n = len(next(iter(host.values())))
      steps.extend(range(first_step + 1, first_step + n + 1))
      for k, v in host.items():
        values.setdefault(k, []).append(np.asarray(v))
    self._pending = []
    return steps, {k: np.concatenate(v) for k, v in values.items()}

  def write(self, step: int, values: dict[str, np.ndarray]) -> None:
    """Writes the means over the steps since the last write, the last lr, and the speed."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    logged = {name: float(np.mean(v[-(step - self._step):]))
              for name, v in values.items() if name != 'finite'}
    logged['lr'] = float(values['lr'][-1])
    logged.update(steps_per_sec=rate, images_per_sec=rate * self._batch_size)
    self._writer.write(step, logged)
    self._progress.log(step, logged)
    self.last = (logged['loss'], step - self._step)
    self._time, self._step = now, step

  @contextlib.contextmanager
  def paused(self):
    """Sample grids and evaluations are not training: keep them out of steps/s and the ETA."""
    began = time.perf_counter()
    yield
    self._time += time.perf_counter() - began


def describe_run(config, num_params: int, num_images: int, workdir: str,
                 resumed: int | None) -> None:
  """The first log lines: what is trained, on what, from where."""
  devices = jax.devices()
  logging.info('Training %s: %s parameters, %d %s device(s) in %d process(es), global batch %d.',
               config.model.get('name', 'unet'), f'{num_params:,}', len(devices),
               devices[0].platform, jax.process_count(), int(config.training.batch_size))
  logging.info('Data: %s, split %r, %d images of %dx%dx%d.', config.data.dataset,
               config.data.split, num_images, int(config.data.image_size),
               *factories.image_shape(config)[1:])
  start = (f'resuming from checkpoint {resumed}' if resumed is not None
           else 'starting from step 0')
  logging.info('Workdir %s: %s, training to step %d. Logs: metrics.jsonl there; '
               'TensorBoard: pip install tensorboard && tensorboard --logdir %s', workdir,
               start, int(config.training.num_train_steps), workdir)


def log_finish(step: int, total: int, start_step: int, logged_loss) -> None:
  """The last log line: how far the run got and its last logged mean loss (`MetricLog.last`)."""
  if step == start_step:
    logging.info('Nothing to train: the workdir is at step %d and training.num_train_steps '
                 'is %d. Raise it to train longer.', step, total)
  elif logged_loss is None:
    logging.info('Finished at step %d (trained %d steps, fewer than training.log_every).',
                 step, step - start_step)
  else:
    logging.info('Finished at step %d: mean loss %.5f over the last %d steps.',
                 step, logged_loss[0], logged_loss[1])


def _duration(seconds: float) -> str:
  """12 s, 4 min 05 s, 3 h 07 min."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


class StopSignal:
  """Records SIGTERM/SIGINT; the loop saves a checkpoint at the next step boundary and stops."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    """Whether any process was signalled (all processes must stop at the same step)."""
    return parallel.any_process(self.signum is not None)
