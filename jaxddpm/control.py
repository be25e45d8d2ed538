"""Controllable generation in the sampling shell: classifier guidance and composition.

The core wrappers are `jaxddpm.solvers.classifier_guidance` (Dhariwal & Nichol 2021) and
`jaxddpm.solvers.composition` (Liu et al. 2022); this module builds them from a sampling
call's arguments:

  * classifier guidance from a trained noisy-classifier run (`configs/digits_classifier.py`):
    `load_classifier` reads it and checks that it fits the run it guides (image shape and
    diffusion schedule); `guide_model_fn` wraps the model function with the eps shift
    (DDIM and the ODE solvers), `guide_solver` wraps ancestral DDPM with the mean shift
    (Algorithm 1). The class y goes into the conditioning pytree as 'classifier_label'.
  * composition of N prompts or N labels with weights (AND: positive, NOT: negative), all
    N + 1 predictions in one batched model call: `composition_inputs` stacks the conditions
    on axis 1 ([num_samples, N, ...]); `compose_model_fn` wraps the model function.
  * MCMC correctors at every noise level (Du et al. 2023; `jaxddpm.solvers.correctors`):
    `corrector_options` validates them before anything is loaded, `correct_solver` wraps the
    solver, with the (composed) energy of an energy-parameterised model for the
    Metropolis-adjusted 'mala' / 'mhmc'.

Every bad argument is one `SampleError` naming it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import factories
from jaxddpm import models
from jaxddpm import prompts as prompts_lib
from jaxddpm import runs
from jaxddpm import solvers
from jaxddpm.data import text as text_data
from jaxddpm.sample_io import SampleError
from jaxddpm.solvers import ddpm as ddpm_lib

LABEL = solvers.classifier_guidance.CLASSIFIER_LABEL
# The keys of a sampling call's `control` dict (`jaxddpm.sample.sample_run`).
CORRECTOR_ARGS = ('corrector', 'corrector_steps', 'corrector_step_scale', 'corrector_leapfrog')
ARGS = ('classifier_workdir', 'classifier_scale', 'prompt_weights', 'compose_labels',
        'label_weights') + CORRECTOR_ARGS


def load_classifier(workdir: str, run_config) -> dict[str, Any]:
  """The noisy classifier of `workdir` (its newest checkpoint's EMA parameters) for guiding
  the run of `run_config`: dict(fn=classifier_fn(x, t) -> logits [B, K], a `Partial`;
  num_classes=K; workdir).

  Raises:
    SampleError: no run there, not a classifier run, or one whose image shape or diffusion
      schedule differ from the guided run's (its gradients would be of another x_t).
  """
  try:
    config, params, fn = runs.load_run(workdir)
  except (FileNotFoundError, ValueError) as e:
    raise SampleError(f'--classifier_workdir: {e}') from None
  if not factories.is_classifier(config):
    raise SampleError(f'--classifier_workdir={workdir!r} is a {factories.model_name(config)!r} '
                      "run, not a noisy classifier (model.name 'noisy_classifier', e.g. "
                      'configs/digits_classifier.py)')
  if factories.is_distilled(run_config):
    raise SampleError('classifier guidance needs the trained schedule of the guided model; a '
                      'distilled student samples on its own grid: guide its teacher instead')
  if factories.image_shape(config) != factories.image_shape(run_config):
    raise SampleError(f'the classifier in {workdir!r} takes images of shape '
                      f'{factories.image_shape(config)}, the guided run makes '
                      f'{factories.image_shape(run_config)}')
  mine, theirs = factories.schedule(config), factories.schedule(run_config)
  if mine.num_timesteps != theirs.num_timesteps or not np.allclose(
      np.asarray(mine.alphas_cumprod64), np.asarray(theirs.alphas_cumprod64), rtol=1e-9):
    raise SampleError(f'the classifier in {workdir!r} was trained on another diffusion schedule '
                      '(config.diffusion) than the guided run: its x_t are not the model\'s')
  return dict(fn=fn, num_classes=int(config.model.num_classes), workdir=workdir)


def check_label(class_label: int | None, classifier: dict[str, Any], num_classes: int) -> None:
  """A requested class must be one of the classifier's (and, for a class-conditional model,
  one of the model's: guided-diffusion's "conditional + classifier" asks both for y)."""
  k = classifier['num_classes']
  if num_classes and num_classes != k:
    raise SampleError(f'the model has {num_classes} classes and the classifier {k}: guiding a '
                      'class-conditional model needs the same classes')
  if class_label is not None and not 0 <= class_label < k:
    raise SampleError(f'class_label = {class_label} is out of the classifier\'s range [0, {k})')


def guide_model_fn(config, model_fn, opts):
  """model_fn with the eps shift of opts['classifier'] at opts['classifier_scale'] (any
  solver but ancestral DDPM, which `guide_solver` shifts); model_fn itself without one."""
  classifier = opts.get('classifier')
  if classifier is None or opts['solver'] == 'ddpm':
    return model_fn
  return solvers.classifier_guided(
      model_fn, classifier['fn'], factories.schedule(config), opts['classifier_scale'],
      model_mean_type=factories.diffusion_types(config)['model_mean_type'])


def guide_solver(solver, opts):
  """Ancestral DDPM with the classifier's mean shift (Algorithm 1); other solvers as given."""
  classifier = opts.get('classifier')
  if classifier is None or not isinstance(solver, ddpm_lib.DDPM):
    return solver
  return solvers.classifier_mean_shift(solver, classifier['fn'], opts['classifier_scale'])


