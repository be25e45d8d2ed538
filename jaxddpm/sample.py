"""Sampling from a trained run: the shell around `jaxddpm.solvers`.

`sample_run(workdir, ...)` loads the run (config.json + the latest checkpoint's
EMA parameters), builds the solver from config.sampling (arguments override
it), splits each batch of samples over a 1-D 'data' mesh of all devices of all
processes, runs the plan chunk by chunk under a progress bar, checks that every
sample is finite, and writes samples.npz, grid.png (and psnr.json, images/) into
an output dir (`jaxddpm.sample_io`). The output dir is created and test-written
before any sampling, so an unwritable path fails in seconds, not after the
sampling. Nothing is written when a sample is NaN/Inf (a damaged checkpoint or
a diverged run).

Batch b starts from fold_in(PRNGKey(seed), b), and the random numbers of a
sharded array do not depend on the number of devices, so a seed gives the same
samples on 1 or 8 devices (to float32 rounding of the network). Bad input raises
`SampleError` with one clear message.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import checkpoint
from jaxddpm import control
from jaxddpm import distill_layout
from jaxddpm import factories
from jaxddpm import images as images_lib
from jaxddpm import models
from jaxddpm import parallel
from jaxddpm import prompts as prompts_lib
from jaxddpm import runs
from jaxddpm import runtime
from jaxddpm import sample_io
from jaxddpm import sample_options
from jaxddpm import solvers
from jaxddpm.diffusion import superres
from jaxddpm.sample_io import SampleError


def _read_config(workdir: str):
  """The run's config; SampleError when it has none or no checkpoint."""
  try:
    config = runs.read_config(workdir)
  except (FileNotFoundError, ValueError) as e:  # ValueError: config.json is not JSON
    raise SampleError(str(e)) from None
  if not checkpoint.saved_steps(workdir):
    raise SampleError(f'no checkpoint in {checkpoint.checkpoint_dir(workdir)}; train first '
                      '(run_train.py) or convert weights into this workdir')
  return config


_solver_settings = sample_options.solver_settings
_resolve = sample_options.resolve


def _state_shardings(abstract_state, mesh) -> Any:
  """Arrays with a batch dimension split on 'data', the key replicated."""
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.tree.map(lambda a: data if a.ndim else rep, abstract_state)


@functools.lru_cache(maxsize=16)
def _compiled_run_chunk(mesh, state_treedef, leaf_ndims):
  """`solvers.run_chunk` jitted for one mesh and state structure (cached across calls).

  The plan and the model function are pytree arguments, replicated (not constants baked
  into the program); the state is split over 'data' and donated, so x is updated in place.
  """
  rep = parallel.replicated(mesh)
  state_sharding = jax.tree.unflatten(state_treedef, [
      parallel.data_sharding(mesh) if ndim else rep for ndim in leaf_ndims])
  return jax.jit(solvers.run_chunk, in_shardings=(rep, rep, state_sharding, rep),
                 out_shardings=(state_sharding, None), donate_argnums=2,
                 compiler_options=runtime.step_compiler_options())


class Run(NamedTuple):
  """A trained or converted run in memory, as `jaxddpm.load_run` returns it.

    run = jaxddpm.load_run('runs/digits')
    images = run.sample(16, solver='ddim', steps=50, seed=0)   # uint8 [16, H, W, C]
    config, params, model_fn = run                              # the parts, as before

  model_fn(x, t, cond={}) is the network (eval mode) as a `Partial` over params.
  """
  config: Any
  params: Any
  model_fn: Any

  def sample(self, num_samples: int, *, solver: str | None = None, steps: int | None = None,
             eta: float | None = None, seed: int | None = None, class_label: int | None = None,
             guidance_scale: float | None = None, batch_size: int | None = None,
             progress: bool = False, mesh=None, **solver_options) -> np.ndarray:
    """`num_samples` images, uint8 [N, H, W, C], by the loop of `sample_run` (same seed, same
    images as run_sample.py with the same settings); arguments left None come from
    config.sampling. solver: a name in `solvers.SOLVERS`; steps: model evaluations;
    solver_options: spacing, order, s_churn, s_tmin, s_tmax, s_noise, thresholding
    (`factories.SOLVER_OPTIONS`). Raises SampleError for bad arguments."""
    return generate(self.config, self.params, num_samples=num_samples, solver=solver,
                    steps=steps, eta=eta, seed=seed, class_label=class_label,
                    guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
                    mesh=mesh, solver_options=solver_options)['images']


