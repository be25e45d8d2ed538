"""Checks a whole run config for values that cannot work together, before anything is built.

`validate_config(config)` raises a ValueError that names the field and its bad value, so a
typo on the command line (`--config.diffusion.beta_schedule=cosin`) fails at start-up rather
than after the data pipeline and the model have been built. Fields absent from the config are
skipped, so partial configs (e.g. in tests) validate too.

`jaxddpm.config_cli.parse_flags` is the CLIs' flags parser.
"""

from typing import Any, Sequence

import numpy as np

from jaxddpm import diffusion
from jaxddpm import models
from jaxddpm import objectives
from jaxddpm import schedules
from jaxddpm import solvers

TIMESTEP_SAMPLERS = ('uniform', 'loss_aware')
DOWNSAMPLE_PADDINGS = ('same', 'symmetric')
CHANNELS = (1, 3, 4)
DTYPES = ('float32', 'bfloat16', 'float16')
# Schedules that ramp from beta_start up to beta_end.
RAMP_SCHEDULES = ('linear', 'quad', 'sigmoid', 'warmup10', 'warmup50')
# jax.random.key keeps only the low 32 bits of a seed (without jax_enable_x64), so 2**32 would
# silently repeat seed 0; the data order (NumPy) refuses negative seeds.
MAX_SEED = 2 ** 32 - 1


def _fail(field: str, value: Any, why: str):
  raise ValueError(f'config.{field} = {value!r}: {why}')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(group, name: str, prefix: str, minimum: int):
  value = group[name]
  if not _is_int(value) or value < minimum:
    _fail(f'{prefix}.{name}', value, f'must be an integer >= {minimum}')
  return value


def _number(group, name: str, prefix: str, low: float, high: float, *,
            low_open: bool = False, high_open: bool = False):
  value = group[name]
  ok = _is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    _fail(f'{prefix}.{name}', value, f'must be a number in {interval}')
  return value


def _choice(group, name: str, prefix: str, allowed: Sequence[Any]):
  value = group[name]
  if value not in allowed:
    _fail(f'{prefix}.{name}', value, f'must be one of {tuple(allowed)}')
  return value


def _ints(group, name: str, prefix: str, minimum: int, allow_empty: bool):
  value = group[name]
  if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
      or not all(_is_int(v) and v >= minimum for v in value)
      or (not value and not allow_empty)):
    _fail(f'{prefix}.{name}', value,
          f'must be a {"" if allow_empty else "non-empty "}sequence of integers >= {minimum}')
  return tuple(value)


def _check_betas(d, p):
  """Rejects a schedule whose betas leave (0, 1).

  A beta of 1 (or betas that drive alpha_bar_T below float32's range) gives alpha_bar_T = 0:
  the x_0 prediction divides by sqrt(alpha_bar_T), so every sample would be NaN. A beta of 0
  adds no noise at that step.
  """
  kw = {k: d[k] for k in ('cosine_s', 'max_beta') if k in d}
  try:  # catches schedule-specific problems the checks above do not know
    betas = schedules.get_betas(d.beta_schedule, d.num_timesteps, beta_start=d.beta_start,
                                beta_end=d.beta_end, **kw)
  except ValueError as e:
    raise ValueError(f'config.diffusion: {e}') from e
  name = d.beta_schedule
  bad = ~(betas > 0)  # NaN too
  if bad.any():
    i = int(np.argmax(bad))
    field = 'cosine_s' if name == 'cosine' else 'beta_start'
    _fail(f'{p}.{field}', d[field], f'gives the {name} schedule betas[{i}] = '
          f'{float(betas[i])!r}; every beta must lie in (0, 1)')
  alpha_bar_t = float(np.prod(1.0 - betas))
  if np.float32(alpha_bar_t) == 0:
    # The field that sets the schedule's largest betas.
    field = {'cosine': 'max_beta', 'jsd': 'beta_schedule'}.get(name, 'beta_end')
    if field not in d:
      field = 'num_timesteps'
    underflow = '' if alpha_bar_t == 0 else ', which is 0 in float32'
    _fail(f'{p}.{field}', d[field],
          f'gives alpha_bar_T = {alpha_bar_t:.3g}{underflow} (beta_T = {float(betas[-1]):.6g}, '
          f'T = {d.num_timesteps}): sampling would produce NaN; every beta must be < 1 and '
          f'alpha_bar_T > 0')


