"""A run directory (trained or converted) as Python objects.

  config, params, model_fn = jaxddpm.load_run('runs/cifar')
  eps = model_fn(x_t, t)          # [B, H, W, C]

The workdir holds `config.json` (written by training or `jaxddpm.convert`)
and Orbax checkpoints under `checkpoints/`.
"""

import json
import os

import jax
import ml_collections

from jaxddpm import checkpoint
from jaxddpm import models
from jaxddpm import factories


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """workdir/config.json as a ConfigDict (JSON lists stay lists; the model accepts both)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir!r} is not a run directory: no config.json in it')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, *, ema: bool = True, step: int | None = None):
  """Returns (config, params, model_fn) of the run in `workdir`.

  Args:
    workdir: a run directory.
    ema: the EMA parameters (what DDPM samples with) when the checkpoint has them.
    step: a checkpoint step; by default the newest usable one (a damaged newer
      checkpoint is skipped with a warning naming it; see `checkpoint.load_params`).
  Returns:
    config: the run's ConfigDict.
    params: the denoiser's params pytree.
    model_fn: model_fn(x, t, cond={}) -> [B, H, W, C] (or 2C for learned
      variances), eval mode, a `Partial` over params (`models.make_model_fn`);
      jit it or call it inside jitted code.
  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: no usable checkpoint (`checkpoint.CheckpointError`), or the
      checkpoint's parameters do not fit the configured model.
  """
  return load_run_and_step(workdir, ema=ema, step=step)[:3]


def load_run_and_step(workdir: str, *, ema: bool = True, step: int | None = None):
  """`load_run`, also returning the step of the checkpoint it read: (config, params, model_fn, step)."""
  config = read_config(workdir)
  params, step = checkpoint.load_params_and_step(workdir, ema=ema, step=step)
  if set(params) == {'params'}:  # a checkpoint of the whole Flax variables dict
    params = params['params']
  model = factories.create_model(config)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  if jax.tree.structure(abstract) != jax.tree.structure(params) or any(
      a.shape != p.shape for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params))):
    raise ValueError(f'the checkpoint in {workdir!r} does not fit the model of its config.json')
  return config, params, models.make_model_fn(model, params), step
