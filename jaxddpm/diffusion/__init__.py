"""The Gaussian diffusion math of DDPM and improved DDPM, as pure jit-able functions.

References:
  [DDPM]  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021.
  [PD]    Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. 2022.

Conventions: x is NHWC, [B, H, W, C] (any rank >= 1 works; the batch is axis 0), data in
[-1, 1]. t is int32 [B] in [0, T); index t is the paper's timestep t+1. Per-timestep
coefficients come from a `schedules.Schedule` and are broadcast to x's shape by `extract`.

The network enters only as `model_fn(x, t, cond) -> output`, a `Partial` over its
parameters, `cond` the conditioning pytree (`jaxddpm.models.conditioning`; {} when
unconditional). Its output is [B, H, W, C] (the eps, x0 or v prediction) or, for the learned
variance types, [B, H, W, 2C]: the prediction in the first C channels, the variance output in
the last C (improved-diffusion's channel split). The model is called with
`schedule.timestep_map[t]`, the original timestep, so respaced schedules need no model wrapper.

The variational bound and bits/dim built on these are in `jaxddpm.diffusion.likelihood`, the training
losses in `jaxddpm.objectives`, the timestep samplers in `jaxddpm.timesteps`. Everything is
computed in at least float32, whatever the input dtype.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxddpm.schedules import Schedule

MEAN_TYPES = ('eps', 'x0', 'v')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LEARNED_VAR_TYPES = ('learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid')

ModelFn = Callable[..., jax.Array]


def check_types(model_mean_type: str, model_var_type: Optional[str] = None,
                loss_type: Optional[str] = None) -> None:
  """Raises ValueError naming the bad value if a type is unknown (None skips a check)."""
  for field, value, allowed in (('model_mean_type', model_mean_type, MEAN_TYPES),
                                ('model_var_type', model_var_type, VAR_TYPES),
                                ('loss_type', loss_type, LOSS_TYPES)):
    if value is not None and value not in allowed:
      raise ValueError(f'unknown {field} {value!r}; expected one of {allowed}')


def model_output_channels(channels: int, model_var_type: str) -> int:
  """Output channels the network needs: C, or 2C for a learned variance."""
  check_types('eps', model_var_type)
  return 2 * channels if model_var_type in LEARNED_VAR_TYPES else channels


def _float(x):
  """x as an array of at least float32 precision (bf16 inputs are computed in float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """coef[t] shaped [B, 1, ..., 1] (ndim axes) to broadcast against x of rank ndim.

  Args:
    coef: [T] per-timestep coefficient from a `Schedule`.
    t: int32 [B] timesteps.
    ndim: rank of the array the result multiplies.
  """
  return coef[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --- Forward process -----------------------------------------------------------------------------


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array):
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  [DDPM eq. 4].

  Args:
    x_start: x_0, [B, H, W, C].
    t: int32 [B].

  Returns:
    (mean, variance, log_variance), each [B, H, W, C].
  """
  x_start = _float(x_start)
  nd = x_start.ndim
  mean = extract(schedule.sqrt_alphas_cumprod, t, nd) * x_start
  variance = jnp.broadcast_to(1.0 - extract(schedule.alphas_cumprod, t, nd), x_start.shape)
  log_variance = jnp.broadcast_to(
      extract(schedule.log_one_minus_alphas_cumprod, t, nd), x_start.shape)
  return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x_0)  [DDPM eq. 4].

  Args:
    x_start: x_0, [B, H, W, C].
    t: int32 [B].
    noise: eps ~ N(0, I), [B, H, W, C].

  Returns:
    x_t, [B, H, W, C].
  """
  x_start, noise = _float(x_start), _float(noise)
  nd = x_start.ndim
  return (extract(schedule.sqrt_alphas_cumprod, t, nd) * x_start
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * noise)


def q_posterior_mean_variance(schedule: Schedule, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array):
  """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)  [DDPM eqs. 6-7].

  mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
          + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
  beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.

  Args:
    x_start: x_0, [B, H, W, C].
    x_t: [B, H, W, C].
    t: int32 [B].

  Returns:
    (mean, variance, log_variance_clipped), each [B, H, W, C]; the log variance at t=0 is
    log beta~_1 since beta~_0 = 0 (reference-code convention).
  """
  x_start, x_t = _float(x_start), _float(x_t)
  nd = x_t.ndim
  mean = (extract(schedule.posterior_mean_coef1, t, nd) * x_start
          + extract(schedule.posterior_mean_coef2, t, nd) * x_t)
  variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, nd), x_t.shape)
  log_variance = jnp.broadcast_to(
      extract(schedule.posterior_log_variance_clipped, t, nd), x_t.shape)
  return mean, variance, log_variance


