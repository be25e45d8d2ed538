"""Sampling from a trained run: the shell around `jaxddpm.samplers`.

`sample_run(workdir, ...)` loads the run (config.json + the latest checkpoint's
EMA parameters), builds the sampler from config.sampling (arguments override
it), splits each batch of samples over a 1-D 'data' mesh of all devices of all
processes, runs the plan chunk by chunk under a progress bar, checks that every
sample is finite, and writes

  OUTPUT_DIR/samples.npz   images uint8 [N, H, W, C]; labels [N] (conditional models);
                           psnr [N] (inpainting)
  OUTPUT_DIR/grid.png      the first (up to 64) samples
  OUTPUT_DIR/images/*.png  one file per sample, on request
  OUTPUT_DIR/psnr.json     inpainting: PSNR (dB) of the filled region against the input

The default OUTPUT_DIR, workdir/samples/<name>, is named by everything that
makes the samples (`default_output_dir`), so different settings never share a
folder. An OUTPUT_DIR that already holds outputs is refused rather than mixed
with new ones, and it is created and test-written before any sampling, so an
unwritable path fails in seconds, not after the sampling. Nothing is written
when a sample is NaN/Inf (a damaged checkpoint or a diverged run).

Batch b starts from fold_in(PRNGKey(seed), b), and the random numbers of a
sharded array do not depend on the number of devices, so a seed gives the same
samples on 1 or 8 devices (to float32 rounding of the network). Bad input raises
`SampleError` with one clear message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import checkpoint
from jaxddpm import images as images_lib
from jaxddpm import models
from jaxddpm import parallel
from jaxddpm import runs
from jaxddpm import runtime
from jaxddpm import samplers
from jaxddpm import factories

GRID_SIZE = 64
# What `write_outputs` (and run_sample.py's metrics.json) put in an output dir.
OUTPUT_NAMES = ('samples.npz', 'grid.png', 'images', 'psnr.json', 'metrics.json')


class SampleError(ValueError):
  """Bad input to `sample_run` (the message says what and why)."""


def _require_checkpoint(workdir: str) -> None:
  if not checkpoint.saved_steps(workdir):
    raise SampleError(f'no checkpoint in {checkpoint.checkpoint_dir(workdir)}; train first '
                      '(run_train.py) or convert weights into this workdir')


def _load_image(path: str, mode: str) -> np.ndarray:
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
  image = _load_image(image_path, 'L' if channels == 1 else 'RGB')
  mask = _load_image(mask_path, 'L')
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


def _resolve(config, *, sampler, steps, eta, num_samples, batch_size, seed, class_label,
             guidance_scale, mesh_size) -> dict[str, Any]:
  """Arguments over config.sampling defaults, validated."""
  s = config.sampling
  opts = dict(
      sampler=sampler if sampler is not None else s.sampler,
      steps=steps if steps is not None else s.num_steps,
      eta=float(eta if eta is not None else s.eta),
      num_samples=num_samples if num_samples is not None else s.num_samples,
      batch_size=batch_size if batch_size is not None else s.batch_size,
      seed=seed if seed is not None else config.seed,
      guidance_scale=float(guidance_scale if guidance_scale is not None
                           else s.get('guidance_scale', 0.0)),
      class_label=class_label)
  num_timesteps = config.diffusion.num_timesteps
  num_classes = int(config.model.num_classes)
  if opts['sampler'] not in samplers.SAMPLERS:
    raise SampleError(f'unknown sampler {opts["sampler"]!r}; expected one of {samplers.SAMPLERS}')
  # Two, not one: a respaced schedule keeps at least two timesteps (`schedules.respace`).
  if not 2 <= opts['steps'] <= num_timesteps:
    raise SampleError(f'steps = {opts["steps"]} must be in [2, {num_timesteps}] (the run '
                      f'was trained with {num_timesteps} diffusion timesteps)')
  if not 0.0 <= opts['eta'] <= 1.0:
    raise SampleError(f'eta = {opts["eta"]} must be in [0, 1]')
  for name in ('num_samples', 'batch_size'):
    if opts[name] < 1:
      raise SampleError(f'{name} = {opts[name]} must be positive')
  if class_label is not None:
    if num_classes == 0:
      raise SampleError(f'class_label = {class_label} given, but the model is unconditional '
                        '(model.num_classes = 0)')
    if not 0 <= class_label < num_classes:
      raise SampleError(f'class_label = {class_label} is out of range [0, {num_classes})')
  if opts['guidance_scale'] < 0:
    raise SampleError(f'guidance_scale = {opts["guidance_scale"]} must be >= 0')
  if opts['guidance_scale'] > 0 and num_classes == 0:
    raise SampleError('classifier-free guidance needs a class-conditional model; this one is '
                      'unconditional (model.num_classes = 0)')
  if opts['guidance_scale'] > 0 and not float(config.model.get('class_dropout', 0.0)) > 0:
    logging.warning('guidance_scale > 0, but the model was trained without label dropout '
                    '(model.class_dropout = 0): its null-class prediction is untrained.')
  # Every device gets the same share of a batch; round up, the extra samples are dropped.
  batch = min(opts['batch_size'], opts['num_samples'])
  opts['batch_size'] = math.ceil(batch / mesh_size) * mesh_size
  return opts


def _state_shardings(abstract_state, mesh) -> Any:
  """Arrays with a batch dimension split on 'data', the key replicated."""
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.tree.map(lambda a: data if a.ndim else rep, abstract_state)


@functools.lru_cache(maxsize=16)
def _compiled_run_chunk(mesh, state_treedef, leaf_ndims):
  """`samplers.run_chunk` jitted for one mesh and state structure (cached across calls).

  The sampler and the model function are pytree arguments, replicated (not constants baked
  into the program); the state is split over 'data' and donated, so x is updated in place.
  """
  rep = parallel.replicated(mesh)
  state_sharding = jax.tree.unflatten(state_treedef, [
      parallel.data_sharding(mesh) if ndim else rep for ndim in leaf_ndims])
  return jax.jit(samplers.run_chunk, in_shardings=(rep, rep, state_sharding, rep),
                 out_shardings=(state_sharding, None), donate_argnums=2,
                 compiler_options=runtime.step_compiler_options())


def default_output_dir(workdir: str, opts: dict[str, Any], *, step: int,
                       inpainting: tuple[np.ndarray, np.ndarray] | None = None,
                       inpaint_resample: int = 1, inpaint_jump_length: int = 10) -> str:
  """workdir/samples/<name>, the name made of every setting the samples depend on.

  E.g. 'ddim_10steps_eta0_seed1_class2_guidance3_n16_batch16_step400'. The batch size is
  part of it because batch b's noise is drawn from fold_in(seed, b) for the whole batch;
  an inpainting input is named by a hash of the image and mask pixels, RePaint's r and
  jump length when r > 1.
  """
  parts = [f'{opts["sampler"]}_{opts["steps"]}steps']
  if opts['sampler'] == 'ddim':
    parts.append(f'eta{opts["eta"]:g}')
  parts.append(f'seed{opts["seed"]}')
  if opts['class_label'] is not None:
    parts.append(f'class{opts["class_label"]}')
  if opts['guidance_scale'] > 0:
    parts.append(f'guidance{opts["guidance_scale"]:g}')
  if inpainting is not None:
    digest = hashlib.sha256(b''.join(a.tobytes() for a in inpainting)).hexdigest()[:8]
    parts.append(f'inpaint{digest}')
    if inpaint_resample > 1:
      parts.append(f'repaint_r{inpaint_resample}j{inpaint_jump_length}')
  parts += [f'n{opts["num_samples"]}', f'batch{opts["batch_size"]}', f'step{step}']
  return os.path.join(workdir, 'samples', '_'.join(parts))


def _prepare_output_dir(output_dir: str, *, create: bool) -> list[str]:
  """Refuses a dir that holds outputs already; with `create` (the main process) creates the
  dir and test-writes a file in it.

  Returns the folders it created, deepest first, for `_remove_created` when sampling fails.
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
    _remove_created(created)
    raise SampleError(f'cannot write to output dir {output_dir!r}: '
                      f'{e.strerror or e}') from None
  return created