def _validate_diffusion(d):
  p = 'diffusion'
  num_timesteps = None
  if 'num_timesteps' in d:
    num_timesteps = _int(d, 'num_timesteps', p, 2)
  if 'beta_schedule' in d:
    _choice(d, 'beta_schedule', p, schedules.SCHEDULES)
  for name in ('beta_start', 'beta_end'):
    if name in d:
      _number(d, name, p, 0.0, 1.0, low_open=True)
  if ({'beta_schedule', 'beta_start', 'beta_end'} <= set(d.keys())
      and d.beta_schedule in RAMP_SCHEDULES and d.beta_start > d.beta_end):
    _fail(f'{p}.beta_start', d.beta_start, f'must be <= diffusion.beta_end = {d.beta_end!r}')
  if 'cosine_s' in d:
    _number(d, 'cosine_s', p, 0.0, float('inf'), low_open=True, high_open=True)
  if 'max_beta' in d:
    _number(d, 'max_beta', p, 0.0, 1.0, low_open=True, high_open=True)
  if 'model_mean_type' in d:
    _choice(d, 'model_mean_type', p, diffusion.MEAN_TYPES)
  if 'model_var_type' in d:
    _choice(d, 'model_var_type', p, diffusion.VAR_TYPES)
  if 'loss_type' in d:
    _choice(d, 'loss_type', p, diffusion.LOSS_TYPES)
  if 'timestep_sampler' in d:
    _choice(d, 'timestep_sampler', p, TIMESTEP_SAMPLERS)
  if 'weighting' in d:
    _choice(d, 'weighting', p, objectives.WEIGHTINGS)
    if d.weighting != 'uniform' and d.get('loss_type') == 'kl':
      _fail(f'{p}.weighting', d.weighting, "weights the MSE term, and loss_type 'kl' has none")
  if 'min_snr_gamma' in d:
    _number(d, 'min_snr_gamma', p, 0.0, float('inf'), low_open=True, high_open=True)
  if 'aug_max' in d:
    _number(d, 'aug_max', p, 0.0, 1.0)
  if 'sr_residual_scale' in d:
    _number(d, 'sr_residual_scale', p, 0.0, float('inf'), low_open=True, high_open=True)
  if {'beta_schedule', 'num_timesteps', 'beta_start', 'beta_end'} <= set(d.keys()):
    _check_betas(d, p)
  return num_timesteps


def _validate_data(d):
  p = 'data'
  if 'image_size' in d:
    _int(d, 'image_size', p, 1)
  if 'channels' in d:
    _choice(d, 'channels', p, CHANNELS)
  if 'num_workers' in d:
    _int(d, 'num_workers', p, -1)  # -1: a default for the machine
  if 'low_res_size' in d:
    low = _int(d, 'low_res_size', p, 0)
    if low and 'image_size' in d and low >= d.image_size:
      _fail(f'{p}.low_res_size', low, f'must be below data.image_size = {d.image_size} (the '
            'output size of a super-resolution model; 0: not one)')
  if 'photo_size' in d:
    size = _int(d, 'photo_size', p, 1)
    if d.get('dataset') == 'photos' and 'image_size' in d and d.image_size > size:
      _fail(f'{p}.photo_size', size, f'must be >= data.image_size = {d.image_size}')
  if 'image_width' in d:
    _int(d, 'image_width', p, 0)
  if 'half_captions' in d:
    rate = float(d.half_captions)
    if not 0.0 <= rate <= 1.0:
      _fail(f'{p}.half_captions', rate, 'must be in [0, 1] (the share of one-sided '
            'digit_pairs captions)')
  if 'max_text_length' in d:
    _int(d, 'max_text_length', p, 2)  # [BOS, EOS] at least
  if d.get('dataset') == 'digit_pairs' and d.get('random_flip'):
    _fail(f'{p}.random_flip', True, 'must be False for digit_pairs: a flip mirrors the digits '
          'and swaps left and right, which the captions name')


TEXT_ENCODERS = ('', 'transformer', 'clip')


def _validate_text(t):
  p = 'model.text'
  if 'encoder' in t:
    _choice(t, 'encoder', p, TEXT_ENCODERS)
  for name in ('width', 'num_heads'):
    if name in t:
      _int(t, name, p, 1)
  if 'num_layers' in t:
    _int(t, 'num_layers', p, 0)
  if 'width' in t and 'num_heads' in t and t.width % t.num_heads:
    _fail(f'{p}.num_heads', t.num_heads, f'must divide model.text.width = {t.width}')
  if 'caption_dropout' in t:
    _number(t, 'caption_dropout', p, 0.0, 1.0, high_open=True)
  if t.get('encoder') == 'clip' and not str(t.get('clip_dir', '')).strip():
    _fail(f'{p}.clip_dir', t.get('clip_dir', ''), "is required with encoder = 'clip' (a "
          'Hugging Face CLIP folder: config.json, model.safetensors, tokenizer.json)')


