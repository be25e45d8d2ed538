"""Super-resolution runs and cascades: upscaling images, a folder, the held-out set, a base run.

  python run_sample.py --workdir=runs/base --sr_workdir=runs/sr [--sr_workdir=runs/sr2]
  python run_sample.py --sr_workdir=runs/sr --low_res_images=DIR
  python run_sample.py --sr_workdir=runs/sr --sr_samples_per_input=8   # held-out metrics

A cascade samples the base run (`sample.sample_run`'s settings) and passes the batch through
each super-resolution stage in turn (SR3 sec. 4; CDM sec. 3); every stage samples with its
own run's config.sampling unless --sr_solver / --sr_steps say otherwise, with its low-res
input noised to --aug_level (`jaxddpm.diffusion.superres`). The sizes are checked before
anything is sampled: stage k's low-res size and channels must be stage k-1's output.

Outputs (the folder must not hold outputs already, `sample_io.prepare_output_dir`):
  cascade:   OUTPUT_DIR/stage_0/ (the base samples), stage_1/, ..., and the last stage's
             samples.npz and grid.png in OUTPUT_DIR itself;
  folder:    OUTPUT_DIR/<name>.png, the upscaled image of DIR/<name>.<ext>, and grid.png;
  held-out:  samples.npz (uint8 [K, N, H, W, C]), comparison.png (rows: low-res enlarged
             by pixel repetition | bicubic | sample | ground truth) and metrics.json
             (`jaxddpm.evaluation.superres.sr_metrics`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxddpm import images as images_lib
from jaxddpm import parallel
from jaxddpm import runs
from jaxddpm import sample
from jaxddpm import sample_io
from jaxddpm.data import sources
from jaxddpm.evaluation import run as eval_run
from jaxddpm.evaluation import superres as sr_eval
from jaxddpm.sample_io import SampleError

_STAGE_SEED_TAG = 0x5CA1E


def _load(workdir: str):
  """(config, EMA params) of a super-resolution run; SampleError otherwise."""
  try:
    config, params, _, _ = runs.load_run_and_step(workdir, ema=True)
  except (FileNotFoundError, ValueError) as e:
    raise SampleError(str(e)) from None
  if not int(config.data.get('low_res_size', 0)):
    raise SampleError(f'{workdir!r} is not a super-resolution run (config.data.low_res_size '
                      'is 0); --sr_workdir names a run trained on low-res inputs')
  return config, params


def _check_input(config, workdir: str, shape, what: str) -> None:
  size, channels = int(config.data.low_res_size), int(config.data.channels)
  if tuple(shape) != (size, size, channels):
    raise SampleError(f'{what} is {shape[1]}x{shape[0]}x{shape[2]}, but the super-resolution '
                      f'model {workdir!r} takes {size}x{size}x{channels} inputs')


def upscale(config, params, low_res: np.ndarray, *, samples_per_input: int = 1,
            solver: str | None = None, steps: int | None = None,
            aug_level: float | None = None, seed: int | None = None,
            batch_size: int | None = None, stage: int = 1, progress: bool = True,
            mesh=None) -> np.ndarray:
  """K samples of the SR model for each low-res image: uint8 [K, N, H, W, C].

  low_res: uint8 [N, h, w, C]. The K copies of the inputs are sampled as one run of K N
  samples (one compilation) from fold_in(key(seed), TAG + stage), so a stage's outputs do
  not depend on the others.
  """
  if samples_per_input < 1:
    raise SampleError(f'samples_per_input = {samples_per_input} must be positive')
  base = jax.random.key(int(config.seed) if seed is None else int(seed))
  n = len(low_res)
  images = sample.generate(
      config, params, num_samples=samples_per_input * n, solver=solver, steps=steps,
      batch_size=batch_size, key=jax.random.fold_in(base, _STAGE_SEED_TAG + stage),
      low_res=np.tile(low_res, (samples_per_input, 1, 1, 1)), aug_level=aug_level,
      progress=progress, mesh=mesh)['images']
  return images.reshape((samples_per_input, n) + images.shape[1:])


def _prepare(output_dir: str) -> list[str]:
  return sample_io.prepare_output_dir(output_dir, create=parallel.is_main_process())


def _write(output_dir: str, images: np.ndarray) -> None:
  sample_io.write_outputs(output_dir, dict(images=images, labels=None, psnr=None),
                          save_individual=False)


def _default_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'samples', name)


def evaluate_held_out(sr_workdir: str, *, samples_per_input: int = 1,
                      output_dir: str | None = None, num_examples: int | None = None,
                      **kwargs) -> dict[str, Any]:
  """Upscales the run's held-out eval split and scores it (`sr_eval.sr_metrics`).

  Returns dict(metrics, images uint8 [K, N, H, W, C], output_dir). kwargs: `upscale`'s.
  """
  config, params = _load(sr_workdir)
  try:
    high, low = sr_eval.held_out_pairs(config, num_examples)
  except sources.DatasetError as e:
    raise SampleError(f'cannot read the held-out split of {sr_workdir!r}: {e}') from None
  level, s = kwargs.get('aug_level'), config.sampling
  solver = kwargs.get('solver') or s.solver
  steps = kwargs.get('steps') or s.num_steps
  output_dir = output_dir or _default_dir(
      sr_workdir, f'held_out_{solver}_{steps}steps_k{samples_per_input}_aug'
      f'{level if level is not None else s.get("aug_level", 0.0):g}'
      f'_seed{kwargs.get("seed") if kwargs.get("seed") is not None else config.seed}')
  created = _prepare(output_dir)
  try:
    images = upscale(config, params, low, samples_per_input=samples_per_input, **kwargs)
  except BaseException:
    sample_io.remove_created(created)
    raise
  metrics = sr_eval.sr_metrics(images, high, low)
  if parallel.is_main_process():
    np.savez(os.path.join(output_dir, 'samples.npz'), images=images, high_res=high, low_res=low)
    images_lib.save_png(sr_eval.comparison_grid(low, high, images[0]),
                        os.path.join(output_dir, 'comparison.png'))
    eval_run.write_json(os.path.join(output_dir, 'metrics.json'), metrics)
  return dict(metrics=metrics, images=images, output_dir=output_dir)


def read_folder(folder: str, channels: int) -> tuple[list[str], np.ndarray | list]:
  """(names, images uint8 [H, W, C] each) of the PNG/JPEG files directly in `folder`."""
  if not os.path.isdir(folder):
    raise SampleError(f'--low_res_images {folder!r} is not a directory')
  names = sorted(n for n in os.listdir(folder)
                 if n.lower().endswith(sources.IMAGE_EXTENSIONS))
  if not names:
    raise SampleError(f'no PNG/JPEG file in {folder!r}')
  mode = 'L' if channels == 1 else 'RGB'
  images = [sample_io.load_image(os.path.join(folder, n), mode) for n in names]
  return names, [im.reshape(im.shape[:2] + (channels,)) for im in images]


def upscale_folder(sr_workdir: str, folder: str, *, output_dir: str | None = None,
                   **kwargs) -> dict[str, Any]:
  """Upscales every image of `folder`, written as OUTPUT_DIR/<name>.png (module docstring)."""
  config, params = _load(sr_workdir)
  names, images = read_folder(folder, int(config.data.channels))
  for name, image in zip(names, images):
    _check_input(config, sr_workdir, image.shape, os.path.join(folder, name))
  output_dir = output_dir or _default_dir(
      sr_workdir, f'upscaled_{os.path.basename(os.path.normpath(folder))}')
  created = _prepare(output_dir)
  try:
    out = upscale(config, params, np.stack(images), **kwargs)[0]
  except BaseException:
    sample_io.remove_created(created)
    raise
  if parallel.is_main_process():
    for name, image in zip(names, out):
      images_lib.save_png(image, os.path.join(output_dir, os.path.splitext(name)[0] + '.png'))
    images_lib.save_image_grid(out[:sample_io.GRID_SIZE], os.path.join(output_dir, 'grid.png'))
  return dict(images=out, names=names, output_dir=output_dir)


def sample_cascade(workdir: str, sr_workdirs: list[str], *, output_dir: str | None = None,
                   sr_kwargs: dict | None = None, **base_kwargs) -> dict[str, Any]:
  """The base run's samples (`sample.sample_run(workdir, **base_kwargs)`) through every stage.

  Returns dict(images: the last stage's uint8 [N, H, W, C], stages: each stage's images,
  output_dir).
  """
  stages = [_load(w) for w in sr_workdirs]
  try:
    base_config = runs.read_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    raise SampleError(str(e)) from None
  shape = (int(base_config.data.image_size),) * 2 + (int(base_config.data.channels),)
  for k, ((config, _), w) in enumerate(zip(stages, sr_workdirs)):
    _check_input(config, w, shape, f'stage {k}\'s output ({workdir if k == 0 else sr_workdirs[k - 1]})')
    shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  output_dir = output_dir or _default_dir(
      sr_workdirs[-1], f'cascade_{os.path.basename(os.path.normpath(workdir))}')
  created = _prepare(output_dir)
  try:
    base = sample.sample_run(workdir, output_dir=os.path.join(output_dir, 'stage_0'),
                             **base_kwargs)
    images, outputs = base['images'], [base['images']]
    for k, (config, params) in enumerate(stages, start=1):
      images = upscale(config, params, images, stage=k, **(sr_kwargs or {}))[0]
      outputs.append(images)
      if parallel.is_main_process() and k < len(stages):
        _write(os.path.join(output_dir, f'stage_{k}'), images)
  except BaseException:
    sample_io.remove_created(created)
    raise
  if parallel.is_main_process():
    _write(output_dir, images)
  return dict(images=images, stages=outputs, output_dir=output_dir)


def run(workdir: str | None, sr_workdirs: list[str], *, low_res_images: str | None,
        samples_per_input: int, output_dir: str | None, sr_kwargs: dict,
        base_kwargs: dict) -> dict[str, Any]:
  """run_sample.py's --sr_workdir: a cascade when `workdir` (the base run) is given, else
  the upscaling of `low_res_images`, else the held-out metrics of the one SR run."""
  if workdir:
    if low_res_images:
      raise SampleError('--low_res_images upscales a folder; a cascade (--workdir) samples '
                        'its own inputs')
    return sample_cascade(workdir, sr_workdirs, output_dir=output_dir, sr_kwargs=sr_kwargs,
                          **base_kwargs)
  if len(sr_workdirs) > 1:
    raise SampleError('several --sr_workdir stages need a base run (--workdir)')
  if low_res_images:
    return upscale_folder(sr_workdirs[0], low_res_images, output_dir=output_dir, **sr_kwargs)
  return evaluate_held_out(sr_workdirs[0], samples_per_input=samples_per_input,
                           output_dir=output_dir, **sr_kwargs)