def add_label(cond: dict, opts, label_key: jax.Array, batch: int) -> dict:
  """cond with 'classifier_label' [batch]: the model's own label when it has one, else
  opts['class_label'] or classes drawn uniformly from label_key."""
  classifier = opts.get('classifier')
  if classifier is None:
    return cond
  if 'label' in cond and cond['label'].ndim == 1:
    y = cond['label']
  elif opts['class_label'] is not None:
    y = jnp.full((batch,), opts['class_label'], jnp.int32)
  else:
    y = jax.random.randint(label_key, (batch,), 0, classifier['num_classes'], jnp.int32)
  return dict(cond, **{LABEL: y})


def parse_weights(text, count: int, what: str) -> list[float] | None:
  """'1,1' -> [1.0, 1.0] (count of them; None / '' -> None)."""
  if text is None or text == '' or text == []:
    return None
  values = text.split(',') if isinstance(text, str) else list(text)
  try:
    weights = [float(v) for v in values]
  except ValueError:
    raise SampleError(f'{what} = {text!r}: give comma-separated numbers, e.g. 1,1') from None
  if len(weights) != count:
    raise SampleError(f'{what} has {len(weights)} weights for {count} conditions')
  return weights


def composition_inputs(config, workdir: str | None, *, prompts: Sequence[str] | None,
                       prompt_weights, labels: Sequence[int] | None, label_weights,
                       negative_prompt: str | None, guidance_scale: float, num_samples: int,
                       tokenizer=None) -> dict[str, Any]:
  """The composed conditions of a sampling call, or {} when nothing is composed.

  Prompts compose only when prompt_weights is given (without it several prompts are one
  prompt per sample, the text models' default); compose_labels composes labels.
  Returns dict(compose_weights [N], compose_prompts (the N prompts, for samples.npz, or
  None), prompts=None, and 'tokens' int32 [num_samples, N, L] (+ 'negative_tokens'
  [num_samples, L]) or 'labels' int32 [num_samples, N]).
  """
  composing_prompts = prompt_weights not in (None, '', [])
  if composing_prompts and not prompts:
    raise SampleError('prompt_weights needs prompts (the conditions they weigh)')
  if not composing_prompts and not labels:
    if label_weights not in (None, ''):
      raise SampleError('label_weights needs compose_labels (the labels they weigh)')
    return {}
  if composing_prompts and labels:
    raise SampleError('compose prompts or labels, not both')
  if guidance_scale > 0:
    raise SampleError('a composition carries its own guidance (one condition with weight '
                      '1 + w is classifier-free guidance w): leave guidance_scale at 0')
  spec = factories.create_model(config).config.cond_spec()
  if composing_prompts:
    if 'tokens' not in spec:
      raise SampleError('prompts given, but this run has no text conditioning')
    weights = parse_weights(prompt_weights, len(prompts), 'prompt_weights') or [1.0] * len(prompts)
    if tokenizer is None:
      tokenizer = prompts_lib.load_tokenizer(config, workdir or '')
    length = int(config.data.max_text_length)
    tokens = np.stack([text_data.encode(tokenizer, [p] * num_samples, length) for p in prompts], 1)
    out = dict(compose_weights=weights, prompts=None, compose_prompts=list(prompts),
               tokens=tokens)
    if negative_prompt is not None:
      out['negative_tokens'] = text_data.encode(tokenizer, [negative_prompt] * num_samples, length)
    return out
  num_classes = int(config.model.num_classes)
  if 'label' not in spec:
    raise SampleError('compose_labels given, but the model is not class-conditional')
  if negative_prompt is not None:
    raise SampleError('a negative prompt needs a text model')
  bad = [y for y in labels if not 0 <= y < num_classes]
  if bad:
    raise SampleError(f'compose_labels {bad} are out of range [0, {num_classes})')
  weights = parse_weights(label_weights, len(labels), 'label_weights') or [1.0] * len(labels)
  return dict(compose_weights=weights, prompts=None, compose_prompts=None,
              labels=np.tile(np.asarray(labels, np.int32)[None], (num_samples, 1)))


