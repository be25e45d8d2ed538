"""Heun's second-order method with optional stochastic churn (EDM, Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2).

In EDM's variables, x = x_vp / sqrt(abar) (s(t) = sqrt(abar), Table 1's VP scaling removed) at
noise level sigma = sqrt((1 - abar) / abar) follows the probability-flow ODE
dx / d sigma = (x - D(x; sigma)) / sigma (eq. 1 with sigma(t) = t, s(t) = 1), D the x_0
prediction. For i = 0..N-1, with sigma_N = 0:

  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
  sigma^_i = sigma_i (1 + gamma_i),  x^_i = x_i + sqrt(sigma^_i^2 - sigma_i^2) eps,
                                     eps ~ N(0, S_noise^2 I)
  d_i = (x^_i - D(x^_i; sigma^_i)) / sigma^_i,   x_{i+1} = x^_i + (sigma_{i+1} - sigma^_i) d_i
  if sigma_{i+1} != 0:  d'_i = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1},
                        x_{i+1} = x^_i + (sigma_{i+1} - sigma^_i) (d_i + d'_i) / 2

2N - 1 model evaluations (the last step is Euler's). The sigmas are trained levels
(`time_grids`; Karras' sigmas by default), and so is sigma^_i: EDM's reference code rounds it
to the nearest level of a discrete-time model (`iDDPMPrecond.round_sigma`), here in log sigma
as `time_grids` does; the network sees that level's integer timestep. Without churn this is
diffusers' `HeunDiscreteScheduler` on the same sigmas (which has no churn; its
`init_noise_sigma` for 'linspace' spacing is sigma_max rather than sqrt(sigma_max^2 + 1), a
relative difference of 1 / (2 sigma_max^2); here the start is x_T itself).

The state holds x_vp = x / sqrt(1 + sigma^2), as every solver's state (`base.Grid`): the
wrappers see the usual noise levels. The step is written as
x_{i+1} = (sigma_{i+1} / sigma^_i) x^_i + (1 - sigma_{i+1} / sigma^_i) D(x^_i) (Euler) and
x_{i+1} <- x_{i+1} + (sigma_{i+1} - sigma^_i) / (2 sigma_{i+1}) (D(x^_i) - D(x_{i+1})) (since
d'_i - d_i = (D(x^_i) - D(x_{i+1})) / sigma_{i+1} after the Euler step), the same update arranged
so that float32 neither subtracts two numbers of the size of sigma^_i x (2e4 at the top of the
cosine schedule) nor divides the round-off of x by a small sigma_{i+1}: Algorithm 2 as written
loses up to 1e-4 of the result there.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import time_grids


@flax.struct.dataclass
class Heun(base.Denoising):
  """EDM's Heun solver; the other fields are `base.Denoising`'s. Build with `heun`.

  times: int32 [N], the schedule index of sigma_i, i < N.
  sigmas: float32 [N + 1], sigma_i, with sigma_N = 0.
  gammas: float32 [N], gamma_i (zeros without churn).
  s_noise: float32 scalar, S_noise.
  churn: static, whether any gamma_i > 0 (then steps draw noise and round sigma^_i).
  """
  times: jax.Array
  sigmas: jax.Array
  gammas: jax.Array
  s_noise: jax.Array
  churn: bool = flax.struct.field(pytree_node=False)

  multistep = False

  @property
  def nfe(self) -> int:
    return 2 * self.times.shape[0] - 1

  def init(self, x_T: jax.Array, key: jax.Array) -> base.SolverState:
    del key  # the start is x_T itself
    return base.SolverState(x=x_T)

  def _denoised(self, model_fn, x_vp, t, cond) -> jax.Array:
    """D(x; sigma_t) for x = x_vp / sqrt(abar_t)."""
    return self.predict(model_fn, x_vp, t, cond)['pred_xstart']

  def _churned(self, x: jax.Array, i, key: jax.Array):
    """(x^_i, sigma^_i, its timestep): the noise of the churn added at a trained level."""
    levels = self.schedule.sqrt_recipm1_alphas_cumprod  # sigma_t, increasing in t
    wanted = self.sigmas[i] * (1.0 + self.gammas[i])
    t_hat = jnp.argmin(jnp.abs(jnp.log(levels) - jnp.log(wanted))).astype(jnp.int32)
    sigma_hat = levels[t_hat]
    noise_key, _ = base.split_op_key(key)
    eps = self.s_noise * jax.random.normal(noise_key, x.shape, x.dtype)
    return x + jnp.sqrt(jnp.maximum(sigma_hat ** 2 - self.sigmas[i] ** 2, 0.0)) * eps, \
        sigma_hat, t_hat

  def step(self, model_fn, state: base.SolverState, i, key, cond) -> base.SolverState:
    """x_i -> x_{i+1} (Algorithm 2, lines 4-10); x [B, ...] float32, noise level alpha_i."""
    sigma_next = self.sigmas[i + 1]
    x = state.x / self.grid.alpha[i]
    if self.churn:
      x, sigma_hat, t_hat = self._churned(x, i, key)
      x_vp = x * self.schedule.sqrt_alphas_cumprod[t_hat]
    else:
      sigma_hat, t_hat, x_vp = self.sigmas[i], self.times[i], state.x
    denoised = self._denoised(model_fn, x_vp, t_hat, cond)
    ratio = sigma_next / sigma_hat
    x_next = ratio * x + (1.0 - ratio) * denoised  # = x^_i + (sigma_{i+1} - sigma^_i) d_i
    last = self.times.shape[0] - 1

    def corrected():  # (d'_i - d_i) / 2 = (D(x^_i) - D(x_{i+1})) / (2 sigma_{i+1})
      t_next = self.times[jnp.minimum(i + 1, last)]
      denoised_next = self._denoised(model_fn, x_next * self.grid.alpha[i + 1], t_next, cond)
      weight = 0.5 * (sigma_next - sigma_hat) / sigma_next
      return x_next + weight * (denoised - denoised_next)

    x_next = jax.lax.cond(i < last, corrected, lambda: x_next)
    return state.replace(x=x_next * self.grid.alpha[i + 1])


def heun(schedule: schedules_lib.Schedule, num_evaluations: int, *, spacing: str = 'karras',
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float('inf'),
         s_noise: float = 1.0, **prediction) -> Heun:
  """Heun (EDM) with at most `num_evaluations` model calls: N = (num_evaluations + 1) // 2
  sigmas, 2N - 1 calls (`Heun.nfe`). Host-side.

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    num_evaluations: NFE >= 3 (N >= 2).
    spacing: a name in `time_grids.TIME_SPACINGS` ('karras', rho = 7, as EDM).
    s_churn, s_tmin, s_tmax, s_noise: EDM's S_churn >= 0, S_tmin <= S_tmax, S_noise > 0
      (s_churn = 0: the deterministic sampler, Algorithm 1).
    prediction: model_mean_type, model_var_type, clip_denoised, thresholding
      (`base.prediction_fields`).

  Raises:
    ValueError: naming the bad argument.
  """
  num_points = (num_evaluations + 1) // 2
  if num_points < 2:
    raise ValueError(f'Heun needs at least 3 model evaluations (2 sigmas: one Heun step and '
                     f'the final Euler step), got {num_evaluations}')
  if s_churn < 0 or not s_tmin <= s_tmax or s_noise <= 0:
    raise ValueError(f'need s_churn >= 0, s_tmin <= s_tmax and s_noise > 0, got s_churn = '
                     f'{s_churn}, s_tmin = {s_tmin}, s_tmax = {s_tmax}, s_noise = {s_noise}')
  times = time_grids.timesteps(schedule, num_points, spacing)
  sigmas = np.append(time_grids.trained_sigmas(schedule)[times], 0.0)
  in_range = (sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax)
  gammas = np.where(in_range, min(s_churn / num_points, np.sqrt(2.0) - 1.0), 0.0)
  return Heun(schedule=schedule, grid=base.index_grid(schedule, times),
              times=jnp.asarray(times, jnp.int32), sigmas=jnp.asarray(sigmas, jnp.float32),
              gammas=jnp.asarray(gammas, jnp.float32),
              s_noise=jnp.asarray(s_noise, jnp.float32), churn=bool(np.any(gammas > 0)),
              **base.prediction_fields(**prediction))
