"""The Gaussian diffusion math of DDPM and improved DDPM, as pure jit-able functions.

References:
  [DDPM]  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021.
  [PD]    Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. 2022.

Conventions: x is NHWC, [B, H, W, C] (any rank >= 1 works; the batch is axis 0), data in
[-1, 1]. t is int32 [B] in [0, T); index t is the paper's timestep t+1. Per-timestep
coefficients come from a `schedules.Schedule` and are broadcast to x's shape by `extract`.

The network enters only as `model_fn(x, t, **model_kwargs) -> output`, a closure over its
parameters. Its output is [B, H, W, C] (the eps, x0 or v prediction) or, for the learned
variance types, [B, H, W, 2C]: the prediction in the first C channels, the variance output in
the last C (improved-diffusion's channel split). The model is called with
`schedule.timestep_map[t]`, the original timestep, so respaced schedules need no model wrapper.

Losses are per-example [B] arrays; average them (or weight them, see the importance sampler)
outside. Everything is computed in at least float32, whatever the input dtype.
"""

import math
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from jaxddpm.schedules import Schedule

MEAN_TYPES = ('eps', 'x0', 'v')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LEARNED_VAR_TYPES = ('learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid')

# Improved DDPM sec. 3.1: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001.
HYBRID_VLB_WEIGHT = 0.001

ModelFn = Callable[..., jax.Array]


def check_types(model_mean_type: str, model_var_type: Optional[str] = None,
                loss_type: Optional[str] = None) -> None:
  """Raises ValueError naming the bad value if a type is unknown (None skips a check)."""
  for field, value, allowed in (('model_mean_type', model_mean_type, MEAN_TYPES),
                                ('model_var_type', model_var_type, VAR_TYPES),
                                ('loss_type', loss_type, LOSS_TYPES)):
    if value is not None and value not in allowed:
      raise ValueError(f'unknown {field} {value!r}; expected one of {allowed}')


def types_from_config(config) -> dict[str, str]:
  """dict(model_mean_type, model_var_type, loss_type) of a `config.diffusion` ConfigDict.

  Raises:
    ValueError: naming the field and the bad value.
  """
  types = dict(model_mean_type=config.model_mean_type, model_var_type=config.model_var_type,
               loss_type=config.loss_type)
  check_types(**types)
  return types


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
               model_kwargs: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """model_fn(x_t, timestep_map[t], **model_kwargs): the network sees original timesteps."""
  return model_fn(x_t, schedule.timestep_map[t], **(model_kwargs or {}))


def p_mean_variance(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t: jax.Array, *,
                    model_mean_type: str, model_var_type: str, clip_denoised: bool = True,
                    model_kwargs: Optional[Mapping[str, Any]] = None,
                    denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None
                    ) -> dict[str, jax.Array]:
  """Calls the model on (x_t, t) and returns p(x_{t-1} | x_t); see `p_mean_variance_from_output`.

  Args:
    model_fn: model_fn(x, t, **model_kwargs) -> [B, H, W, C] or [B, H, W, 2C].
    x_t: [B, H, W, C].
    t: int32 [B] indices into the schedule (the model gets schedule.timestep_map[t]).

  Returns:
    dict(mean, variance, log_variance, pred_xstart, pred_eps, model_output), each [B, H, W, C].
  """
  model_output = call_model(model_fn, schedule, x_t, t, model_kwargs)
  return p_mean_variance_from_output(
      schedule, model_output, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised, denoised_fn=denoised_fn)


