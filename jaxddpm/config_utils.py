"""Checks a whole run config for values that cannot work together, before anything is built.

`validate_config(config)` raises a ValueError that names the field and its bad value, so a
typo on the command line (`--config.diffusion.beta_schedule=cosin`) fails at start-up rather
than after the data pipeline and the model have been built. Fields absent from the config are
skipped, so partial configs (e.g. in tests) validate too.
"""

from typing import Any, Sequence

from jaxddpm import diffusion
from jaxddpm import schedules

SAMPLERS = ('ddpm', 'ddim')
TIMESTEP_SAMPLERS = ('uniform', 'loss_aware')
DOWNSAMPLE_PADDINGS = ('same', 'symmetric')
CHANNELS = (1, 3, 4)
DTYPES = ('float32', 'bfloat16', 'float16')
# Schedules that ramp from beta_start up to beta_end.
RAMP_SCHEDULES = ('linear', 'quad', 'sigmoid', 'warmup10', 'warmup50')


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
  if 'model_mean_type' in d:
    _choice(d, 'model_mean_type', p, diffusion.MEAN_TYPES)
  if 'model_var_type' in d:
    _choice(d, 'model_var_type', p, diffusion.VAR_TYPES)
  if 'loss_type' in d:
    _choice(d, 'loss_type', p, diffusion.LOSS_TYPES)
  if 'timestep_sampler' in d:
    _choice(d, 'timestep_sampler', p, TIMESTEP_SAMPLERS)
  if {'beta_schedule', 'num_timesteps', 'beta_start', 'beta_end'} <= set(d.keys()):
    try:  # catches schedule-specific problems (e.g. betas outside (0, 1])
      schedules.get_betas(d.beta_schedule, d.num_timesteps, beta_start=d.beta_start,
                          beta_end=d.beta_end)
    except ValueError as e:
      raise ValueError(f'config.diffusion: {e}') from e
  return num_timesteps


def _validate_data(d):
  p = 'data'
  if 'image_size' in d:
    _int(d, 'image_size', p, 1)
  if 'channels' in d:
    _choice(d, 'channels', p, CHANNELS)


def _validate_model(m, data):
  p = 'model'
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
  if size % factor:
    _fail('data.image_size', size,
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
  if 'warmup_steps' in o:
    _int(o, 'warmup_steps', p, 0)
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
  for name in ('num_train_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
               'sample_every', 'eval_every', 'num_sample_grid'):
    if name in tr:
      _int(tr, name, p, 0)


def _validate_sampling(s, num_timesteps):
  p = 'sampling'
  for name in ('sampler', 'train_grid_sampler'):
    if name in s:
      _choice(s, name, p, SAMPLERS)
  for name in ('num_steps', 'train_grid_steps'):
    if name in s:
      steps = _int(s, name, p, 1)
      if num_timesteps is not None and steps > num_timesteps:
        _fail(f'{p}.{name}', steps, f'must be <= diffusion.num_timesteps = {num_timesteps}')
  if 'eta' in s:
    _number(s, 'eta', p, 0.0, 1.0)
  for name in ('num_samples', 'batch_size'):
    if name in s:
      _int(s, name, p, 1)
  if 'guidance_scale' in s:
    _number(s, 'guidance_scale', p, 0.0, float('inf'), high_open=True)


def validate_config(config) -> None:
  """Raises ValueError('config.<field> = <value>: <why>') for the first inconsistent value.

  Checks: known beta schedule and mean/var/loss types, T >= 2, betas in (0, 1]; channels in
  (1, 3, 4); image_size divisible by 2**(len(ch_mult) - 1); attn_resolutions among the U-Net
  resolutions; norm_groups dividing every U-Net width; num_heads dividing the attention widths;
  positive batch sizes and learning rate; decays and dropouts in range; sampler names; sampling
  steps <= T. Any loss type goes with any variance type (kl/hybrid with a fixed variance and
  mse with a learned one are meaningful, see `diffusion.training_losses`).

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
    _validate_sampling(config.sampling, num_timesteps)
  if 'seed' in config and not _is_int(config.seed):
    _fail('seed', config.seed, 'must be an integer')
