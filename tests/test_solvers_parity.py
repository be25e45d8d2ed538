"""The few-step solvers against diffusers' schedulers and float64 NumPy derivations.

tests/fixtures/solver_parity.npz holds diffusers' trajectories (DPMSolverMultistepScheduler
2M / 3M / 2M SDE, UniPCMultistepScheduler order 2 and 3, HeunDiscreteScheduler) on the
optimal denoiser of Gaussian data, for the linear (eps model) and cosine (x0 model)
schedules at T = 1000, on jaxddpm's time grids; `python tests/fixtures/make_solver_fixture.py`
writes it (with torch and diffusers; this test needs neither). Each solver's sample after
every step must match to 1e-5 of the trajectory's scale at that step, in float32. (Heun's
reference is diffusers' scheduler run in float64 on the same float32 sigmas: its trapezoidal
correction weighs round-off by (sigma_i / sigma_{i+1} - 1) / 2, about 35 in the cosine grids'
last step into sigma_0 = 0.0064, where any float32 run is only good to about 1e-5.)

DPM-Solver++(3M) is the exception: diffusers (and the authors' multistep code) weight its
second divided difference D2 by half the paper's Taylor coefficient (`jaxddpm.solvers.
dpm_solver`). Its test follows the paper: a float64 NumPy derivation that integrates the
exponentially weighted integral of DPM-Solver++ eq. 8 exactly for the interpolating polynomial
of the last three predictions; the same derivation with the x'' term halved reproduces
diffusers' trajectory, which pins the deviation to that one term.
"""

import os

import jax
import numpy as np
import pytest

from jaxddpm import schedules
from jaxddpm import solvers
import gaussian

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'solver_parity.npz')
TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def _case_names():
  with np.load(FIXTURE) as f:
    return sorted(k.split('/')[0] for k in f.files if k.endswith('/case'))


def _relative_error(got, want) -> float:
  """max over steps of max |got - want| / max |want| (each step at its own scale)."""
  got, want = (np.asarray(a, np.float64).reshape(len(want), -1) for a in (got, want))
  return float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max())


def _setup(fixture, name):
  solver_name, spacing, nfe, order, mean_type, schedule_name = fixture[f'{name}/case']
  schedule = schedules.make_schedule(str(schedule_name), 1000)
  solver = solvers.make_solver(schedule, str(solver_name), num_steps=int(nfe),
                               timestep_spacing=str(spacing), order=int(order) or None,
                               model_mean_type=str(mean_type), clip_denoised=False)
  model_fn = gaussian.optimal_model(schedule.alphas_cumprod, str(mean_type))
  return schedule, solver, model_fn


def _trajectory(solver, model_fn, fixture):
  plan = solvers.make_plan(solver, num_chunks=1, intermediate_every=1)
  _, xs = solvers.sample(model_fn, plan, jax.random.key(int(fixture['seed'])),
                         x_T=fixture['x_T'], return_intermediates=True)
  return np.asarray(xs)


@pytest.mark.parametrize('name', _case_names())
def test_trajectory_matches_diffusers(fixture, name):
  schedule, solver, model_fn = _setup(fixture, name)
  theirs = fixture[f'{name}/diffusers_timesteps']
  ours = np.asarray(solver.times)
  if len(np.unique(theirs)) == len(theirs):  # the same grid where diffusers' has no repeats
    np.testing.assert_array_equal(ours, theirs)
  else:  # cosine: diffusers repeats the top level, ours takes the next ones
    assert name.startswith('cosine') and len(np.unique(ours)) == len(ours)
  got = _trajectory(solver, model_fn, fixture)
  want = fixture[f'{name}/trajectory']
  if 'dpmpp_3m' in name:
    reference = _dpmpp_3m_reference(schedule, ours, fixture, name)
    assert _relative_error(got, reference) < TOLERANCE
    halved = _dpmpp_3m_reference(schedule, ours, fixture, name, x2_weight=0.5)
    assert _relative_error(want, halved) < TOLERANCE  # diffusers: the x'' term halved
    assert _relative_error(got, want) > 10 * TOLERANCE  # ... a real difference
  else:
    assert _relative_error(got, want) < TOLERANCE


