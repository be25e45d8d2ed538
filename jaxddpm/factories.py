"""A run's ConfigDict -> the core's typed objects: the one place that reads a config for them.

The core (schedules, diffusion, objectives, solvers, models) takes typed values
and dataclasses; the shell (training, sampling, evaluation, the CLIs) builds
them here from `config.diffusion`, `config.model`, `config.data` and `config.sampling`.
"""

from __future__ import annotations

import json

import flax.linen as nn

from jaxddpm import config_utils
from jaxddpm import diffusion
from jaxddpm import distillation
from jaxddpm.diffusion import superres
from jaxddpm import models
from jaxddpm import objectives
from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm import timesteps


def schedule(config) -> schedules.Schedule:
  """The `Schedule` of a run config (`config.diffusion`: num_timesteps, beta_schedule,
  beta_start, beta_end, and optionally cosine_s, max_beta)."""
  d = config.diffusion
  kw = {k: d[k] for k in ('cosine_s', 'max_beta') if k in d}
  return schedules.make_schedule(d.beta_schedule, d.num_timesteps, beta_start=d.beta_start,
                                 beta_end=d.beta_end, **kw)


def diffusion_types(config) -> dict[str, str]:
  """dict(model_mean_type, model_var_type, loss_type) of a run config's `config.diffusion`.

  Raises:
    ValueError: naming the field and the bad value.
  """
  d = config.diffusion
  types = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
               loss_type=d.loss_type)
  diffusion.check_types(**types)
  return types


def model_name(config) -> str:
  return str(config.model.get('name', 'unet'))


def _unet_config(config) -> models.UNetConfig:
  m = config.model
  channels = int(config.data.channels)
  return models.UNetConfig(
      image_size=int(config.data.image_size),
      in_channels=channels,
      out_channels=diffusion.model_output_channels(channels, config.diffusion.model_var_type),
      ch=m.ch,
      ch_mult=m.ch_mult,
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions,
      dropout=m.dropout,
      num_classes=m.num_classes,
      class_dropout=m.class_dropout,
      num_heads=m.num_heads,
      num_head_channels=m.get('num_head_channels', 0),
      resblock_updown=m.resblock_updown,
      resamp_with_conv=m.resamp_with_conv,
      norm_groups=m.norm_groups,
      norm_eps=m.norm_eps,
      flip_sin_to_cos=m.get('flip_sin_to_cos', False),
      freq_shift=m.get('freq_shift', 1.0),
      downsample_padding=m.get('downsample_padding', 'same'),
      dtype=m.dtype,
      remat=m.remat,
      ignore_cond_keys=tuple(m.get('ignore_cond_keys', ())),
      low_res_size=low_res_size(config),
      image_width=int(config.data.get('image_width', 0)),
      text=text_config(config),
      energy=bool(m.get('energy', False)),
  )


def text_encoder(config) -> str:
  """config.model.text.encoder: '' (no text), 'transformer' or 'clip'."""
  text = config.model.get('text')
  return str(text.get('encoder', '')) if text else ''


def text_config(config) -> models.TextConfig | None:
  """The text encoder's typed config, or None without one.

  vocab_size and null_tokens come from the run's tokenizer (`jaxddpm.prompts`), which the
  training shell writes into the config before the model is built; so does a 'clip' run's
  architecture (model.text.clip_arch, the JSON of a `models.CLIPTextConfig`).
  """
  kind = text_encoder(config)
  if not kind:
    return None
  t = config.model.text
  if int(t.vocab_size) < 1:
    raise ValueError('model.text.vocab_size is unset: the tokenizer of this run was not '
                     'prepared (jaxddpm.prompts.prepare_text)')
  clip = None
  if kind == 'clip':
    if not str(t.get('clip_arch', '')):
      raise ValueError('model.text.clip_arch is unset: the CLIP encoder of this run was not '
                       'loaded (jaxddpm.prompts.prepare_text)')
    clip = models.CLIPTextConfig(**json.loads(str(t.clip_arch)))
  return models.TextConfig(
      vocab_size=int(t.vocab_size), max_length=int(config.data.max_text_length),
      width=int(t.width), num_layers=int(t.num_layers), num_heads=int(t.num_heads),
      null_tokens=tuple(t.null_tokens), caption_dropout=float(t.caption_dropout), clip=clip)


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the run's images: data.image_size high, data.image_width (0: square) wide."""
  d = config.data
  size = int(d.image_size)
  return size, int(d.get('image_width', 0)) or size, int(d.channels)