# --- Parameterisations: eps, x0, v ---------------------------------------------------------------


def predict_xstart_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                            eps: jax.Array) -> jax.Array:
  """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps  [DDPM eq. 4 solved for x_0; cf. eq. 15].

  Shapes: x_t, eps [B, H, W, C]; t int32 [B]; returns [B, H, W, C].
  """
  x_t, eps = _float(x_t), _float(eps)
  nd = x_t.ndim
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, nd) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, nd) * eps)


def predict_eps_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                            pred_xstart: jax.Array) -> jax.Array:
  """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)  [DDPM eq. 4 solved for eps].

  Shapes: x_t, pred_xstart [B, H, W, C]; t int32 [B]; returns [B, H, W, C].
  """
  x_t, pred_xstart = _float(x_t), _float(pred_xstart)
  nd = x_t.ndim
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, nd))


def predict_v(schedule: Schedule, x_start: jax.Array, t: jax.Array,
              noise: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0  [PD sec. 4 and appendix D: alpha eps - sigma x].

  Shapes: x_start, noise [B, H, W, C]; t int32 [B]; returns [B, H, W, C].
  """
  x_start, noise = _float(x_start), _float(noise)
  nd = x_start.ndim
  return (extract(schedule.sqrt_alphas_cumprod, t, nd) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * x_start)


def predict_xstart_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                          v: jax.Array) -> jax.Array:
  """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v  [PD appendix D].

  Shapes: x_t, v [B, H, W, C]; t int32 [B]; returns [B, H, W, C].
  """
  x_t, v = _float(x_t), _float(v)
  nd = x_t.ndim
  return (extract(schedule.sqrt_alphas_cumprod, t, nd) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                       v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v  [PD appendix D].

  Shapes: x_t, v [B, H, W, C]; t int32 [B]; returns [B, H, W, C].
  """
  x_t, v = _float(x_t), _float(v)
  nd = x_t.ndim
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * x_t
          + extract(schedule.sqrt_alphas_cumprod, t, nd) * v)


