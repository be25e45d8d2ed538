"""Time grids of the few-step solvers, on the noise levels a DDPM-trained model knows.

A DDPM-trained network has seen only the T integer timesteps of its schedule, at the noise
levels (VE sigma, Karras et al. 2022 sec. 2 with s(t) = sqrt(abar_t))

  sigma_t = sqrt((1 - abar_t) / abar_t),   lambda_t = log(alpha_t / sigma_t) = -log sigma_t,

(lambda the half log-SNR of DPM-Solver, Lu et al. 2022, sec. 3.1). A spacing picks N of them,
from sigma_{T-1} downwards; the solvers then step to the data (sigma = 0) at the end.

  time_uniform  t_j = round((T - 1)(1 - j / N)), j = 0..N-1: uniform in the index, the
                data one more stride below t_{N-1} (DPM-Solver's 'time_uniform' in diffusers'
                form, `timestep_spacing='linspace'`: linspace(0, T-1, N+1) rounded, without 0).
  logSNR        lambda_j uniform from lambda_{T-1} to lambda_0, N points (DPM-Solver sec. 3.3,
                "uniform logSNR"; diffusers' use_lu_lambdas).
  karras        sigma_j = (sigma_max^(1/rho) + j/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
                rho = 7, sigma_max = sigma_{T-1}, sigma_min = sigma_0 (Karras et al. 2022, eq. 5).

The continuous spacings (logSNR, karras) are rounded to the trained level nearest in
log sigma (`distinct_nearest_timesteps`: two points never share a level), and the solver then
uses that level's own sigma: model and solver always agree on
the noise level, and the network sees integer timesteps, as every model of the registry
expects. This is EDM's treatment of a discrete-time model (Karras et al. 2022, reference
code, `iDDPMPrecond.round_sigma`, which rounds sigma itself rather than log sigma: the two differ
only where a wanted sigma falls between the arithmetic and the geometric mean of two
neighbouring levels). diffusers rounds the timestep the same way (the nearest index in log sigma,
`_sigma_to_t(...).round()`) but keeps the unrounded sigma in the update, so there the model
is evaluated at a slightly different noise level from the one the solver assumes.

Everything here is host-side float64 NumPy.
"""

from __future__ import annotations

import numpy as np

from jaxddpm import schedules as schedules_lib

TIME_SPACINGS = ('time_uniform', 'logSNR', 'karras')
KARRAS_RHO = 7.0


def alphas_cumprod64(schedule: schedules_lib.Schedule) -> np.ndarray:
  """float64 [T] abar_t: the schedule's exact `alphas_cumprod64`, else its float32 values."""
  if schedule.alphas_cumprod64 is not None:
    return np.asarray(schedule.alphas_cumprod64.array, np.float64)
  return np.asarray(schedule.alphas_cumprod, np.float64)


def trained_sigmas(schedule: schedules_lib.Schedule) -> np.ndarray:
  """float64 [T] sigma_t = sqrt((1 - abar_t) / abar_t), increasing in t."""
  abar = alphas_cumprod64(schedule)
  return np.sqrt((1.0 - abar) / abar)


def nearest_timesteps(schedule: schedules_lib.Schedule, sigmas) -> np.ndarray:
  """int64 indices t of the trained levels nearest to `sigmas` in log sigma (ties: lower t)."""
  log_levels = np.log(trained_sigmas(schedule))
  log_wanted = np.log(np.asarray(sigmas, np.float64))
  return np.argmin(np.abs(log_levels[None, :] - log_wanted[:, None]), axis=1).astype(np.int64)


def distinct_nearest_timesteps(schedule: schedules_lib.Schedule, sigmas) -> np.ndarray:
  """int64 [N] descending indices: for decreasing `sigmas` [N], point j is the level nearest
  to sigmas[j] in log sigma among those below point j - 1 that leave room for the N - 1 - j
  points after it. Where no two wanted sigmas share a nearest level this is
  `nearest_timesteps`; where they do (the cosine schedule's last step, clipped to
  beta = 0.999, spans 3.5 in log sigma, more than a logSNR or Karras step at N >= 7), the later
  point moves to the next lower level instead of repeating one."""
  log_levels = np.log(trained_sigmas(schedule))
  log_wanted = np.log(np.asarray(sigmas, np.float64))
  n, out, upper = len(log_wanted), [], len(log_levels)
  for j, w in enumerate(log_wanted):
    low = n - 1 - j
    candidates = np.arange(low, upper)
    t = int(candidates[np.argmin(np.abs(log_levels[low:upper] - w))])
    out.append(t)
    upper = t
  return np.asarray(out, np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_points: int,
                  rho: float = KARRAS_RHO) -> np.ndarray:
  """float64 [N] sigma_j of Karras et al. 2022, eq. 5, from sigma_max down to sigma_min."""
  ramp = np.linspace(0.0, 1.0, num_points)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def timesteps(schedule: schedules_lib.Schedule, num_points: int, spacing: str) -> np.ndarray:
  """The N = num_points model times of `spacing`, int64 indices descending from T - 1.

  Raises:
    ValueError: an unknown spacing, or num_points outside [1, T - 1].
  """
  if spacing not in TIME_SPACINGS:
    raise ValueError(f'unknown time spacing {spacing!r}; expected one of {TIME_SPACINGS}')
  t_total = schedule.num_timesteps
  if not 1 <= num_points < t_total:
    raise ValueError(f'{num_points} time points do not fit between the data and the '
                     f'T = {t_total} trained timesteps; use 1 to {t_total - 1}')
  sigmas = trained_sigmas(schedule)
  if spacing == 'time_uniform':
    return np.round(np.linspace(0, t_total - 1, num_points + 1))[::-1][:-1].astype(np.int64)
  if spacing == 'logSNR':
    wanted = np.exp(np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), num_points))
  else:
    wanted = karras_sigmas(sigmas[0], sigmas[-1], num_points)
  return distinct_nearest_timesteps(schedule, wanted)