def low_res_size(config) -> int:
  """config.data.low_res_size: 0, or the side of a super-resolution model's input."""
  return int(config.data.get('low_res_size', 0))


def _classifier_config(config) -> models.ClassifierConfig:
  """The noisy classifier's config (`models.ClassifierConfig`): the U-Net's fields of
  config.model for its encoder half, K = model.num_classes, pool = model.pool."""
  m = config.model
  return models.ClassifierConfig(
      image_size=int(config.data.image_size), image_width=int(config.data.get('image_width', 0)),
      in_channels=int(config.data.channels), num_classes=int(m.num_classes), ch=m.ch,
      ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks, attn_resolutions=m.attn_resolutions,
      dropout=m.dropout, num_heads=m.num_heads, num_head_channels=m.get('num_head_channels', 0),
      resamp_with_conv=m.resamp_with_conv, norm_groups=m.norm_groups, norm_eps=m.norm_eps,
      dtype=m.dtype, pool=str(m.get('pool', 'attention')),
      pool_head_channels=int(m.get('pool_head_channels', 64)))


# One builder per registered model name: config.model (+ data, diffusion) -> its typed config.
_MODEL_CONFIGS = {'unet': _unet_config, 'noisy_classifier': _classifier_config}


def is_classifier(config) -> bool:
  """Whether the run trains a noisy classifier (model.name 'noisy_classifier'), not a denoiser."""
  return model_name(config) == 'noisy_classifier'


def model_config(config):
  """The typed config of `config.model.name`'s denoiser (a `models.UNetConfig` for 'unet').

  Learned variances (`model_var_type` learned / learned_range, Nichol & Dhariwal 2021)
  double the output channels: [eps, v].
  """
  name = model_name(config)
  if name not in _MODEL_CONFIGS:
    raise ValueError(f'unknown model.name {name!r}; expected one of {sorted(_MODEL_CONFIGS)}')
  return _MODEL_CONFIGS[name](config)


def create_model(config) -> nn.Module:
  """The denoiser of a run config, from the model registry."""
  return models.create(model_name(config), model_config(config))


def objective(config, model: nn.Module, schedule: schedules.Schedule):
  """config.diffusion's denoising objective for `model`, or a noisy classifier's
  cross-entropy (`objectives.classifier_objective`): (loss_fn, timestep_sampler).

  loss_fn(params, batch, key, timestep_state) -> (loss, metrics), as
  `train_step.make_generic_train_step` takes it. Conditioning dropout (e.g. labels
  to the null class with probability config.model.class_dropout, for
  classifier-free guidance) follows the model's `cond_spec()`.
  """
  def apply_fn(params, x_t, t, cond, key):
    return models.make_model_fn(model, params, train=True, dropout_rng=key)(x_t, t, cond)

  d = config.diffusion
  num_timesteps = schedule.num_timesteps
  sampler = (timesteps.loss_aware_timesteps(num_timesteps) if d.timestep_sampler == 'loss_aware'
             else timesteps.uniform_timesteps(num_timesteps))
  if is_classifier(config):
    return objectives.classifier_objective(apply_fn, schedule, timestep_sampler=sampler), sampler
  loss_fn = objectives.denoising_objective(
      apply_fn, schedule, **diffusion_types(config),
      weighting=d.get('weighting', 'uniform'), min_snr_gamma=float(d.get('min_snr_gamma', 5.0)),
      timestep_sampler=sampler, cond_spec=model.config.cond_spec(),
      cond_transform=(superres.train_augmentation(float(d.get('aug_max', 0.0)))
                      if low_res_size(config) else None))
  if sr_residual(config):
    denoise, scale = loss_fn, sr_residual_scale(config)

    def loss_fn(params, batch, key, timestep_state=None):  # pylint: disable=function-redefined
      return denoise(params, superres.to_residual(batch, scale), key, timestep_state)

  return loss_fn, sampler