def compose_model_fn(config, model_fn, opts):
  """model_fn composed with opts['compose_weights'] (`solvers.compose`), when given."""
  weights = opts.get('compose_weights')
  if weights is None:
    return model_fn
  spec = factories.create_model(config).config.cond_spec()
  return solvers.compose(model_fn, jnp.asarray(weights, jnp.float32), spec)



def corrector_options(config, opts, control_args: dict) -> dict[str, Any] | None:
  """The corrector of a sampling call, validated before anything is loaded: None, or
  dict(method, num_steps, step_scale, num_leapfrog) for `solvers.with_correctors`.

  The corrector's score is the model function's (composed, or classifier-free or
  classifier guided by the eps shift); the mean shift of ancestral DDPM is not a score, and
  the Metropolis-adjusted methods need an energy for exactly what is sampled, which exists
  for an energy-parameterised model, alone or composed.
  """
  method = control_args.get('corrector')
  given = sorted(k for k in CORRECTOR_ARGS[1:] if control_args.get(k) is not None)
  if not method:
    if given:
      raise SampleError(f'{", ".join(given)} need corrector (one of '
                        f'{solvers.correctors.METHODS})')
    return None
  if method not in solvers.correctors.METHODS:
    raise SampleError(f'unknown corrector {method!r}; expected one of '
                      f'{solvers.correctors.METHODS}')
  if factories.is_distilled(config):
    raise SampleError('correctors need the trained schedule; a distilled student samples on '
                      'its own grid')
  defaults = dict(corrector_steps=1, corrector_step_scale=0.1, corrector_leapfrog=3)
  value = {k: v if control_args.get(k) is None else control_args[k] for k, v in defaults.items()}
  spec = dict(method=method, num_steps=int(value['corrector_steps']),
              step_scale=float(value['corrector_step_scale']),
              num_leapfrog=int(value['corrector_leapfrog']))
  adjusted = method in solvers.correctors.ADJUSTED
  if adjusted and not config.model.get('energy', False):
    raise SampleError(f'corrector {method!r} weighs proposals by the energy, which needs an '
                      'energy-parameterised model (model.energy = True); use ula or hmc')
  if opts.get('classifier') is not None and (adjusted or opts['solver'] == 'ddpm'):
    raise SampleError('correctors with classifier guidance follow the eps shift: use ula or '
                      'hmc with a solver other than ddpm (e.g. --solver=ddim)')
  if adjusted and opts['guidance_scale'] > 0:
    raise SampleError(f'corrector {method!r} needs the energy of what is sampled: write '
                      'classifier-free guidance w as a composition of one condition with '
                      'weight 1 + w (compose_labels / prompt_weights), or use ula or hmc')
  try:  # host-side: the solver's own checks (a multistep history), before any loading
    solvers.with_correctors(factories.make_solver(config, opts['settings']), **spec,
                            energy_fn=(lambda x, t, cond: x) if adjusted else None)
  except ValueError as e:
    raise SampleError(f'corrector: {e}') from None
  return spec


def correct_solver(config, solver, opts, params):
  """`solver` with opts['corrector']'s MCMC steps at every level (none: solver itself); the
  energy of 'mala' / 'mhmc' is the model's, composed like the model function."""
  spec = opts.get('corrector')
  if spec is None:
    return solver
  energy_fn = None
  if spec['method'] in solvers.correctors.ADJUSTED:
    model = factories.create_model(config)
    energy_fn = models.make_energy_fn(model, params)
    if opts.get('compose_weights') is not None:
      energy_fn = solvers.compose_energy(energy_fn, jnp.asarray(opts['compose_weights'],
                                                                jnp.float32),
                                         model.config.cond_spec())
  return solvers.with_correctors(solver, **spec, energy_fn=energy_fn)