def _remove_created(folders: list[str]) -> None:
  """Removes the folders `_prepare_output_dir` made, as long as they are still empty."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return


def _check_finite(samples: np.ndarray, step: int | None) -> None:
  bad = int(np.sum(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)))
  if bad:
    source = 'these parameters' if step is None else f'the checkpoint at step {step}'
    raise SampleError(f'{bad} of {len(samples)} samples are not finite (NaN/Inf) from '
                      f'{source}: the checkpoint may be damaged or the training '
                      'diverged; nothing was written')


class Run(NamedTuple):
  """A trained or converted run in memory, as `jaxddpm.load_run` returns it.

    run = jaxddpm.load_run('runs/digits')
    images = run.sample(16, solver='ddim', steps=50, seed=0)   # uint8 [16, H, W, C]
    config, params, model_fn = run                              # the parts, as before

  model_fn(x, t, y=None) is the network (eval mode) as a `Partial` over params.
  """
  config: Any
  params: Any
  model_fn: Any

  def sample(self, num_samples: int, *, solver: str | None = None, steps: int | None = None,
             eta: float | None = None, seed: int | None = None, class_label: int | None = None,
             guidance_scale: float | None = None, batch_size: int | None = None,
             progress: bool = False, mesh=None) -> np.ndarray:
    """`num_samples` images, uint8 [N, H, W, C], by the loop of `sample_run` (same seed, same
    images as run_sample.py with the same settings); arguments left None come from
    config.sampling. solver: 'ddpm' or 'ddim'. Raises SampleError for bad arguments."""
    return generate(self.config, self.params, num_samples=num_samples, sampler=solver,
                    steps=steps, eta=eta, seed=seed, class_label=class_label,
                    guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
                    mesh=mesh)['images']


def generate(config, params, *, num_samples: int, sampler: str | None = None,
             steps: int | None = None, eta: float | None = None, seed: int | None = None,
             class_label: int | None = None, guidance_scale: float | None = None,
             batch_size: int | None = None, key: jax.Array | None = None,
             progress: bool = False, mesh=None) -> dict[str, Any]:
  """Samples of the network `config` describes with `params` (no workdir needed).

  Arguments as `sample_run`'s (None: config.sampling's); `key`, when given, replaces
  key(seed) as the base key (batch b draws from fold_in(key, b)). Returns dict(images uint8
  [N, H, W, C], samples float32 [N, H, W, C] in [-1, 1] (unclipped), labels [N] or None).
  All processes must call it (the parameters may be global arrays).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  opts = _resolve(config, sampler=sampler, steps=steps, eta=eta, num_samples=num_samples,
                  batch_size=batch_size, seed=seed, class_label=class_label,
                  guidance_scale=guidance_scale, mesh_size=mesh.size)
  opts['key'] = key
  return _sample(config, params, opts, step=None, inpainting=None, inpaint_resample=1,
                 inpaint_jump_length=10, progress=progress, mesh=mesh)


