"""Files of a sampling: the inpainting inputs read, the output folder named, checked, written.

  OUTPUT_DIR/samples.npz   images uint8 [N, H, W, C]; labels [N] (conditional models);
                           psnr [N] (inpainting)
  OUTPUT_DIR/grid.png      the first (up to 64) samples
  OUTPUT_DIR/images/*.png  one file per sample, on request
  OUTPUT_DIR/psnr.json     inpainting: PSNR (dB) of the filled region against the input

The default OUTPUT_DIR, workdir/samples/<name>, is named by everything that makes the samples
(`default_output_dir`), so different settings never share a folder. An OUTPUT_DIR that already
holds outputs is refused rather than mixed with new ones (`prepare_output_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from jaxddpm import images as images_lib
from jaxddpm import solvers

GRID_SIZE = 64
# What `write_outputs` (and run_sample.py's metrics.json) put in an output dir.
OUTPUT_NAMES = ('samples.npz', 'grid.png', 'images', 'psnr.json', 'metrics.json',
                'comparison.png', 'stage_0')


class SampleError(ValueError):
  """Bad input to sampling (the message says what and why)."""


def load_image(path: str, mode: str) -> np.ndarray:
  """An image file as uint8 [H, W] ('L') or [H, W, 3] ('RGB'); SampleError if unreadable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise SampleError(f'no such file: {path!r}')
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert(mode))
  except (OSError, ValueError):  # PIL.UnidentifiedImageError is an OSError
    raise SampleError(f'{path!r} is not a readable image file') from None


