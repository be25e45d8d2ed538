"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), the B(h) = e^h - 1 variant ('bh2') in data prediction, order 2 or 3.

Step i goes from grid point s0 = i to t = i + 1, h = lambda_t - lambda_s0 (lambda = log(alpha /
sigma)), with the model's x_0 predictions m0 = D_i and m_k = D_{i-k} at earlier points s_k,
r_k = (lambda_{s_k} - lambda_s0) / h, D1_k = (m_k - m0) / r_k. With hh = -h, B(h) = e^hh - 1
and the phi-functions h phi_1 = e^hh - 1, h phi_{k+1} = h phi_k / hh - 1 / k! (phi_k of the
exponential integrators), the order-p update is (UniP-p and UniC-p of the paper, sec. 3, in
their data-prediction form):

  UniP-p  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t h phi_1 m0 - alpha_t B(h) sum_{k<p} a_k D1_k,
  UniC-p  x_t^c = (sigma_t / sigma_s0) x_s0 - alpha_t h phi_1 m0
                  - alpha_t B(h) (sum_{k<p} a^c_k D1_k + a^c_p (D_t - m0)),

where D_t is the prediction at the predicted x_t itself (the next step's model call, so the
corrector costs no evaluation), and the a solve R a = g with R_{jk} = r_k^j (r_p = 1) and
g_j = h phi_{j+2} (j + 1)! / B(h), j = 0..p-1: UniC uses the full p x p system, UniP the
(p-1) x (p-1) one. As the authors' code and diffusers', UniP-2 uses a_1 = 1/2 (the h -> 0 limit
of its solved value) and UniC-1 a^c_1 = 1/2.

Each step first corrects the point it starts from (UniC of the previous step's order, with the
prediction just made), then predicts (UniP). This module writes the correction as the
increment x^c - x of the two formulas, which share their first terms, so the sample the step
receives (possibly modified by a wrapper, such as inpainting's replacement) is the one
corrected. Orders, as diffusers' `UniPCMultistepScheduler` (lower_order_final=True): step i
predicts with order min(order, i + 1, N - i); the last step, to the data (h = inf), is UniP-1,
x = m0. Hence the correction of the last model point does not reach the output (sigma_N = 0).
"""

from __future__ import annotations

import numpy as np

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import dpm_solver
from jaxddpm.solvers import multistep
from jaxddpm.solvers import time_grids


def _uni_terms(lam: np.ndarray, s0: int, t: int, order: int, corrector: bool):
  """(h phi_1, B(h), r [order - 1], a) of UniP-order (corrector False) or UniC-order at the
  step s0 -> t, the earlier points s0 - 1, s0 - 2, ... (module docstring)."""
  h = lam[t] - lam[s0]
  r = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)])
  hh = -h
  h_phi_1 = np.expm1(hh)
  b_h = np.expm1(hh)
  rks = np.append(r, 1.0)
  rows, g = [], []
  h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
  for j in range(1, order + 1):
    rows.append(rks ** (j - 1))
    g.append(h_phi_k * factorial / b_h)
    factorial *= j + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  big_r, g = np.stack(rows), np.array(g)
  if corrector:
    a = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, g)
  elif order == 1:
    a = np.zeros(0)
  else:
    a = np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], g[:-1])
  return h_phi_1, b_h, r, a


def _difference_weights(r: np.ndarray, width: int, offset: int) -> np.ndarray:
  """[len(r), width]: D1_k = (m_k - m0) / r_k as weights on the predictions, m0 at column
  `offset` and m_k at offset + k."""
  w = np.zeros((len(r), width))
  for k, r_k in enumerate(r, start=1):
    w[k - 1, offset + k] = 1.0 / r_k
    w[k - 1, offset] = -1.0 / r_k
  return w


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """int [N], the predictor order of each step (module docstring)."""
  i = np.arange(num_steps)
  limit = np.minimum(order, num_steps - i) if lower_order_final else order
  orders = np.minimum(limit, i + 1)
  orders[-1] = 1  # the step to sigma = 0
  return orders


def coefficients(schedule: schedules_lib.Schedule, times: np.ndarray, order: int, *,
                 lower_order_final: bool = True) -> dict:
  """The float64 tables of `multistep.LinearMultistep` for UniPC-bh2 of `order`.

  Returns:
    dict(x_coef [N], data_coef [N, order + 1], corrector_coef [N, order + 1]): columns are
    the predictions D_i, D_{i-1}, ..., D_{i-order}.
  """
  alpha, sigma, lam = dpm_solver.log_snr_grid(schedule, times)
  n, width = len(times), order + 1
  orders = step_orders(n, order, lower_order_final)
  x_coef = sigma[1:] / sigma[:-1]
  data_coef, corrector_coef = np.zeros((n, width)), np.zeros((n, width))
  for i, p in enumerate(orders):
    h_phi_1, b_h, r, a = _uni_terms(lam, i, i + 1, p, corrector=False)
    data_coef[i, 0] = -alpha[i + 1] * h_phi_1
    if len(a):
      data_coef[i] -= alpha[i + 1] * b_h * (a @ _difference_weights(r, width, 0)[:len(a)])
    if i == 0:
      continue
    # Correct x_i, which step i - 1 predicted with order q: UniC-q minus that UniP-q.
    q = orders[i - 1]
    _, b_h, r, a_c = _uni_terms(lam, i - 1, i, q, corrector=True)
    _, _, _, a_p = _uni_terms(lam, i - 1, i, q, corrector=False)
    diffs = _difference_weights(r, width, 1)
    a_p = np.concatenate([a_p, np.zeros(q - 1 - len(a_p))])
    increment = (a_c[:-1] - a_p) @ diffs
    increment[0] += a_c[-1]  # a^c_q (D_i - D_{i-1})
    increment[1] -= a_c[-1]
    corrector_coef[i] = -alpha[i] * b_h * increment
  return dict(x_coef=x_coef, data_coef=data_coef, corrector_coef=corrector_coef)


def unipc(schedule: schedules_lib.Schedule, num_steps: int, *, order: int = 2,
          spacing: str = 'logSNR', lower_order_final: bool = True,
          **prediction) -> multistep.LinearMultistep:
  """UniPC-bh2 of `order` (2 or 3) with `num_steps` model evaluations. Host-side.

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    num_steps: N >= order.
    spacing: a name in `time_grids.TIME_SPACINGS`.
    lower_order_final: lower the order of the last steps (module docstring).
    prediction: model_mean_type, model_var_type, clip_denoised, thresholding
      (`base.prediction_fields`).

  Raises:
    ValueError: naming the bad argument.
  """
  if order not in (2, 3):
    raise ValueError(f'UniPC has orders 2 and 3 here, got {order}')
  if num_steps < order:
    raise ValueError(f'UniPC of order {order} needs at least {order} steps, got {num_steps}')
  times = time_grids.timesteps(schedule, num_steps, spacing)
  tables = coefficients(schedule, times, order, lower_order_final=lower_order_final)
  return multistep.make(schedule, times, tables,
                        prediction=base.prediction_fields(**prediction))