# --- Likelihood pieces ---------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

  KL = 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
  Used for the L_{t-1} and L_T terms of DDPM eq. 5. Arguments broadcast against each other.
  """
  mean1, logvar1, mean2, logvar2 = map(_float, (mean1, logvar1, mean2, logvar2))
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh approximation of the
  standard normal CDF used by the DDPM and improved-DDPM reference code (max error ~1e-4)."""
  x = _float(x)
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log p(x_0 | x_1) of the discretised Gaussian decoder  [DDPM eq. 13], elementwise, in nats.

  p(x) = integral over [x - 1/255, x + 1/255] of N(means, exp(log_scales)^2), with the edge bins
  open: (-inf, -1 + 1/255] for x = -1 and [1 - 1/255, inf) for x = 1, so the 256 bin
  probabilities sum to one. The CDF is `approx_standard_normal_cdf`, probabilities are floored
  at 1e-12, as in the reference code.

  Args:
    x: [B, H, W, C] data in [-1, 1] on the 256-level grid (2k/255 - 1).
    means, log_scales: broadcastable to x; log_scales = 0.5 log variance.
  """
  x, means, log_scales = _float(x), _float(means), _float(log_scales)
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim  [DDPM eq. 5]; x_start [B, H, W, C] -> [B]."""
  t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(schedule, x_start, t)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd_from_output(schedule: Schedule, model_output: jax.Array, x_start: jax.Array,
                             x_t: jax.Array, t: jax.Array, *, model_mean_type: str,
                             model_var_type: str, clip_denoised: bool = True
                             ) -> dict[str, jax.Array]:
  """One term of the VLB in bits/dim  [DDPM eq. 5; IDDPM eqs. 4-6].

  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
  L_0 = -log p(x_0 | x_1) (discretised Gaussian, DDPM eq. 13) at t = 0; both averaged over
  dimensions and divided by log 2, as in improved-diffusion.

  Returns:
    dict(output=[B] bits/dim, pred_xstart=[B, H, W, C], plus the other p_mean_variance keys).
  """
  x_start = _float(x_start)
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
  out = p_mean_variance_from_output(
      schedule, model_output, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x_start, means=out['mean'], log_scales=0.5 * out['log_variance']))
  out['output'] = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
  return out


def vb_terms_bpd(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, x_t: jax.Array,
                 t: jax.Array, *, model_mean_type: str, model_var_type: str,
                 clip_denoised: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, jax.Array]:
  """`vb_terms_bpd_from_output` with the model called on (x_t, t); output [B] bits/dim."""
  model_output = call_model(model_fn, schedule, x_t, t, model_kwargs)
  return vb_terms_bpd_from_output(
      schedule, model_output, x_start, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised)


# --- Training losses -----------------------------------------------------------------------------


