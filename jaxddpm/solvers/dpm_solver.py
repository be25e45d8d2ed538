"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): multistep 2M and 3M, and the SDE variant 2M SDE, in data prediction.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), the
diffusion ODE solved with the data prediction x_theta has the exact solution (DPM-Solver++,
eq. 8)

  x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta d lambda.

Step i goes from grid point s0 = i to t = i + 1 with h = lambda_t - lambda_s0, earlier points
s1 = i - 1, s2 = i - 2, h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2,
r0 = h_0 / h, r1 = h_1 / h, and D_j the model's x_0 prediction at point j (m0 = D_i, ...):

  order 1 (DDIM)      x_t = (sigma_t / sigma_s0) x_s0 + alpha_t (1 - e^-h) m0
  2M (Algorithm 2)    ... + alpha_t (1 - e^-h) (m0 + D1 / 2),   D1 = (m0 - m1) / r0
  3M                  x_t = (sigma_t / sigma_s0) x_s0 + alpha_t (1 - e^-h) m0
                            + alpha_t ((e^-h - 1) / h + 1) D1
                            - 2 alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2,
                      D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
                      D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)

3M integrates eq. 8 exactly with x_theta the quadratic through (lambda_j, D_j) at the last
three points: D1 = h x', D2 = h^2 x'' / 2 of that quadratic, and the x'' term of the integral is
alpha_t (h^2 / 2 - h + 1 - e^-h) x'' = -2 alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2. The authors'
multistep code (`multistep_dpm_solver_third_update`) and diffusers'
`multistep_dpm_solver_third_order_update` have the same D1, D2 but the D2 weight without the
factor 2 (their singlestep 'taylor' update does define D2 with it), which halves the x'' term:
their 3M is second order (on the Gaussian test problem its error falls as NFE^-2; this one's as
NFE^-3, tests/test_solvers_fewstep.py). Here the paper's expansion is followed. The SDE
variant solves the diffusion SDE instead, whose solution with data prediction is
x_t = (sigma_t / sigma_s) e^-h x_s + 2 alpha_t int e^{-2(lambda_t - lambda)} x_theta d lambda
+ sigma_t sqrt(1 - e^-2h) z; with x_theta at m0 + D1 / 2 over the step (the midpoint form of
2M)

  2M SDE   x_t = (sigma_t / sigma_s0) e^-h x_s0 + alpha_t (1 - e^-2h) (m0 + D1 / 2)
                 + sigma_t sqrt(1 - e^-2h) z,   z ~ N(0, I),