def generate(config, params, *, num_samples: int, solver: str | None = None,
             steps: int | None = None, eta: float | None = None, seed: int | None = None,
             class_label: int | None = None, guidance_scale: float | None = None,
             batch_size: int | None = None, key: jax.Array | None = None,
             progress: bool = False, mesh=None, sampler: str | None = None,
             solver_options: dict | None = None, low_res=None,
             aug_level: float | None = None, prompts=None, negative_prompt: str | None = None,
             tokenizer=None, control: dict | None = None) -> dict[str, Any]:
  """Samples of the network `config` describes with `params` (no workdir needed).

  Arguments as `sample_run`'s (None: config.sampling's); `key`, when given, replaces
  key(seed) as the base key (batch b draws from fold_in(key, b)). A super-resolution model
  (config.data.low_res_size > 0) takes low_res, uint8 [num_samples, h, w, C] (sample i
  upscales low_res[i]), noised to aug_level (default config.sampling.aug_level;
  `jaxddpm.diffusion.superres`) from fold_in(fold_in(key, b), 2). A text model takes
  prompts (one for all samples, or one each) and a negative prompt, tokenized by
  `tokenizer` (`jaxddpm.prompts`). Returns dict(images uint8
  [N, H, W, C], samples float32 [N, H, W, C] in [-1, 1] (unclipped), labels [N] or None,
  nfe: the model evaluations per sample). All processes must call it (the parameters may be
  global arrays).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  opts = _options(config, None, control, prompts, negative_prompt, tokenizer, solver=solver,
                  sampler=sampler, steps=steps, eta=eta, solver_options=solver_options,
                  num_samples=num_samples, batch_size=batch_size, seed=seed,
                  class_label=class_label, guidance_scale=guidance_scale, mesh_size=mesh.size)
  opts['key'] = key
  opts.update(sample_io.low_res_inputs(config, low_res, aug_level, opts['num_samples']))
  return _sample(config, params, opts, step=None, inpainting=None, inpaint_resample=1,
                 inpaint_jump_length=10, progress=progress, mesh=mesh)


def load_run(workdir: str, *, ema: bool = True, step: int | None = None) -> Run:
  """The run in `workdir` (config.json + the newest good checkpoint; `runs.load_run`) as a
  `Run`; for a distillation workdir, its student with the fewest steps
  (`distill_layout.resolve_workdir`)."""
  return Run(*runs.load_run(_round(workdir, None), ema=ema, step=step))


def _round(workdir: str, steps: int | None) -> str:
  """`workdir`, or the round of a distillation workdir distilled for `steps` steps."""
  try:
    return distill_layout.resolve_workdir(workdir, steps)
  except distill_layout.DistillError as e:
    raise SampleError(str(e)) from None


def _load_ema(workdir: str):
  """(config, EMA params, step) of the newest good checkpoint (`runs.load_run_and_step`)."""
  try:
    config, params, _, step = runs.load_run_and_step(workdir, ema=True)
  except (FileNotFoundError, ValueError) as e:
    raise SampleError(str(e)) from None
  return config, params, step


def sample_run(workdir: str, *, solver: str | None = None, steps: int | None = None,
               eta: float | None = None, solver_options: dict | None = None,
               sampler: str | None = None, num_samples: int | None = None,
               batch_size: int | None = None, seed: int | None = None,
               class_label: int | None = None, guidance_scale: float | None = None,
               inpaint_image: str | None = None, inpaint_mask: str | None = None,
               inpaint_resample: int = 1, inpaint_jump_length: int = 10,
               output_dir: str | None = None, save_individual: bool = False,
               progress: bool = True, mesh=None, prompts=None,
               negative_prompt: str | None = None, control: dict | None = None
               ) -> dict[str, Any]:
  """Samples from the latest checkpoint (EMA parameters) of the run in `workdir`.

  Args (None: the run's config.sampling value, and config.seed):
    workdir: a run directory (config.json + checkpoints/).
    solver, steps: a name in `solvers.SOLVERS` (`sampler`: its old name) and its model
      evaluations (NFE) in [2, T] and at least `solvers.min_steps(solver)`; ddpm / ddim
      respace the schedule to that many steps, heun takes (steps + 1) // 2 sigmas and
      2N - 1 evaluations.
    eta, solver_options: DDIM's eta in [0, 1]; the options of `factories.SOLVER_OPTIONS`
      (spacing, order, s_churn, s_tmin, s_tmax, s_noise, thresholding). config.sampling's
      values apply to config.sampling's solver only; a solver given an option it does not
      take is an error.
    num_samples, batch_size: total samples and samples per compiled call (rounded up to a
      multiple of the number of devices). seed: PRNG seed.
    class_label: class of every sample (conditional models); None draws labels uniformly.
    guidance_scale: classifier-free guidance weight w (> 0 needs a conditional model).
    inpaint_image, inpaint_mask: image files of the model's size, white = keep; every sample
      fills the same image. inpaint_resample, inpaint_jump_length: RePaint's r and jump
      length (< steps when r > 1); r = 1 is the replacement method.
    output_dir: default `sample_io.default_output_dir`; must not hold earlier outputs.
    save_individual: also write one PNG per sample. progress: a progress bar (process 0).
    mesh: a 1-D 'data' mesh (default `parallel.make_mesh()`, all devices).
    prompts, negative_prompt: text models: one prompt for every sample or one per sample
      (None: the empty prompt), and the prompt guidance steers away from (guidance_scale
      > 0); stored in samples.npz ('prompts'). Several prompts with control's prompt_weights
      are composed instead (`jaxddpm.control`).
    control: controllable generation (`jaxddpm.control`), a dict of any of
      classifier_workdir (a noisy classifier run that guides toward class_label, random
      classes when None) and classifier_scale (s, default 1); prompt_weights (one weight per
      prompt: AND for positive, NOT for negative weights); compose_labels (labels composed
      like prompts) and label_weights; corrector ('ula', 'hmc', or 'mala' / 'mhmc' for an
      energy-parameterised model), corrector_steps K (1), corrector_step_scale c (0.1) and
      corrector_leapfrog L (3): MCMC steps at every noise level (`solvers.with_correctors`).

  Returns:
    dict(images uint8 [N, H, W, C], samples float32 [N, H, W, C] in [-1, 1] (unclipped),
    labels [N] or None, psnr [N] or None, nfe, output_dir).

  Raises:
    SampleError: bad input, naming it; also a non-finite sample (then nothing is written).
  """
  workdir = _round(workdir, steps)
  config = _read_config(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  opts = _options(config, workdir, control, prompts, negative_prompt, None, solver=solver,
                  sampler=sampler, steps=steps, eta=eta, solver_options=solver_options,
                  num_samples=num_samples, batch_size=batch_size, seed=seed,
                  class_label=class_label, guidance_scale=guidance_scale, mesh_size=mesh.size)
  opts.update(sample_io.low_res_inputs(config, None, None, opts['num_samples']))
  repaint = dict(inpaint_resample=inpaint_resample, inpaint_jump_length=inpaint_jump_length)
  inpainting = sample_io.inpainting_inputs(config, opts['settings'], inpaint_image, inpaint_mask,
                                  **repaint)
  # Before naming the outputs: a damaged newest checkpoint makes this an older step.
  config, params, step = _load_ema(workdir)
  if output_dir is None:
    output_dir = sample_io.default_output_dir(workdir, opts, step=step, inpainting=inpainting,
                                              **repaint)
  # Every process checks, so that all of them stop together, before any collective.
  created = sample_io.prepare_output_dir(output_dir, create=parallel.is_main_process())
  try:
    result = _sample(config, params, opts, step=step, inpainting=inpainting, progress=progress,
                     mesh=mesh, **repaint)
  except BaseException:
    sample_io.remove_created(created)
    raise
  result['output_dir'] = output_dir
  result['prompts'] = opts['prompts']
  result['compose_weights'] = opts.get('compose_weights')
  result['compose_prompts'] = opts.get('compose_prompts')
  if parallel.is_main_process():
    sample_io.write_outputs(output_dir, result, save_individual=save_individual)
  return result


def _options(config, workdir, control_args, prompts, negative_prompt, tokenizer, **kwargs):
  """`sample_options.resolve` of the arguments, with the prompts' tokens, composed
  conditions and classifier (`jaxddpm.control`) of `control_args`."""
  c = dict(control_args or {})
  unknown = sorted(set(c) - set(control.ARGS))
  if unknown:
    raise SampleError(f'unknown control arguments {unknown}; expected some of {control.ARGS}')
  opts = _resolve(config, classifier_workdir=c.get('classifier_workdir'),
                  classifier_scale=c.get('classifier_scale'), **kwargs)
  composed = control.composition_inputs(
      config, workdir, prompts=prompts, prompt_weights=c.get('prompt_weights'),
      labels=c.get('compose_labels'), label_weights=c.get('label_weights'),
      negative_prompt=negative_prompt, guidance_scale=opts['guidance_scale'],
      num_samples=opts['num_samples'], tokenizer=tokenizer)
  if composed:
    opts.update(dict(tokens=None, negative_tokens=None), **composed)
  else:
    opts.update(prompts_lib.prompt_inputs(config, workdir, prompts, negative_prompt, opts,
                                          tokenizer=tokenizer))
  opts['corrector'] = control.corrector_options(config, opts, c)
  return opts


def _model_fn(config, params, opts, rep):
  """The network over replicated params: composed, or guided when guidance_scale > 0, and
  classifier-guided outermost (`jaxddpm.control`)."""
  model = factories.create_model(config)
  model_fn = models.make_model_fn(model, jax.device_put(params, rep))
  if opts.get('compose_weights') is not None:
    model_fn = control.compose_model_fn(config, model_fn, opts)
  elif opts['guidance_scale'] > 0:
    model_fn = solvers.classifier_free_guidance(model_fn, opts['guidance_scale'],
                                                model.config.cond_spec())
  # The classifier's parameters, replicated like the model's.
  return jax.device_put(control.guide_model_fn(config, model_fn, opts), rep)


def _plan(config, opts, inpainting, resample: int, jump_length: int,
          params=None) -> solvers.Plan:
  """The solver of opts (guided, with correctors: `jaxddpm.control`); with inpainting,
  wrapped in replacement and RePaint's plan. params: the model's, for an energy corrector."""
  solver = control.guide_solver(factories.make_solver(config, opts['settings']), opts)
  solver = control.correct_solver(config, solver, opts, params)
  if inpainting is None:
    return solvers.make_plan(solver)
  image, mask = inpainting
  known = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
  solver = solvers.inpainting.replacement(solver, known, mask[None])
  if resample == 1:  # the replacement method, any solver
    return solvers.make_plan(solver)
  return solvers.repaint.make_plan(solver, jump_length=jump_length, resample=resample)


def _init_fn(plan: solvers.Plan, opts, num_classes: int, shape):
  """init(key, label_key, given) -> the state of one batch: x_T, the labels, and the
  given conditioning (a super-resolution model's low_res, noised to opts['aug_level'])."""
  batch = shape[0]

  def init(key, label_key, given):
    cond = {}
    if 'low_res' in given:
      low_res = {'low_res': given['low_res'].astype(jnp.float32) / 127.5 - 1.0}
      cond.update(superres.augment(low_res, opts['aug_level'], jax.random.fold_in(key, 2)))
    for name in ('tokens', 'negative_tokens'):
      if name in given:
        cond[name] = jnp.asarray(given[name], jnp.int32)
    if 'labels' in given:  # composed labels, [B, N]
      cond['label'] = jnp.asarray(given['labels'], jnp.int32)
    elif num_classes:
      if opts['class_label'] is not None:
        cond['label'] = jnp.full((batch,), opts['class_label'], jnp.int32)
      else:
        cond['label'] = jax.random.randint(label_key, (batch,), 0, num_classes, jnp.int32)
    cond = control.add_label(cond, opts, label_key, batch)
    return plan.init(key, shape, cond=cond)

  return init


def _progress_bar(progress: bool, total: int):
  if not (progress and parallel.is_main_process()):
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, unit='step', desc='sampling')


def _sample(config, params, opts, *, step, inpainting, inpaint_resample, inpaint_jump_length,
            progress, mesh) -> dict[str, Any]:
  """The package's one sampling loop, on options validated by `_resolve`.

  Used by `sample_run` (the CLI), `generate` (`Run.sample`, the training grids).
  Returns dict(images, samples, labels, psnr) as `sample_run` documents.
  """
  shape = factories.image_shape(config)
  num_classes = int(config.model.num_classes)
  rep = parallel.replicated(mesh)
  model_fn = _model_fn(config, params, opts, rep)
  plan = jax.device_put(_plan(config, opts, inpainting, inpaint_resample, inpaint_jump_length,
                              params), rep)
  init = _init_fn(plan, opts, num_classes, (opts['batch_size'], *shape))
  base_key = opts['key'] if opts.get('key') is not None else jax.random.key(opts['seed'])
  given = functools.partial(_given, opts)
  abstract = jax.eval_shape(init, base_key, base_key, given(0))
  init_jit = jax.jit(init, out_shardings=_state_shardings(abstract, mesh))
  leaves, treedef = jax.tree.flatten(abstract)
  run_chunk = _compiled_run_chunk(mesh, treedef, tuple(a.ndim for a in leaves))

  residual = factories.sr_residual(config)
  num_batches = math.ceil(opts['num_samples'] / opts['batch_size'])
  bar = _progress_bar(progress, num_batches * plan.num_ops)
  outputs, labels = [], []
  for b in range(num_batches):
    key = jax.random.fold_in(base_key, b)
    state = init_jit(key, jax.random.fold_in(key, 1), given(b))
    for name in (control.LABEL, 'label'):  # the class asked for: the classifier's first
      if name in state.cond:
        labels.append(parallel.fetch(state.cond[name]))
        break
    for start in plan.chunk_starts:
      state, _ = run_chunk(plan, model_fn, state, start)
      if bar is not None:
        state.x.block_until_ready()
        bar.update(min(plan.chunk_length, plan.num_ops - start))
    x = state.x
    if residual:
      x = superres.from_residual(x, jnp.asarray(given(b)['low_res'], jnp.float32) / 127.5 - 1.0,
                                 scale=factories.sr_residual_scale(config))
    outputs.append(parallel.fetch(x))
  if bar is not None:
    bar.close()
  result = _result(outputs, labels, opts['num_samples'], step, inpainting)
  result['nfe'] = plan.solver.nfe if opts.get('corrector') else opts['settings']['nfe']
  return result


def _given(opts, b: int) -> dict[str, np.ndarray]:
  """Batch b's share of the inputs given per sample: 'low_res' uint8 [B, h, w, C], 'tokens'
  and 'negative_tokens' int32 [B, L], those given (the last batch padded by repeating its
  last input)."""
  size = opts['batch_size']
  out = {}
  for name in ('low_res', 'tokens', 'negative_tokens', 'labels'):
    if opts.get(name) is not None:
      rows = np.minimum(np.arange(b * size, (b + 1) * size), len(opts[name]) - 1)
      out[name] = opts[name][rows]
  return out


def _result(outputs, labels, n: int, step, inpainting) -> dict[str, Any]:
  """dict(images, samples, labels, psnr) of the first n samples; SampleError if not finite."""
  samples = np.concatenate(outputs)[:n]
  sample_io.check_finite(samples, step)
  images = images_lib.to_uint8(samples)
  result = dict(images=images, samples=samples, labels=None, psnr=None)
  if labels:
    result['labels'] = np.concatenate(labels)[:n]
  if inpainting is not None:
    image, mask = inpainting
    result['psnr'] = np.asarray(solvers.masked_psnr(images, image[None], mask[None],
                                                    data_range=255.0))
  return result
