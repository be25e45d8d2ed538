"""The options of a sampling call: arguments over a run's config.sampling, validated.

`resolve` turns `sample_run` / `generate`'s arguments into the options dict the sampling
loop (`jaxddpm.sample`) runs with; every bad value is a `SampleError` naming it, raised
before any loading or compiling.
"""

from __future__ import annotations

import math
from typing import Any

from absl import logging

from jaxddpm import control
from jaxddpm import factories
from jaxddpm.sample_io import SampleError


def solver_settings(config, *, solver, sampler, steps, eta, solver_options) -> dict:
  """`factories.solver_settings` of the arguments, checked by building the solver once
  (host-side, cheap), so that a bad option fails before any loading or compiling."""
  if solver is not None and sampler is not None and solver != sampler:
    raise SampleError(f'solver = {solver!r} and sampler = {sampler!r}: sampler is the old name '
                      'of solver; give one')
  name = solver if solver is not None else sampler
  options = dict(solver_options or {}, eta=eta)
  num_timesteps = config.diffusion.num_timesteps
  distilled = factories.is_distilled(config)
  if distilled and name not in (None, 'ddim'):
    raise SampleError(f'solver = {name!r}: a distilled student samples with its own DDIM '
                      'steps (leave --solver unset)')
  try:
    settings = factories.solver_settings(config, solver=name, steps=steps, **options)
    # Two, not one: a respaced schedule keeps at least two timesteps (`schedules.respace`);
    # a distilled student takes exactly its round's steps (checked by its solver).
    if not (distilled or 2 <= settings['steps'] <= num_timesteps):
      raise SampleError(f'steps = {settings["steps"]} must be in [2, {num_timesteps}] (the run '
                        f'was trained with {num_timesteps} diffusion timesteps)')
    if not 0.0 <= settings.get('eta', 0.0) <= 1.0:
      raise SampleError(f'eta = {settings["eta"]} must be in [0, 1]')
    built = factories.make_solver(config, settings)
  except ValueError as e:
    raise SampleError(str(e)) from None
  settings.update(nfe=built.nfe, grid_steps=built.grid.num_steps, multistep=built.multistep)
  return settings


def resolve(config, *, solver, sampler, steps, eta, solver_options, num_samples, batch_size,
             seed, class_label, guidance_scale, mesh_size, classifier_workdir=None,
             classifier_scale=None) -> dict[str, Any]:
  """Arguments over config.sampling defaults, validated. With classifier_workdir, the noisy
  classifier that guides (`control.load_classifier`) at classifier_scale (default 1)."""
  s = config.sampling
  opts = dict(
      settings=solver_settings(config, solver=solver, sampler=sampler, steps=steps, eta=eta,
                                solver_options=solver_options),
      num_samples=num_samples if num_samples is not None else s.num_samples,
      batch_size=batch_size if batch_size is not None else s.batch_size,
      seed=seed if seed is not None else config.seed,
      guidance_scale=float(guidance_scale if guidance_scale is not None
                           else s.get('guidance_scale', 0.0)),
      class_label=class_label)
  opts.update(solver=opts['settings']['solver'], steps=opts['settings']['steps'])
  num_classes = int(config.model.num_classes)
  for name in ('num_samples', 'batch_size'):
    if opts[name] < 1:
      raise SampleError(f'{name} = {opts[name]} must be positive')
  opts['classifier'] = None
  opts['classifier_scale'] = float(1.0 if classifier_scale is None else classifier_scale)
  if classifier_workdir:
    if not opts['classifier_scale'] >= 0:
      raise SampleError(f'classifier_scale = {classifier_scale} must be >= 0')
    opts['classifier'] = control.load_classifier(classifier_workdir, config)
    control.check_label(class_label, opts['classifier'], num_classes)
  elif classifier_scale is not None:
    raise SampleError('classifier_scale needs classifier_workdir (the noisy classifier run)')
  if class_label is not None and opts['classifier'] is None:
    if num_classes == 0:
      raise SampleError(f'class_label = {class_label} given, but the model is unconditional '
                        '(model.num_classes = 0; guide it with a noisy classifier: '
                        'classifier_workdir)')
    if not 0 <= class_label < num_classes:
      raise SampleError(f'class_label = {class_label} is out of range [0, {num_classes})')
  if opts['guidance_scale'] < 0:
    raise SampleError(f'guidance_scale = {opts["guidance_scale"]} must be >= 0')
  spec = factories.create_model(config).config.cond_spec()
  guided = [k for k, kind in spec.items() if kind.guided]
  if opts['guidance_scale'] > 0 and not guided:
    raise SampleError('classifier-free guidance needs a conditional model (class labels or '
                      'text); this one is unconditional')
  if opts['guidance_scale'] > 0 and not any(spec[k].dropout > 0 for k in guided):
    logging.warning('guidance_scale > 0, but the model was trained without condition dropout '
                    '(model.class_dropout / text.caption_dropout = 0): its null prediction '
                    'is untrained.')
  # Every device gets the same share of a batch; round up, the extra samples are dropped.
  batch = min(opts['batch_size'], opts['num_samples'])
  opts['batch_size'] = math.ceil(batch / mesh_size) * mesh_size
  return opts
