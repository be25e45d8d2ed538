"""Ancestral sampling (DDPM, Ho et al. 2020, Algorithm 2), fixed or learned variances.

  x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I),   no noise at the last step,

with mu_theta the posterior mean at the predicted x_0 (DDPM eq. 7 and 11) and sigma_t^2 the
variance of `model_var_type`: beta_t or beta~_t (DDPM sec. 3.2), or the learned interpolation
of improved DDPM (Nichol & Dhariwal 2021, eq. 15); see `diffusion.p_mean_variance`.
"""

from __future__ import annotations

import flax
import jax.numpy as jnp

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base


@flax.struct.dataclass
class DDPM(base.DiscreteSolver):
  """Ancestral DDPM on a (respaced) schedule; fields as `base.DiscreteSolver`'s."""

  def step(self, model_fn, state: base.SolverState, i, key, cond) -> base.SolverState:
    """x_t -> x_{t-1} at t = times[i]; x [B, ...] float32."""
    _, out, noise, not_last = self.step_terms(model_fn, state.x, i, key, cond)
    return state.replace(x=out['mean'] + not_last * jnp.exp(0.5 * out['log_variance']) * noise)


def ddpm(schedule: schedules_lib.Schedule, *, model_mean_type: str = 'eps',
         model_var_type: str = 'fixedlarge', clip_denoised: bool = True,
         thresholding: float | None = None) -> DDPM:
  """Ancestral sampling over every index of `schedule` (respace it first for fewer steps)."""
  return DDPM(**base.discrete_fields(schedule, model_mean_type=model_mean_type,
                                     model_var_type=model_var_type,
                                     clip_denoised=clip_denoised,
                                     thresholding=thresholding))