def dynamic_threshold(pred_xstart: jax.Array, ratio: float) -> jax.Array:
  """Imagen's dynamic thresholding of an x_0 prediction (Saharia et al. 2022, sec. 2.3).

  Per sample, s = max(the `ratio` quantile of |x0_hat|, 1) and x0_hat <- clip(x0_hat, -s, s) / s:
  saturated pixels are pulled inwards rather than clipped, and where no pixel exceeds 1 it is
  static clipping to [-1, 1]. The quantile interpolates linearly between order statistics
  (NumPy's default, as `torch.quantile`). diffusers' `_threshold_sample` also caps s at
  `sample_max_value`, whose default 1.0 reduces it to static clipping; the paper has no cap.

  Args:
    pred_xstart: [B, ...] float32.
    ratio: the percentile as a fraction, in (0, 1) (Imagen: 0.995; diffusers' default too).

  Returns:
    [B, ...], every value in [-1, 1].
  """
  x = _float(pred_xstart)
  flat = jnp.abs(x.reshape(x.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, ratio, axis=1), 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.clip(x, -s, s) / s


# --- Reverse process p(x_{t-1} | x_t) ------------------------------------------------------------


def split_model_output(model_output: jax.Array, channels: int, model_var_type: str):
  """(prediction [B,H,W,C], variance output [B,H,W,C] or None) of a model output.

  Raises:
    ValueError: if the output has the wrong number of channels for model_var_type.
  """
  want = model_output_channels(channels, model_var_type)
  if model_output.shape[-1] != want:
    raise ValueError(f'model output has {model_output.shape[-1]} channels, expected {want} '
                     f'for model_var_type {model_var_type!r} and {channels} data channels')
  if model_var_type in LEARNED_VAR_TYPES:
    return model_output[..., :channels], model_output[..., channels:]
  return model_output, None


def p_mean_variance_from_output(schedule: Schedule, model_output: jax.Array, x_t: jax.Array,
                                t: jax.Array, *, model_mean_type: str, model_var_type: str,
                                clip_denoised: bool = True,
                                denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None
                                ) -> dict[str, jax.Array]:
  """p(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)) from a given model output.

  Mean: the prediction is turned into x_0-hat (eps: DDPM eq. 15 rearranged; x0: as is;
  v: PD appendix D), optionally passed through denoised_fn and clipped to [-1, 1], and
  mu_theta = mu~_t(x_0-hat, x_t) (DDPM eq. 7, which for eps equals DDPM eq. 11 when unclipped).

  Variance (log variance):
    fixedlarge:    beta_t, with beta~_1 at t=0 (DDPM sec. 3.2 sigma_t^2 = beta_t; reference
                   code: log(append(beta~_1, beta_{1:}))).
    fixedsmall:    beta~_t, log clipped at t=0 (DDPM sec. 3.2 sigma_t^2 = beta~_t).
    learned:       the variance output is log Sigma directly.
    learned_range: v in [-1, 1] -> frac = (v + 1) / 2,
                   log Sigma = frac log beta_t + (1 - frac) log beta~_t  [IDDPM eq. 15].

  Args:
    model_output: [B, H, W, C] or [B, H, W, 2C] for the learned variance types.
    x_t: [B, H, W, C].
    t: int32 [B].
    clip_denoised: clip x_0-hat to [-1, 1].
    denoised_fn: applied to x_0-hat before clipping (e.g. to impose known pixels).

  Returns:
    dict(mean, variance, log_variance, pred_xstart, pred_eps, model_output), each
    [B, H, W, C]; pred_eps is consistent with the (clipped) pred_xstart; model_output is the
    mean part of the output (the raw eps, x0 or v prediction).
  """
  check_types(model_mean_type, model_var_type)
  x_t = _float(x_t)
  nd = x_t.ndim
  pred, var_values = split_model_output(_float(model_output), x_t.shape[-1], model_var_type)

  if model_var_type == 'fixedlarge':
    large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    variance = extract(large, t, nd)
    log_variance = jnp.log(variance)
  elif model_var_type == 'fixedsmall':
    variance = extract(schedule.posterior_variance, t, nd)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)
  elif model_var_type == 'learned':
    log_variance = var_values
    variance = jnp.exp(log_variance)
  else:  # learned_range
    min_log = extract(schedule.posterior_log_variance_clipped, t, nd)
    max_log = extract(jnp.log(schedule.betas), t, nd)
    frac = (var_values + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  variance = jnp.broadcast_to(variance, x_t.shape)
  log_variance = jnp.broadcast_to(log_variance, x_t.shape)

  if model_mean_type == 'eps':
    pred_xstart = predict_xstart_from_eps(schedule, x_t, t, pred)
  elif model_mean_type == 'x0':
    pred_xstart = pred
  else:  # v
    pred_xstart = predict_xstart_from_v(schedule, x_t, t, pred)
  processed = model_mean_type != 'eps' or clip_denoised or denoised_fn is not None
  if denoised_fn is not None:
    pred_xstart = denoised_fn(pred_xstart)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  pred_eps = predict_eps_from_xstart(schedule, x_t, t, pred_xstart) if processed else pred
  mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance,
              pred_xstart=pred_xstart, pred_eps=pred_eps, model_output=pred)


def call_model(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t: jax.Array,
               cond: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """model_fn(x_t, timestep_map[t], cond): the network sees original timesteps."""
  return model_fn(x_t, schedule.timestep_map[t], {} if cond is None else cond)


def p_mean_variance(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t: jax.Array, *,
                    model_mean_type: str, model_var_type: str, clip_denoised: bool = True,
                    cond: Optional[Mapping[str, Any]] = None,
                    denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None
                    ) -> dict[str, jax.Array]:
  """Calls the model on (x_t, t) and returns p(x_{t-1} | x_t); see `p_mean_variance_from_output`.

  Args:
    model_fn: model_fn(x, t, cond) -> [B, H, W, C] or [B, H, W, 2C].
    x_t: [B, H, W, C].
    t: int32 [B] indices into the schedule (the model gets schedule.timestep_map[t]).

  Returns:
    dict(mean, variance, log_variance, pred_xstart, pred_eps, model_output), each [B, H, W, C].
  """
  model_output = call_model(model_fn, schedule, x_t, t, cond)
  return p_mean_variance_from_output(
      schedule, model_output, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