def _validate_model(m, data):
  p = 'model'
  if 'name' in m:
    _choice(m, 'name', p, models.model_names())
  if 'ch' in m:
    _int(m, 'ch', p, 1)
  ch_mult = _ints(m, 'ch_mult', p, 1, allow_empty=False) if 'ch_mult' in m else None
  if 'num_res_blocks' in m:
    _int(m, 'num_res_blocks', p, 1)
  if 'dropout' in m:
    _number(m, 'dropout', p, 0.0, 1.0, high_open=True)
  if 'num_classes' in m:
    _int(m, 'num_classes', p, 0)
  if 'class_dropout' in m:
    _number(m, 'class_dropout', p, 0.0, 1.0)
  if 'num_heads' in m:
    _int(m, 'num_heads', p, 1)
  if 'norm_groups' in m:
    _int(m, 'norm_groups', p, 1)
  if 'norm_eps' in m:
    _number(m, 'norm_eps', p, 0.0, 1.0, low_open=True)
  if 'dtype' in m:
    _choice(m, 'dtype', p, DTYPES)
  if 'num_head_channels' in m:
    _int(m, 'num_head_channels', p, 0)
  if 'downsample_padding' in m:
    _choice(m, 'downsample_padding', p, DOWNSAMPLE_PADDINGS)
  if 'text' in m:
    _validate_text(m.text)
  if m.get('name') == 'noisy_classifier':
    if int(m.get('num_classes', 0)) < 2:
      _fail(f'{p}.num_classes', m.get('num_classes', 0), 'a noisy classifier needs the '
            "data set's labels: give model.num_classes >= 2")
    if 'pool' in m:
      _choice(m, 'pool', p, ('attention', 'mean'))
  if ch_mult is None:
    return
  if 'ch' in m:
    widths = [m.ch * mult for mult in ch_mult]
    if 'norm_groups' in m:
      for width in [m.ch] + widths:
        if width % m.norm_groups:
          _fail(f'{p}.norm_groups', m.norm_groups,
                f'must divide every U-Net width {sorted(set([m.ch] + widths))} '
                f'(model.ch * model.ch_mult), but not {width}')
  if data is None or 'image_size' not in data:
    return
  size = data.image_size
  factor = 2 ** (len(ch_mult) - 1)
  for name in ('image_size', 'image_width'):
    if data.get(name, 0) % factor:
      _fail(f'data.{name}', data[name],
            f'must be divisible by 2**(len(model.ch_mult) - 1) = {factor} '
            f'(model.ch_mult = {ch_mult})')
  resolutions = [size // 2 ** i for i in range(len(ch_mult))]
  if 'attn_resolutions' in m:
    attn = _ints(m, 'attn_resolutions', p, 1, allow_empty=True)
    for r in attn:
      if r not in resolutions:
        _fail(f'{p}.attn_resolutions', attn,
              f'{r} is not a U-Net resolution; those are {resolutions}')
    if 'ch' in m and 'num_heads' in m and not m.get('num_head_channels', 0):
      for i, r in enumerate(resolutions):
        if r in attn and (m.ch * ch_mult[i]) % m.num_heads:
          _fail(f'{p}.num_heads', m.num_heads,
                f'must divide the width {m.ch * ch_mult[i]} at attention resolution {r}')


def _validate_optim(o):
  p = 'optim'
  if 'lr' in o:
    _number(o, 'lr', p, 0.0, float('inf'), low_open=True, high_open=True)
  for name in ('warmup_steps', 'decay_steps'):
    if name in o:
      _int(o, name, p, 0)
  if 'grad_clip' in o:
    _number(o, 'grad_clip', p, 0.0, float('inf'), high_open=True)
  for name in ('beta1', 'beta2'):
    if name in o:
      _number(o, name, p, 0.0, 1.0, high_open=True)
  if 'eps' in o:
    _number(o, 'eps', p, 0.0, float('inf'), high_open=True)
  if 'weight_decay' in o:
    _number(o, 'weight_decay', p, 0.0, float('inf'), high_open=True)
  if 'ema_decay' in o:
    _number(o, 'ema_decay', p, 0.0, 1.0)


def _validate_training(tr):
  p = 'training'
  if 'batch_size' in tr:
    _int(tr, 'batch_size', p, 1)
  if 'steps_per_call' in tr:
    _int(tr, 'steps_per_call', p, 1)
  if 'keep_checkpoints' in tr:  # Orbax's max_to_keep=0 deletes every checkpoint
    _int(tr, 'keep_checkpoints', p, 1)
  for name in ('num_train_steps', 'log_every', 'checkpoint_every', 'sample_every', 'eval_every',
               'num_sample_grid'):
    if name in tr:
      _int(tr, name, p, 0)


def sampling_solver(sampling) -> str:
  """The solver name of a config.sampling: `solver`, or `sampler`, its name before the
  few-step solvers came (workdirs saved then hold only that; when present it is used)."""
  if 'sampler' in sampling:
    return sampling['sampler']
  return sampling.get('solver', 'ddpm')


def _validate_sampling(s, num_timesteps, distilled: bool):
  p = 'sampling'
  for name in ('solver', 'sampler', 'train_grid_sampler'):
    if name in s:
      _choice(s, name, p, solvers.SOLVERS)
  if 'solver' in s and 'sampler' in s and s.solver != s.sampler:
    _fail(f'{p}.sampler', s.sampler, f'is the old name of {p}.solver = {s.solver!r}; set '
          'only solver')
  for name in ('num_steps', 'train_grid_steps'):
    if name in s:
      # As run_sample.py --steps: a respaced schedule keeps >= 2; a distilled student may take 1.
      steps = _int(s, name, p, 1 if distilled else 2)
      if num_timesteps is not None and steps > num_timesteps:
        _fail(f'{p}.{name}', steps, f'must be <= diffusion.num_timesteps = {num_timesteps}')
  if 'eta' in s:
    _number(s, 'eta', p, 0.0, 1.0)
  if 'spacing' in s and s.spacing:
    _choice(s, 'spacing', p, schedules.SPACINGS + solvers.time_grids.TIME_SPACINGS)
  if 'order' in s:
    _choice(s, 'order', p, (0, 2, 3))
  for name, low in (('s_churn', 0.0), ('s_tmin', 0.0), ('s_tmax', 0.0)):
    if name in s:
      _number(s, name, p, low, float('inf'))
  if 's_noise' in s:
    _number(s, 's_noise', p, 0.0, float('inf'), low_open=True, high_open=True)
  if 'thresholding' in s:
    _number(s, 'thresholding', p, 0.0, 1.0, high_open=True)
  for name in ('num_samples', 'batch_size'):
    if name in s:
      _int(s, name, p, 1)
  if 'guidance_scale' in s:
    _number(s, 'guidance_scale', p, 0.0, float('inf'), high_open=True)
  if 'aug_level' in s:
    _number(s, 'aug_level', p, 0.0, 1.0)


def validate_config(config) -> None:
  """Raises ValueError('config.<field> = <value>: <why>') for the first inconsistent value.

  Checks: known beta schedule and mean/var/loss types, T >= 2, cosine_s > 0, max_beta in
  (0, 1), every beta of the schedule in (0, 1) with alpha_bar_T > 0 in float32 (so 'jsd',
  whose last beta is 1, is refused: its samples would be NaN); channels in (1, 3, 4);
  image_size divisible by 2**(len(ch_mult) - 1); attn_resolutions among the U-Net
  resolutions; norm_groups dividing every U-Net width; num_heads dividing the attention widths;
  positive batch sizes, keep_checkpoints and learning rate; decays and dropouts in range;
  solver names and options; sampling steps <= T; seed in [0, 2**32 - 1]. Any loss type goes with any
  variance type (kl/hybrid with a fixed variance and mse with a learned one are meaningful,
  see `objectives.training_losses`).

  Args:
    config: an `ml_collections.ConfigDict` (or dict-like with attribute access) as built by
      configs/default.py; groups or fields it lacks are not checked.
  """
  num_timesteps = None
  if 'diffusion' in config:
    num_timesteps = _validate_diffusion(config.diffusion)
  data = config.data if 'data' in config else None
  if data is not None:
    _validate_data(data)
  if 'model' in config:
    _validate_model(config.model, data)
  if 'optim' in config:
    _validate_optim(config.optim)
  if 'training' in config:
    _validate_training(config.training)
  if 'sampling' in config:
    distilled = int(config.get('distill', {}).get('round_steps', 0)) > 0
    _validate_sampling(config.sampling, num_timesteps, distilled)
  if ('model' in config and config.model.get('energy', False) and 'diffusion' in config and
      (config.diffusion.get('model_mean_type') != 'eps' or
       config.diffusion.get('model_var_type') in ('learned', 'learned_range'))):
    _fail('model.energy', True, 'an energy-parameterised denoiser predicts eps = grad E with '
          'a fixed variance: set diffusion.model_mean_type = eps and a fixed model_var_type')
  if ('model' in config and config.model.get('name') == 'noisy_classifier' and 'training' in config
      and int(config.training.get('sample_every', 0)) > 0):
    _fail('training.sample_every', config.training.sample_every, 'a noisy classifier draws '
          'no samples: set it to 0')
  if 'seed' in config and not (_is_int(config.seed) and 0 <= config.seed <= MAX_SEED):
    _fail('seed', config.seed, 'must be an integer in [0, 2**32 - 1]')