def _numpy_model(schedule, mean_type):
  """float64 x0 prediction of the optimal model (the mean type is converted back to x0)."""
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  mu, s = gaussian.MU, gaussian.S

  def x0(x, t):
    a = abar[t]
    return mu + s ** 2 * np.sqrt(a) * (x - np.sqrt(a) * mu) / (a * s ** 2 + 1 - a)

  del mean_type  # eps, x0 and v of the optimal model all give this x0
  return x0


def _dpmpp_3m_reference(schedule, times, fixture, name, x2_weight=1.0):
  """DPM-Solver++(3M) in float64: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} I,
  I = int_0^h e^{u - h} P(u) du with P the polynomial through the predictions at lambda_i,
  lambda_{i-1}, lambda_{i-2} (u = lambda - lambda_i), from the moments
  M_k = int_0^h e^{u - h} u^k du. Warm-up and last steps as diffusers: order 1, then 2 (the
  midpoint rule of Algorithm 2), order <= 2 one step before the end below 15 steps, order 1
  at the last step (to sigma = 0: x = D). x2_weight scales the u^2 term."""
  abar = np.append(schedule.alphas_cumprod64.array[times], 1.0)
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  lam = np.log(alpha[:-1] / sigma[:-1])
  model = _numpy_model(schedule, str(fixture[f'{name}/case'][4]))
  n = len(times)
  x = np.asarray(fixture['x_T'], np.float64)
  preds, out = [], []
  for i in range(n):
    preds.insert(0, model(x, times[i]))
    order = min(3, i + 1)
    if n < 15 and i == n - 2:
      order = min(order, 2)
    if i == n - 1:
      x = preds[0]
      out.append(x)
      continue
    h = lam[i + 1] - lam[i]
    moments = [-np.expm1(-h), h - 1 + np.exp(-h), h * h - 2 * h + 2 - 2 * np.exp(-h)]
    if order == 2:
      r0 = (lam[i] - lam[i - 1]) / h
      integral = moments[0] * (preds[0] + 0.5 * (preds[0] - preds[1]) / r0)
    else:
      u = np.array([lam[i - k] - lam[i] for k in range(order)])
      coef = np.linalg.solve(np.vander(u, order, increasing=True),
                             np.stack([p.ravel() for p in preds[:order]]))
      weights = np.array(moments[:order]) * np.array([1.0, 1.0, x2_weight][:order])
      integral = (weights @ coef).reshape(x.shape)
    x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * integral
    out.append(x)
  return np.stack(out)


def test_time_grids_are_the_papers_formulas():
  """karras: EDM eq. 5 (rho = 7) between the schedule's sigma_0 and sigma_{T-1}; logSNR:
  uniform lambda; both rounded to the trained level nearest in log sigma; time_uniform:
  diffusers' round(linspace(0, T - 1, N + 1)) without 0. float64 NumPy references."""
  schedule = schedules.make_schedule('linear', 1000)
  abar = schedule.alphas_cumprod64.array
  sig = np.sqrt((1 - abar) / abar)
  n = 12
  ramp = np.arange(n) / (n - 1)
  karras = (sig[-1] ** (1 / 7) + ramp * (sig[0] ** (1 / 7) - sig[-1] ** (1 / 7))) ** 7
  logsnr = np.exp(np.log(sig[-1]) + ramp * (np.log(sig[0]) - np.log(sig[-1])))
  for spacing, wanted in (('karras', karras), ('logSNR', logsnr)):
    got = solvers.time_grids.timesteps(schedule, n, spacing)
    nearest = [int(np.argmin(np.abs(np.log(sig) - np.log(w)))) for w in wanted]
    np.testing.assert_array_equal(got, nearest)
  uniform = solvers.time_grids.timesteps(schedule, n, 'time_uniform')
  np.testing.assert_array_equal(uniform, [999, 916, 832, 749, 666, 583, 500, 416, 333, 250,
                                          166, 83])
  # The cosine schedule's last step spans 3.5 in log sigma: later points take the next levels.
  cosine = solvers.time_grids.timesteps(schedules.make_schedule('cosine', 1000), n, 'karras')
  assert cosine[0] == 999 and np.all(np.diff(cosine) < 0) and cosine[-1] == 0
  with pytest.raises(ValueError, match='do not fit'):
    solvers.time_grids.timesteps(schedule, 1000, 'logSNR')