def training_losses(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, t: jax.Array,
                    noise: jax.Array, *, model_mean_type: str, model_var_type: str,
                    loss_type: str, model_kwargs: Optional[Mapping[str, Any]] = None
                    ) -> dict[str, jax.Array]:
  """Per-example training losses at x_t = q_sample(x_start, t, noise).

  mse:    the prediction's mean squared error against its target (eps: noise; x0: x_start;
          v: `predict_v`), averaged over dimensions: L_simple  [DDPM eq. 14].
          With a learned variance, the variance output is trained by the VLB term on a
          stop-gradient copy of the prediction, loss = mse + vb (improved-diffusion's
          LossType.MSE).
  kl:     loss = vb, the single VLB term L_{t-1} (L_0 at t=0) in bits/dim, with gradient to
          the mean and the variance  [DDPM eq. 5]. E_t[loss] = L_vlb / T for uniform t.
  hybrid: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, with stop-gradient on the mean
          in the L_vlb term  [IDDPM sec. 3.1]. L_vlb = sum_t L_t is estimated by T L_t for the
          sampled t, so loss = mse + 0.001 T vb (improved-diffusion's RESCALED_MSE, which writes
          this as vb * T / 1000). L_simple is a per-dimension mean and vb is in bits/dim, as in
          improved-diffusion. With a fixed variance the vb term carries no gradient.

  The VLB terms use unclipped x_0-hat (clip_denoised=False), as in improved-diffusion.

  Args:
    model_fn: model_fn(x, t, **model_kwargs) -> [B, H, W, C] or [B, H, W, 2C].
    x_start: x_0, [B, H, W, C] in [-1, 1].
    t: int32 [B] (uniform, or from `loss_aware_sample`).
    noise: eps ~ N(0, I), [B, H, W, C].

  Returns:
    dict(loss=[B], mse=[B], and vb=[B] (bits/dim, unscaled) for kl, hybrid and learned
    variances). For kl, mse is reported but not part of the loss.
  """
  check_types(model_mean_type, model_var_type, loss_type)
  x_start, noise = _float(x_start), _float(noise)
  x_t = q_sample(schedule, x_start, t, noise)
  model_output = _float(call_model(model_fn, schedule, x_t, t, model_kwargs))
  pred, var_values = split_model_output(model_output, x_start.shape[-1], model_var_type)
  if model_mean_type == 'eps':
    target = noise
  elif model_mean_type == 'x0':
    target = x_start
  else:  # v
    target = predict_v(schedule, x_start, t, noise)
  terms = dict(mse=mean_flat(jnp.square(target - pred)))
  vb_kwargs = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
                   clip_denoised=False)
  if loss_type == 'kl':
    terms['vb'] = vb_terms_bpd_from_output(
        schedule, model_output, x_start, x_t, t, **vb_kwargs)['output']
    terms['loss'] = terms['vb']
  elif loss_type == 'hybrid' or var_values is not None:
    frozen = jax.lax.stop_gradient(pred)
    if var_values is not None:
      frozen = jnp.concatenate([frozen, var_values], axis=-1)
    terms['vb'] = vb_terms_bpd_from_output(schedule, frozen, x_start, x_t, t, **vb_kwargs)['output']
    vb_weight = HYBRID_VLB_WEIGHT * schedule.num_timesteps if loss_type == 'hybrid' else 1.0
    terms['loss'] = terms['mse'] + vb_weight * terms['vb']
  else:
    terms['loss'] = terms['mse']
  return terms


# --- Bits per dimension --------------------------------------------------------------------------