def load_inpainting_inputs(image_path: str, mask_path: str, image_size: int,
                           channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads the image to inpaint and its mask (white = keep, black = fill).

  Returns:
    (image uint8 [H, W, C], mask float32 [H, W, 1] in {0, 1}), H = W = image_size.
  """
  if bool(image_path) != bool(mask_path):
    raise SampleError('inpainting needs both --inpaint_image and --inpaint_mask')
  image = load_image(image_path, 'L' if channels == 1 else 'RGB')
  mask = load_image(mask_path, 'L')
  if image.shape[:2] != mask.shape[:2]:
    raise SampleError(f'mask size {mask.shape[1]}x{mask.shape[0]} does not match the image '
                      f'size {image.shape[1]}x{image.shape[0]}')
  if image.shape[:2] != (image_size, image_size):
    raise SampleError(f'image is {image.shape[1]}x{image.shape[0]}, the model samples '
                      f'{image_size}x{image_size}')
  image = image.reshape(image_size, image_size, channels)
  mask = (mask > 127).astype(np.float32)[..., None]
  if mask.min() == 1.0:
    raise SampleError('the mask keeps every pixel (white = keep); nothing to inpaint')
  return image, mask

def inpainting_inputs(config, settings, image_path, mask_path, *, inpaint_resample: int,
                      inpaint_jump_length: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The (image, mask) to inpaint, or None; RePaint's settings checked before any compiling
  (settings: `sample._solver_settings`'s)."""
  resample, jump_length = inpaint_resample, inpaint_jump_length
  if not (image_path or mask_path):
    if resample != 1:
      raise SampleError(f'inpaint_resample = {resample} needs --inpaint_image and '
                        '--inpaint_mask')
    return None
  inpainting = load_inpainting_inputs(
      image_path, mask_path, int(config.data.image_size), int(config.data.channels))
  if resample > 1 and settings['multistep']:
    raise SampleError(f'inpaint_resample = {resample}: RePaint jumps back in time, which '
                      f'{settings["solver"]} (a multistep solver) cannot follow; use '
                      'inpaint_resample = 1 or a single-step solver (ddpm, ddim, heun)')
  try:
    solvers.repaint.repaint_plan(settings['grid_steps'], jump_length, resample)
  except ValueError as e:
    raise SampleError(f'inpaint_resample = {resample}, inpaint_jump_length = '
                      f'{jump_length}: {e}') from None
  return inpainting


def low_res_inputs(config, low_res, aug_level: float | None, num_samples: int
                   ) -> dict[str, Any]:
  """{'low_res': uint8 [N, h, w, C] or None, 'aug_level': float}, checked against the
  model: a super-resolution model (config.data.low_res_size > 0) needs one low-res image per
  sample, of its input size and channels; any other model takes none."""
  size, channels = int(config.data.get('low_res_size', 0)), int(config.data.channels)
  level = float(aug_level if aug_level is not None else config.sampling.get('aug_level', 0.0))
  if not size:
    if low_res is not None:
      raise SampleError('low-res inputs given, but this run is not a super-resolution model '
                        '(config.data.low_res_size = 0)')
    return {'low_res': None, 'aug_level': 0.0}
  if low_res is None:
    raise SampleError(f'this run is a {size}x{size} -> {config.data.image_size}x'
                      f'{config.data.image_size} super-resolution model: give it low-res '
                      'images (run_sample.py --sr_workdir=RUN --low_res_images=DIR, or a base '
                      'run: --workdir=BASE --sr_workdir=RUN)')
  low_res = np.asarray(low_res)
  expected = (size, size, channels)
  if low_res.ndim != 4 or low_res.shape[1:] != expected or low_res.dtype != np.uint8:
    raise SampleError(f'low-res inputs are {low_res.dtype} {low_res.shape[1:]}; the '
                      f'super-resolution model takes uint8 {size}x{size}x{channels} images')
  if len(low_res) != num_samples:
    raise SampleError(f'{len(low_res)} low-res inputs for {num_samples} samples')
  if not 0.0 <= level <= 1.0:
    raise SampleError(f'aug_level = {level} must be in [0, 1]')
  return {'low_res': low_res, 'aug_level': level}


# The solver options in an output folder's name (`factories.SOLVER_OPTIONS`; eta above).
_OPTION_TAGS = (('spacing', ''), ('order', 'order'), ('s_churn', 'churn'), ('s_tmin', 'tmin'),
                ('s_tmax', 'tmax'), ('s_noise', 'snoise'), ('thresholding', 'thresh'))


def default_output_dir(workdir: str, opts: dict[str, Any], *, step: int,
                       inpainting: tuple[np.ndarray, np.ndarray] | None = None,
                       inpaint_resample: int = 1, inpaint_jump_length: int = 10) -> str:
  """workdir/samples/<name>, the name made of every setting the samples depend on.

  E.g. 'ddim_10steps_eta0_seed1_class2_guidance3_n16_batch16_step400',
  'heun_19steps_karras_churn40_seed0_n256_batch256_step2000'. The batch size is
  part of it because batch b's noise is drawn from fold_in(seed, b) for the whole batch;
  an inpainting input is named by a hash of the image and mask pixels, RePaint's r and
  jump length when r > 1.
  """
  parts = [f'{opts["solver"]}_{opts["steps"]}steps']
  settings = opts.get('settings', {})
  if opts['solver'] == 'ddim':
    parts.append(f'eta{settings.get("eta", 0.0):g}')
  for key, tag in _OPTION_TAGS:
    if key in settings:
      parts.append(f'{tag}{settings[key]:g}' if tag else str(settings[key]))
  parts.append(f'seed{opts["seed"]}')
  if opts['class_label'] is not None:
    parts.append(f'class{opts["class_label"]}')
  if opts['guidance_scale'] > 0:
    parts.append(f'guidance{opts["guidance_scale"]:g}')
  if opts.get('classifier') is not None:
    parts.append(f'classifier{opts["classifier_scale"]:g}')
  if opts.get('compose_weights') is not None:
    what = repr((opts['compose_weights'], opts.get('compose_prompts'),
                 None if opts.get('labels') is None else opts['labels'][0].tolist()))
    parts.append(f'compose{hashlib.sha256(what.encode()).hexdigest()[:8]}')
  corrector = opts.get('corrector')
  if corrector is not None:
    leapfrog = f'L{corrector["num_leapfrog"]}' if 'hmc' in corrector['method'] else ''
    parts.append(f'{corrector["method"]}{corrector["num_steps"]}{leapfrog}'
                 f'x{corrector["step_scale"]:g}')
  if inpainting is not None:
    digest = hashlib.sha256(b''.join(a.tobytes() for a in inpainting)).hexdigest()[:8]
    parts.append(f'inpaint{digest}')
    if inpaint_resample > 1:
      parts.append(f'repaint_r{inpaint_resample}j{inpaint_jump_length}')
  parts += [f'n{opts["num_samples"]}', f'batch{opts["batch_size"]}', f'step{step}']
  return os.path.join(workdir, 'samples', '_'.join(parts))


def prepare_output_dir(output_dir: str, *, create: bool) -> list[str]:
  """Refuses a dir that holds outputs already; with `create` (the main process) creates the
  dir and test-writes a file in it.

  Returns the folders it created, deepest first, for `remove_created` when sampling fails.
  """
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise SampleError(f'output dir {output_dir!r} is a file, not a directory')
  found = [n for n in OUTPUT_NAMES if os.path.exists(os.path.join(output_dir, n))]
  if found:
    raise SampleError(f'output dir {output_dir!r} already holds {", ".join(found)}; pass '
                      'another --output_dir or delete it (outputs of two samplings are never '
                      'mixed)')
  created = []
  if not create:
    return created
  path = os.path.abspath(output_dir)
  while not os.path.exists(path):
    created.append(path)
    path = os.path.dirname(path)
  probe = os.path.join(output_dir, f'.write_test_{os.getpid()}')
  try:
    os.makedirs(output_dir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    remove_created(created)
    raise SampleError(f'cannot write to output dir {output_dir!r}: '
                      f'{e.strerror or e}') from None
  return created


def remove_created(folders: list[str]) -> None:
  """Removes the folders `_prepare_output_dir` made, as long as they are still empty."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return


def check_finite(samples: np.ndarray, step: int | None) -> None:
  bad = int(np.sum(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)))
  if bad:
    source = 'these parameters' if step is None else f'the checkpoint at step {step}'
    raise SampleError(f'{bad} of {len(samples)} samples are not finite (NaN/Inf) from '
                      f'{source}: the checkpoint may be damaged or the training '
                      'diverged; nothing was written')


def write_outputs(output_dir: str, result: dict[str, Any], *, save_individual: bool) -> None:
  """samples.npz (images, labels, psnr, prompts, compose_weights and compose_prompts: those
  there are), grid.png, psnr.json
  (inpainting) and optionally images/NNNNNN.png.

  Raises:
    SampleError: a file could not be written (e.g. the disk is full).
  """
  try:
    os.makedirs(output_dir, exist_ok=True)
    arrays = {k: result[k] for k in ('images', 'labels', 'psnr') if result[k] is not None}
    if result.get('prompts') is not None:  # the i-th sample answers prompts[i]
      arrays['prompts'] = np.asarray(list(result['prompts']), dtype=np.str_)
    if result.get('compose_weights') is not None:  # every sample answers the composition
      arrays['compose_weights'] = np.asarray(result['compose_weights'], np.float32)
      if result.get('compose_prompts') is not None:
        arrays['compose_prompts'] = np.asarray(list(result['compose_prompts']), dtype=np.str_)
    np.savez(os.path.join(output_dir, 'samples.npz'), **arrays)
    images = result['images']
    images_lib.save_image_grid(images[:GRID_SIZE], os.path.join(output_dir, 'grid.png'))
    if result['psnr'] is not None:
      with open(os.path.join(output_dir, 'psnr.json'), 'w') as f:
        json.dump({'mean_psnr_db': float(np.mean(result['psnr'])),
                   'psnr_db': [float(p) for p in result['psnr']]}, f, indent=2)
    if save_individual:
      folder = os.path.join(output_dir, 'images')
      os.makedirs(folder, exist_ok=True)
      for i, img in enumerate(images):
        images_lib.save_png(img, os.path.join(folder, f'{i:06d}.png'))
  except OSError as e:
    raise SampleError(f'could not write the samples to {output_dir!r}: {e}') from None
