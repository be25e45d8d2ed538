"""The variational bound of DDPM in bits/dim: KL terms, the discretised decoder, the prior term,
and the full bound over all timesteps, as pure jit-able functions.

References:
  [DDPM]  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021.

Conventions are `diffusion`'s: x is [B, H, W, C] (any rank >= 1; the batch is axis 0), data in
[-1, 1], t int32 [B] in [0, T), the model enters as `model_fn(x, t, cond)`.

  -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0                              [DDPM eq. 5]

with L_T = `prior_bpd`, L_{t-1} and L_0 = `vb_terms_bpd` (the KL against the posterior, or the
decoder NLL `discretized_gaussian_log_likelihood` at t = 0), and the whole sum `calc_bpd_loop`.
Everything is computed in at least float32, whatever the input dtype.
"""

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxddpm import diffusion
from jaxddpm.diffusion import ModelFn, call_model, check_types, mean_flat
from jaxddpm.diffusion import p_mean_variance_from_output, predict_eps_from_xstart
from jaxddpm.diffusion import q_mean_variance, q_posterior_mean_variance, q_sample
from jaxddpm.schedules import Schedule

_float = diffusion._float  # pylint: disable=protected-access  (one dtype rule for the core)


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
                 clip_denoised: bool = True, cond: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, jax.Array]:
  """`vb_terms_bpd_from_output` with the model called on (x_t, t); output [B] bits/dim."""
  model_output = call_model(model_fn, schedule, x_t, t, cond)
  return vb_terms_bpd_from_output(
      schedule, model_output, x_start, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised)


# --- Bits per dimension --------------------------------------------------------------------------


def calc_bpd_loop(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, key: jax.Array, *,
                  model_mean_type: str, model_var_type: str, clip_denoised: bool = True,
                  cond: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
  """The full variational bound -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim
  [DDPM eq. 5; IDDPM eq. 4], with one draw of x_t per timestep, over all T terms (lax.scan).

  Args:
    model_fn: model_fn(x, t, cond).
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
                       cond=cond)
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
