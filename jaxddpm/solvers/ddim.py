"""DDIM(eta) (Song, Meng, Ermon 2021, eq. 12 with the sigma of eq. 16).

  x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
  sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}),

with no noise at the last step. eta = 0 is deterministic given x_T (the probability-flow
ODE's first-order discretisation); eta = 1 has DDPM's posterior variance beta~_t. eps_hat is
consistent with the (possibly clipped) x0_hat, so clipping moves both.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base


@flax.struct.dataclass
class DDIM(base.DiscreteSolver):
  """DDIM on a (respaced) schedule; fields as `base.DiscreteSolver`'s, and
  eta: float32 scalar in [0, 1] (a leaf: a new eta does not recompile)."""
  eta: jax.Array

  def step(self, model_fn, state: base.SolverState, i, key, cond) -> base.SolverState:
    """x_t -> x_{t-1} at t = times[i]; x [B, ...] float32."""
    t, out, noise, not_last = self.step_terms(model_fn, state.x, i, key, cond)
    abar = self.schedule.alphas_cumprod[t]
    abar_prev = self.schedule.alphas_cumprod_prev[t]
    sigma = (self.eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar))
             * jnp.sqrt(1.0 - abar / abar_prev))
    dir_xt = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * out['pred_eps']
    x_prev = jnp.sqrt(abar_prev) * out['pred_xstart'] + dir_xt + not_last * sigma * noise
    return state.replace(x=x_prev)


def ddim(schedule: schedules_lib.Schedule, *, eta: float = 0.0, model_mean_type: str = 'eps',
         model_var_type: str = 'fixedlarge', clip_denoised: bool = True,
         thresholding: float | None = None) -> DDIM:
  """DDIM over every index of `schedule` (respace it first for fewer steps).

  A learned variance is ignored (DDIM uses only the mean prediction).

  Raises:
    ValueError: eta outside [0, 1], or an unknown mean / variance type.
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f'eta must be in [0, 1], got {eta}')
  return DDIM(**base.discrete_fields(schedule, model_mean_type=model_mean_type,
                                     model_var_type=model_var_type, clip_denoised=clip_denoised,
                                     thresholding=thresholding),
              eta=jnp.asarray(eta, jnp.float32))