def load_run(workdir: str, *, ema: bool = True, step: int | None = None) -> Run:
  """The run in `workdir` (config.json + the newest good checkpoint; `runs.load_run`) as a `Run`."""
  return Run(*runs.load_run(workdir, ema=ema, step=step))


def _inpainting_inputs(config, steps: int, image_path, mask_path, resample: int,
                       jump_length: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The (image, mask) to inpaint, or None; RePaint's settings checked before any compiling."""
  if not (image_path or mask_path):
    if resample != 1:
      raise SampleError(f'inpaint_resample = {resample} needs --inpaint_image and '
                        '--inpaint_mask')
    return None
  inpainting = load_inpainting_inputs(image_path, mask_path, int(config.data.image_size),
                                      int(config.data.channels))
  try:
    samplers.repaint_plan(steps, jump_length, resample)
  except ValueError as e:
    raise SampleError(f'inpaint_resample = {resample}, inpaint_jump_length = '
                      f'{jump_length}: {e}') from None
  return inpainting


def sample_run(workdir: str, *, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, num_samples: int | None = None,
               batch_size: int | None = None, seed: int | None = None,
               class_label: int | None = None, guidance_scale: float | None = None,
               inpaint_image: str | None = None, inpaint_mask: str | None = None,
               inpaint_resample: int = 1, inpaint_jump_length: int = 10,
               output_dir: str | None = None, save_individual: bool = False,
               progress: bool = True, mesh=None) -> dict[str, Any]:
  """Samples from the latest checkpoint (EMA parameters) of the run in `workdir`.

  Arguments left None come from the run's config.sampling (and config.seed).

  Args:
    workdir: a run directory (config.json + checkpoints/).
    sampler, steps, eta: 'ddpm' (ancestral) or 'ddim'; steps in [2, T] (fewer than T
      respaces the schedule); DDIM's eta in [0, 1].
    num_samples, batch_size: total samples and samples per compiled call (rounded up to a
      multiple of the number of devices). seed: PRNG seed.
    class_label: class of every sample (conditional models); None draws labels uniformly.
    guidance_scale: classifier-free guidance weight w (> 0 needs a conditional model).
    inpaint_image, inpaint_mask: image files of the model's size, white = keep; every sample
      fills the same image. inpaint_resample, inpaint_jump_length: RePaint's r and jump
      length (< steps when r > 1); r = 1 is the replacement method.
    output_dir: default `default_output_dir`; must not hold outputs of an earlier sampling.
    save_individual: also write one PNG per sample. progress: a progress bar (process 0).
    mesh: a 1-D 'data' mesh (default `parallel.make_mesh()`, all devices).

  Returns:
    dict(images uint8 [N, H, W, C], samples float32 [N, H, W, C] in [-1, 1] (unclipped),
    labels [N] or None, psnr [N] or None, output_dir).

  Raises:
    SampleError: bad input, with a message naming it; also when a sample is not finite
      (then nothing is written).
  """
  try:
    config = runs.read_config(workdir)
  except (FileNotFoundError, ValueError) as e:  # ValueError: config.json is not JSON
    raise SampleError(str(e)) from None
  _require_checkpoint(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  opts = _resolve(config, sampler=sampler, steps=steps, eta=eta, num_samples=num_samples,
                  batch_size=batch_size, seed=seed, class_label=class_label,
                  guidance_scale=guidance_scale, mesh_size=mesh.size)
  inpainting = _inpainting_inputs(config, opts['steps'], inpaint_image, inpaint_mask,
                                  inpaint_resample, inpaint_jump_length)
  try:
    # Before naming the outputs: a damaged newest checkpoint makes this an older step.
    loaded = runs.load_run_and_step(workdir, ema=True)
  except (FileNotFoundError, ValueError) as e:
    raise SampleError(str(e)) from None
  step = loaded[3]
  if output_dir is None:
    output_dir = default_output_dir(workdir, opts, step=step, inpainting=inpainting,
                                    inpaint_resample=inpaint_resample,
                                    inpaint_jump_length=inpaint_jump_length)
  # Every process checks, so that all of them stop together, before any collective.
  created = _prepare_output_dir(output_dir, create=parallel.is_main_process())
  try:
    result = _sample(loaded[0], loaded[1], opts, step=step, inpainting=inpainting,
                     inpaint_resample=inpaint_resample, inpaint_jump_length=inpaint_jump_length,
                     progress=progress, mesh=mesh)
  except BaseException:
    _remove_created(created)
    raise
  result['output_dir'] = output_dir
  if parallel.is_main_process():
    write_outputs(output_dir, result, save_individual=save_individual)
  return result


def _sample(config, params, opts, *, step, inpainting, inpaint_resample, inpaint_jump_length,
            progress, mesh) -> dict[str, Any]:
  """The package's one sampling loop, on options validated by `_resolve`.

  Used by `sample_run` (the CLI), `generate` (`Run.sample`, the training grids).
  Returns dict(images, samples, labels, psnr) as `sample_run` documents.
  """
  size, channels = int(config.data.image_size), int(config.data.channels)
  num_classes = int(config.model.num_classes)
  rep = parallel.replicated(mesh)
  model = factories.create_model(config)
  model_fn = models.make_model_fn(model, jax.device_put(params, rep))
  if opts['guidance_scale'] > 0:
    model_fn = samplers.classifier_free_guidance(model_fn, opts['guidance_scale'],
                                                 model.config.cond_spec())

  try:
    types = factories.diffusion_types(config)
    plan = samplers.make_sampler(
        factories.schedule(config), sampler=opts['sampler'],
        num_steps=opts['steps'], eta=opts['eta'], model_mean_type=types['model_mean_type'],
        model_var_type=types['model_var_type'],
        clip_denoised=bool(config.sampling.clip_denoised),
        repaint_resample=inpaint_resample if inpainting is not None else 1,
        repaint_jump_length=inpaint_jump_length)
  except ValueError as e:  # e.g. a config.json whose diffusion settings are invalid
    raise SampleError(f'cannot build the sampler: {e}') from None
  plan = jax.device_put(plan, rep)

  batch = opts['batch_size']
  shape = (batch, size, size, channels)

  def init(key, label_key):
    cond = {}
    if num_classes:
      if opts['class_label'] is not None:
        cond['label'] = jnp.full((batch,), opts['class_label'], jnp.int32)
      else:
        cond['label'] = jax.random.randint(label_key, (batch,), 0, num_classes, jnp.int32)
    known = masks = None
    if inpainting is not None:
      image, mask = inpainting
      known = jnp.broadcast_to(jnp.asarray(image, jnp.float32) / 127.5 - 1.0, shape)
      masks = jnp.broadcast_to(jnp.asarray(mask), shape)
    return plan.init(key, shape, cond=cond, known=known, mask=masks)

  base_key = opts['key'] if opts.get('key') is not None else jax.random.key(opts['seed'])
  abstract = jax.eval_shape(init, base_key, base_key)
  init_jit = jax.jit(init, out_shardings=_state_shardings(abstract, mesh))
  leaves, treedef = jax.tree.flatten(abstract)
  run_chunk = _compiled_run_chunk(mesh, treedef, tuple(a.ndim for a in leaves))

  num_batches = math.ceil(opts['num_samples'] / batch)
  bar = None
  if progress and parallel.is_main_process():
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=num_batches * plan.num_ops, unit='step', desc='sampling')
  outputs, labels = [], []
  for b in range(num_batches):
    key = jax.random.fold_in(base_key, b)
    state = init_jit(key, jax.random.fold_in(key, 1))
    if num_classes:
      labels.append(parallel.fetch(state.cond['label']))
    for start in plan.chunk_starts:
      state, _ = run_chunk(plan, model_fn, state, start)
      if bar is not None:
        state.x.block_until_ready()
        bar.update(min(plan.chunk_length, plan.num_ops - start))
    outputs.append(parallel.fetch(state.x))
  if bar is not None:
    bar.close()

  n = opts['num_samples']
  samples = np.concatenate(outputs)[:n]
  _check_finite(samples, step)
  images = images_lib.to_uint8(samples)
  result = dict(images=images, samples=samples, labels=None, psnr=None)
  if num_classes:
    result['labels'] = np.concatenate(labels)[:n]
  if inpainting is not None:
    image, mask = inpainting
    result['psnr'] = np.asarray(samplers.masked_psnr(images, image[None], mask[None],
                                                     data_range=255.0))
  return result


def write_outputs(output_dir: str, result: dict[str, Any], *, save_individual: bool) -> None:
  """samples.npz, grid.png, psnr.json (inpainting) and optionally images/NNNNNN.png.

  Raises:
    SampleError: a file could not be written (e.g. the disk is full).
  """
  try:
    os.makedirs(output_dir, exist_ok=True)
    arrays = {k: result[k] for k in ('images', 'labels', 'psnr') if result[k] is not None}
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
