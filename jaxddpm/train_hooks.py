"""What the training loop does between steps: the sample grids and the evaluation.

Both sample with the EMA parameters through `jaxddpm.sample.generate`, the package's one
sampling loop, and every process calls them (the parameters are global arrays).
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
import numpy as np

from jaxddpm import evaluation
from jaxddpm import images as images_lib
from jaxddpm import parallel
from jaxddpm import sample
from jaxddpm import schedules
from jaxddpm import train_state
from jaxddpm.evaluation import superres as sr_eval


def crossed(before: int, after: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (before, after]."""
  return every > 0 and after // every > before // every


def sample_grid(config, params, mesh) -> np.ndarray:
  """The training grid: float32 [N, H, W, C] in [-1, 1], N = config.training.num_sample_grid.

  `sample.generate` with config.sampling.train_grid_sampler / train_grid_steps (DDIM by
  default) and the run's seed, so every grid of a run starts from the same noise. All
  processes must call it (the parameters are global arrays).
  """
  num = int(config.training.num_sample_grid)
  low_res = None
  if int(config.data.get('low_res_size', 0)):  # upscale the first held-out low-res inputs
    low_res = sr_eval.held_out_pairs(config, num)[1]
    num = len(low_res)
  return sample.generate(
      config, params, num_samples=num, batch_size=num,
      sampler=config.sampling.train_grid_sampler,
      steps=min(int(config.sampling.train_grid_steps), int(config.diffusion.num_timesteps)),
      mesh=mesh, low_res=low_res)['samples']


def evaluate(config, model, schedule: schedules.Schedule, state: train_state.TrainState, mesh,
             workdir: str | None = None) -> dict[str, float]:
  """Evaluation during training (every config.training.eval_every steps) with the EMA params:
  `evaluation.training_metrics` (held-out bits/dim, FID / IS / KID) sampling through
  `sample.generate`. Returns {name: value}, logged as 'eval/<name>'. All processes call it."""
  params = state.ema_params

  def sample_fn(num_samples, key, low_res=None):
    # config.sampling's solver, through the package's one sampling loop.
    return sample.generate(config, params, num_samples=num_samples, key=key,
                           mesh=mesh, low_res=low_res)['samples']

  return evaluation.training_metrics(config, model, schedule, params, mesh,
                                     step=int(jax.device_get(state.step)),
                                     sample_fn=sample_fn, workdir=workdir)




def run_hooks(run, state: train_state.TrainState, before: int, step: int) -> None:
  """The sample grid and the evaluation due in (before, step], with the EMA parameters."""
  config = run.config
  if crossed(before, step, int(config.training.sample_every)):
    images = sample_grid(config, state.ema_params, run.mesh)
    if parallel.is_main_process():
      os.makedirs(os.path.join(run.workdir, 'samples'), exist_ok=True)
      grid = images_lib.image_grid(images)
      images_lib.save_png(grid, os.path.join(run.workdir, 'samples', f'step_{step:06d}.png'))
      run.writer.image(step, 'samples', grid)
  if crossed(before, step, int(config.training.eval_every)):
    logging.info('Evaluating at step %d (held-out bits/dim, %d samples for FID-style metrics)...',
                 step, int(config.eval.num_samples))
    began = time.perf_counter()
    results = evaluate(config, run.model, run.schedule, state, run.mesh, run.workdir)
    figures = ', '.join(f'{name} {value:.4g}' for name, value in sorted(results.items()))
    logging.info('Evaluation at step %d took %.0f s: %s.', step, time.perf_counter() - began,
                 figures or 'no metric applies to this config')
    if results:
      run.writer.write(step, {f'eval/{name}': float(v) for name, v in results.items()})
