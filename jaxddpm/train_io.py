"""What the training loop writes and listens to: metrics files, progress, signals.

- `MetricWriter`: metrics.jsonl (one JSON object per log step) and TensorBoard
  events in the workdir, on process 0.
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
import threading

from absl import logging
import numpy as np

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