(diffusers' `sde-dpmsolver++`, `solver_type='midpoint'`; the first step drops D1; z is drawn
from the solver half of each operation's key, `base.split_op_key`).

Shapes: x and every D_j are [B, ...] float32; the coefficients are per step, [N] and [N, K + 1]
(`multistep`).

Orders, as diffusers' `DPMSolverMultistepScheduler` (lower_order_final=True): the first steps
use the orders the history allows (1, then 2); the last step, to the data (sigma = 0, h = inf,
where the update is x = m0), is first order; with fewer than 15 steps the one before it is at
most second order. (The authors' code lowers the order below 10 steps only, though its
docstring says 15.) The model's times come from `time_grids`; point N is the data.
"""

from __future__ import annotations

import numpy as np

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import multistep
from jaxddpm.solvers import time_grids

# Few steps: the paper's and diffusers' threshold for lowering the order at the end.
LOWER_ORDER_FINAL_BELOW = 15


def log_snr_grid(schedule: schedules_lib.Schedule, times: np.ndarray):
  """(alpha, sigma, lambda) float64 [N + 1] at the grid points of `times`, the data last
  (alpha 1, sigma 0, lambda +inf)."""
  abar = np.append(time_grids.alphas_cumprod64(schedule)[np.asarray(times)], 1.0)
  alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(sigma)
  return alpha, sigma, lam


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """int [N], the order of each step (see the module docstring)."""
  orders = np.minimum(order, np.arange(num_steps) + 1)
  orders[-1] = 1  # the step to sigma = 0
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW and num_steps >= 2:
    orders[-2] = min(orders[-2], 2)
  return orders


def _derivative_weights(r0: float, r1: float | None):
  """(D1, D2) as weights on (m0, m1, m2) (the module docstring's divided differences)."""
  d1_0 = np.array([1.0, -1.0, 0.0]) / r0
  if r1 is None:
    return d1_0, np.zeros(3)
  d1_1 = np.array([0.0, 1.0, -1.0]) / r1
  return d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def coefficients(schedule: schedules_lib.Schedule, times: np.ndarray, order: int, *,
                 stochastic: bool = False, lower_order_final: bool = True) -> dict:
  """The float64 tables of `multistep.LinearMultistep` for DPM-Solver++(order M) [SDE].

  Args:
    schedule: the training schedule; times: int [N] its descending indices (grid points
      0..N-1; point N is the data).
    order: 2 or 3 (stochastic: 2).

  Returns:
    dict(x_coef [N], data_coef [N, order], and noise_coef [N] when stochastic): the weights
    of x_i and of (D_i, D_{i-1}, ...) in x_{i+1}.
  """
  alpha, sigma, lam = log_snr_grid(schedule, times)
  n = len(times)
  x_coef, noise_coef = np.zeros(n), np.zeros(n)
  data_coef = np.zeros((n, order))
  for i, step_order in enumerate(step_orders(n, order, lower_order_final)):
    h = lam[i + 1] - lam[i]
    # alpha_t (1 - e^-h) (ODE) or alpha_t (1 - e^-2h) (SDE); expm1 keeps small h accurate.
    phi = -alpha[i + 1] * np.expm1(-2.0 * h if stochastic else -h)
    x_coef[i] = sigma[i + 1] / sigma[i] * (np.exp(-h) if stochastic else 1.0)
    weights = np.array([1.0, 0.0, 0.0])
    if step_order >= 2:
      r0 = (lam[i] - lam[i - 1]) / h
      r1 = (lam[i - 1] - lam[i - 2]) / h if step_order == 3 else None
      d1, d2 = _derivative_weights(r0, r1)
      if step_order == 2:
        weights = weights + 0.5 * d1
      else:
        psi1 = alpha[i + 1] * (np.expm1(-h) / h + 1.0)
        psi2 = 2.0 * alpha[i + 1] * ((np.expm1(-h) + h) / h ** 2 - 0.5)
        weights = weights + (psi1 * d1 - psi2 * d2) / phi
    data_coef[i] = (phi * weights)[:order]
    if stochastic:
      noise_coef[i] = sigma[i + 1] * np.sqrt(-np.expm1(-2.0 * h))
  tables = dict(x_coef=x_coef, data_coef=data_coef)
  if stochastic:
    tables['noise_coef'] = noise_coef
  return tables


def dpm_solver_pp(schedule: schedules_lib.Schedule, num_steps: int, *, order: int = 2,
                  stochastic: bool = False, spacing: str = 'logSNR',
                  lower_order_final: bool = True, **prediction) -> multistep.LinearMultistep:
  """DPM-Solver++(2M), (3M) or (2M) SDE with `num_steps` model evaluations. Host-side.

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    num_steps: N >= order, the number of steps and of model evaluations.
    order: 2 or 3; stochastic: the SDE variant (order 2 only).
    spacing: a name in `time_grids.TIME_SPACINGS`.
    lower_order_final: lower the order of the last steps (see the module docstring).
    prediction: model_mean_type, model_var_type, clip_denoised, thresholding
      (`base.prediction_fields`).

  Raises:
    ValueError: naming the bad argument.
  """
  if order not in (2, 3) or (stochastic and order != 2):
    raise ValueError(f'DPM-Solver++ has orders 2 and 3 (the SDE variant 2), got {order}')
  if num_steps < order:
    raise ValueError(f'DPM-Solver++({order}M) needs at least {order} steps, got {num_steps}')
  times = time_grids.timesteps(schedule, num_steps, spacing)
  tables = coefficients(schedule, times, order, stochastic=stochastic,
                        lower_order_final=lower_order_final)
  return multistep.make(schedule, times, tables,
                        prediction=base.prediction_fields(**prediction))