def sr_residual(config) -> bool:
  """Whether a super-resolution run diffuses x - up(low_res) (`superres.to_residual`)."""
  return bool(low_res_size(config)) and bool(config.diffusion.get('sr_residual', False))


def sr_residual_scale(config) -> float:
  """The scale c of a residual SR model's variable c (x - up(low_res))."""
  return float(config.diffusion.get('sr_residual_scale', 1.0))


# config.sampling's solver options, and the value that leaves each unset (the solver's default).
SOLVER_OPTIONS = {'eta': 0.0, 'spacing': '', 'order': 0, 's_churn': 0.0, 's_tmin': 0.0,
                  's_tmax': float('inf'), 's_noise': 1.0, 'thresholding': 0.0}
# Their names in `solvers.make_solver`.
_MAKE_SOLVER_NAMES = {'spacing': 'timestep_spacing'}


def solver_settings(config, *, solver: str | None = None, steps: int | None = None,
                    **options) -> dict:
  """The solver, its model evaluations and options for a run: arguments over config.sampling.

  config.sampling's options (SOLVER_OPTIONS) go with config.sampling's solver: they apply
  when `solver` is None or that solver, and choosing another solver starts from its defaults.
  An option at its neutral value is unset. Old configs name the solver `sampler`
  (`config_utils.sampling_solver`).

  Returns:
    dict(solver=name, steps=NFE, and the options that are set, by SOLVER_OPTIONS names).

  Raises:
    ValueError: an unknown solver, or an option the solver does not take, naming it.
  """
  s = config.sampling
  own = config_utils.sampling_solver(s)
  name = own if solver is None else solver
  settings = dict(solver=name, steps=int(s.num_steps if steps is None else steps))
  for key, neutral in SOLVER_OPTIONS.items():
    value = options.get(key)
    if value is None and name == own:
      value = s.get(key, neutral)
    if value is not None and value != neutral:
      settings[key] = value
  solvers.check_options(name, **{_MAKE_SOLVER_NAMES.get(k, k): v for k, v in settings.items()
                                 if k in SOLVER_OPTIONS})
  return settings


def make_solver(config, settings: dict):
  """The solver of `solver_settings(config, ...)` on the run's schedule, mean and variance
  types and config.sampling.clip_denoised (`solvers.make_solver`). Raises ValueError."""
  if is_distilled(config):  # a distilled student samples with its own DDIM on the round's grid
    return distilled_solver(config, schedule(config), settings['steps'])
  types = diffusion_types(config)
  options = {_MAKE_SOLVER_NAMES.get(k, k): v for k, v in settings.items() if k in SOLVER_OPTIONS}
  return solvers.make_solver(
      schedule(config), settings['solver'], num_steps=settings['steps'],
      model_mean_type=types['model_mean_type'], model_var_type=types['model_var_type'],
      clip_denoised=bool(config.sampling.clip_denoised), **options)


# ---------------------------------------------------------------------------
# Progressive distillation (a round's config carries `config.distill`; see jaxddpm.distill).


def is_distilled(config) -> bool:
  """Whether `config` is a distillation round's (its student samples on the round's grid)."""
  return int(config.get('distill', {}).get('round_steps', 0)) > 0


def distillation_grid(config, schedule_: schedules.Schedule):
  """The round's `distillation.TimeGrid` (distill.grid_points K on the teacher's schedule)."""
  return distillation.make_time_grid(schedule_, int(config.distill.grid_points))


def distilled_solver(config, schedule_: schedules.Schedule, num_steps: int):
  """The sampler of a round's student (`distillation.student_solver`).

  Raises:
    ValueError: num_steps other than the round's distill.round_steps.
  """
  steps = int(config.distill.round_steps)
  if num_steps != steps:
    raise ValueError(f'this student was distilled for {steps} step(s); it samples with '
                     f'exactly that many, not {num_steps}')
  return distillation.student_solver(
      distillation_grid(config, schedule_), steps, mean_type=config.diffusion.model_mean_type,
      channels=int(config.data.channels), var_type=config.diffusion.model_var_type,
      clip_denoised=bool(config.sampling.clip_denoised))