def calc_bpd_loop(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, key: jax.Array, *,
                  model_mean_type: str, model_var_type: str, clip_denoised: bool = True,
                  model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
  """The full variational bound -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim
  [DDPM eq. 5; IDDPM eq. 4], with one draw of x_t per timestep, over all T terms (lax.scan).

  Args:
    model_fn: model_fn(x, t, **model_kwargs).
    x_start: [B, H, W, C] data on the 256-level grid in [-1, 1].
    key: PRNG key for the x_t draws (one fresh split per timestep).

  Returns:
    dict(total_bpd=[B], prior_bpd=[B], vb=[B, T], xstart_mse=[B, T], mse=[B, T]); column t
    belongs to timestep index t (vb[:, 0] is the decoder NLL L_0); mse is the eps error of
    the eps implied by pred_xstart.
  """
  check_types(model_mean_type, model_var_type)
  x_start = _float(x_start)
  batch = x_start.shape[0]
  num_timesteps = schedule.num_timesteps

  def one_term(carry, inputs):
    t_index, step_key = inputs
    t = jnp.full((batch,), t_index, dtype=jnp.int32)
    noise = jax.random.normal(step_key, x_start.shape, x_start.dtype)
    x_t = q_sample(schedule, x_start, t, noise)
    out = vb_terms_bpd(model_fn, schedule, x_start, x_t, t, model_mean_type=model_mean_type,
                       model_var_type=model_var_type, clip_denoised=clip_denoised,
                       model_kwargs=model_kwargs)
    eps = predict_eps_from_xstart(schedule, x_t, t, out['pred_xstart'])
    return carry, (out['output'], mean_flat(jnp.square(out['pred_xstart'] - x_start)),
                   mean_flat(jnp.square(eps - noise)))

  keys = jax.random.split(key, num_timesteps)
  _, (vb, xstart_mse, mse) = jax.lax.scan(
      one_term, None, (jnp.arange(num_timesteps, dtype=jnp.int32), keys))
  prior = prior_bpd(schedule, x_start)
  vb = vb.T
  return dict(total_bpd=vb.sum(axis=1) + prior, prior_bpd=prior, vb=vb,
              xstart_mse=xstart_mse.T, mse=mse.T)


# --- Timestep sampling ---------------------------------------------------------------------------


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
  """t ~ Uniform{0, ..., T-1}, int32 [batch_size]  [DDPM Algorithm 1]."""
  return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


@flax.struct.dataclass
class LossAwareState:
  """Loss history for importance sampling of t  [IDDPM sec. 3.3].

  loss_history: float32 [T, H], the last H losses seen at each t (oldest first once full).
  loss_counts: int32 [T], how many of the H slots are filled.
  """
  loss_history: jax.Array
  loss_counts: jax.Array


def loss_aware_init(num_timesteps: int, history_per_term: int = 10) -> LossAwareState:
  """Empty history; IDDPM keeps the last 10 losses per timestep."""
  return LossAwareState(
      loss_history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
      loss_counts=jnp.zeros((num_timesteps,), jnp.int32))


def loss_aware_probs(state: LossAwareState, uniform_prob: float = 0.001) -> jax.Array:
  """p_t proportional to sqrt(E[L_t^2])  [IDDPM sec. 3.3], float32 [T], sums to 1.

  Uniform until every timestep has a full history; afterwards mixed with a uniform
  distribution of weight uniform_prob, as in improved-diffusion's LossSecondMomentResampler.
  """
  num_timesteps = state.loss_counts.shape[0]
  rms = jnp.sqrt(jnp.mean(jnp.square(state.loss_history), axis=-1))
  probs = rms / jnp.sum(rms) * (1.0 - uniform_prob) + uniform_prob / num_timesteps
  warmed_up = jnp.all(state.loss_counts == state.loss_history.shape[1])
  return jnp.where(warmed_up, probs, jnp.full_like(probs, 1.0 / num_timesteps))


def loss_aware_sample(key: jax.Array, state: LossAwareState, batch_size: int,
                      uniform_prob: float = 0.001):
  """Draws t ~ p_t and the importance weights 1 / (T p_t)  [IDDPM sec. 3.3].

  E_{t~p}[w_t L_t] = E_{t~uniform}[L_t], so weight the per-example losses by the weights.

  Returns:
    (t int32 [batch_size], weights float32 [batch_size]).
  """
  probs = loss_aware_probs(state, uniform_prob)
  t = jax.random.choice(key, probs.shape[0], (batch_size,), p=probs).astype(jnp.int32)
  return t, 1.0 / (probs.shape[0] * probs[t])


def loss_aware_update(state: LossAwareState, t: jax.Array, losses: jax.Array) -> LossAwareState:
  """Appends each (t_i, loss_i) to the history in batch order, dropping the oldest once full.

  Pass the global batch (all devices) so every replica keeps the same state; losses are the
  unweighted per-example losses (IDDPM uses L_vlb terms). Gradients are stopped.

  Args:
    t: int32 [B]; losses: [B].
  """
  history_len = state.loss_history.shape[1]

  def push(carry, inputs):
    history, counts = carry
    ti, loss = inputs
    count = counts[ti]
    row = history[ti]
    shifted = jnp.concatenate([row[1:], loss[None]])
    appended = row.at[jnp.minimum(count, history_len - 1)].set(loss)
    row = jnp.where(count == history_len, shifted, appended)
    return (history.at[ti].set(row), counts.at[ti].set(jnp.minimum(count + 1, history_len))), None

  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  (history, counts), _ = jax.lax.scan(
      push, (state.loss_history, state.loss_counts), (t.astype(jnp.int32), losses))
  return LossAwareState(loss_history=history, loss_counts=counts)
