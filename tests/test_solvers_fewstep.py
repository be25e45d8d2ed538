"""The few-step solvers (DPM-Solver++, UniPC, Heun) on the analytic model: convergence order,
mean types, guidance, inpainting, sharding, churn, thresholding and the errors of bad options.

The model is the optimal denoiser of Gaussian data (tests/gaussian.py), whose probability-flow
ODE has a closed-form solution. Parity with diffusers is in test_solvers_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import diffusion
from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm.models import conditioning
from jaxddpm.solvers import inpainting
import gaussian

T = 1000
SHAPE = (2, 4, 4, 1)


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule('linear', T)


def _run_eagerly(solver, model_fn, x_T, key, cond=None):
  """The solver's steps without jit, as the driver derives keys (operation k: fold_in(key, k))."""
  state = solver.init(jnp.asarray(x_T, jnp.float32), key)
  for k in range(solver.grid.num_steps):
    state = solver.step(model_fn, state, k, jax.random.fold_in(key, k), cond or {})
  return np.asarray(state.x)


# Solvers and options covering every family, with and without noise.
FEW_STEP = [('dpmpp_2m', {}), ('dpmpp_3m', {}), ('dpmpp_2m_sde', {}), ('unipc', {}),
            ('unipc', {'order': 3}), ('heun', {}), ('heun', {'s_churn': 5.0})]


@pytest.mark.parametrize('name,order', [('dpmpp_2m', 2), ('dpmpp_3m', 3), ('heun', 2)])
def test_error_falls_at_the_solvers_order(name, order):
  """log-log slope of the error against the exact PF-ODE solution vs the number of steps.

  The schedule's 1025 levels are uniform in lambda = log(alpha / sigma) on [-5, 1.6], so the
  logSNR grids of 33, 65 and 129 points are lattice points with exactly uniform steps (a
  DDPM schedule's lowest levels are 0.35 apart in lambda, which no finer grid can follow).
  The data are N(0.3, 0.3^2), and the last model time, sigma = e^-1.6 = 0.2, lies in the middle
  of their denoising; the error is that of the sample there, against the closed form. (The
  step after it, to sigma = 0, is x = D(x) for every solver, a fixed map.) DPM-Solver++(3M) as
  diffusers writes it falls at order 2 here (`jaxddpm.solvers.dpm_solver`)."""
  s = 0.3
  schedule = schedules.schedule_from_betas(gaussian.lambda_uniform_betas(1025, -5.0, 1.6))
  abar = schedule.alphas_cumprod64.array
  model_fn = gaussian.optimal_model(schedule.alphas_cumprod, s=s)
  x_T = jax.random.normal(jax.random.key(0), (16, 1, 1, 1))
  points, errors = np.array([33, 65, 129]), []
  for n in points:
    solver = solvers.make_solver(schedule, name, num_steps=2 * n - 1 if name == 'heun' else n,
                                 timestep_spacing='logSNR', clip_denoised=False)
    plan = solvers.make_plan(solver, (np.arange(n - 1), np.full(n - 1, solvers.OP_STEP)),
                             num_chunks=1)
    x = np.asarray(solvers.sample(model_fn, plan, jax.random.key(1), x_T=x_T), np.float64)
    exact = gaussian.exact_ode_solution(x_T, abar[-1], abar[solver.times[-1]], s=s)
    errors.append(np.sqrt(np.mean((x - exact) ** 2)))
  slope = -np.polyfit(np.log(points - 1), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize('name,options', FEW_STEP)
def test_every_mean_type_gives_the_same_samples(schedule, name, options):
  """eps, x0 and v predictions of the same denoiser, the latter with a learned_range variance
  output (ignored: these solvers use the mean), give one trajectory."""
  x_T = jax.random.normal(jax.random.key(2), SHAPE)
  outs = []
  for mean_type, var_type in (('eps', 'fixedlarge'), ('x0', 'fixedsmall'),
                              ('v', 'learned_range')):
    solver = solvers.make_solver(schedule, name, num_steps=9, model_mean_type=mean_type,
                                 model_var_type=var_type, clip_denoised=False, **options)
    model_fn = gaussian.optimal_model(schedule.alphas_cumprod, mean_type, var_type)
    outs.append(_run_eagerly(solver, model_fn, x_T, jax.random.key(3)))
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)
  np.testing.assert_allclose(outs[2], outs[0], atol=2e-5)
  assert np.abs(outs[0] - np.asarray(x_T)).max() > 0.1


@pytest.mark.parametrize('name', ['dpmpp_2m_sde', 'heun'])
def test_classifier_free_guidance(schedule, name):
  """The guidance wrapper on the class-conditional optimal eps (data mean 0.2 y, the null
  class 10 at mean 0) samples as the guided eps written out, (1 + w) eps_y - w eps_null."""
  w, abar = 2.0, jnp.asarray(schedule.alphas_cumprod)

  def eps(x, t, mu):
    a = abar[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * gaussian.S ** 2 + 1 - a)

  def model_fn(x, t, cond):
    y = cond['label'][:, None, None, None]
    return eps(x, t, jnp.where(y == 10, 0.0, 0.2 * y))

  def guided_by_hand(x, t, cond):
    return (1 + w) * model_fn(x, t, cond) - w * eps(x, t, 0.0)

  solver = solvers.make_solver(schedule, name, num_steps=11, clip_denoised=False,
                               **({'s_churn': 5.0} if name == 'heun' else {}))
  cond = {'label': jnp.array([1, 4])}
  wrapped = solvers.classifier_free_guidance(model_fn, w, {'label': conditioning.Label(10)})
  a = solvers.sample(wrapped, solver, jax.random.key(4), SHAPE, cond=cond)
  b = solvers.sample(guided_by_hand, solver, jax.random.key(4), SHAPE, cond=cond)
  np.testing.assert_allclose(a, b, atol=2e-5)
  plain = solvers.sample(model_fn, solver, jax.random.key(4), SHAPE, cond=cond)
  assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 0.1


@pytest.mark.parametrize('name', ['dpmpp_2m', 'unipc', 'heun'])
def test_inpainting_conditions_the_fill(schedule, name):
  """Two pixels of N(MU, S^2) data with correlation 0.9, the first known (k = 0.6): the
  replacement wrapper keeps it exact, moves the second over a third of the way from MU to the
  true conditional mean MU + 0.9 (k - MU) (the replacement method is known to fall short of
  it: RePaint, Lugmayr et al. 2022), and with nothing known changes no bit of the samples."""
  rho, k, n = 0.9, 0.6, 2048
  mu, s = gaussian.MU, gaussian.S
  abar = jnp.asarray(schedule.alphas_cumprod)

  def model_fn(x, t, cond=None):  # the optimal eps of N(sqrt(a) mu, a Sigma + (1 - a) I)
    a = abar[t][:, None]
    flat = x.reshape(-1, 2)
    diag, off = a * s ** 2 + 1 - a, a * s ** 2 * rho
    centred = flat - jnp.sqrt(a) * mu
    out = jnp.sqrt(1 - a) * (diag * centred - off * centred[:, ::-1]) / (diag ** 2 - off ** 2)
    return out.reshape(x.shape)

  solver = solvers.make_solver(schedule, name, num_steps=19, clip_denoised=False)
  known = jnp.full((n, 1, 2, 1), k)
  mask = jnp.asarray([1.0, 0.0]).reshape(1, 1, 2, 1)
  x = np.asarray(solvers.sample(model_fn, inpainting.replacement(solver, known, mask),
                                jax.random.key(5), (n, 1, 2, 1)))
  np.testing.assert_array_equal(x[:, 0, 0, 0], np.float32(k))
  true_mean = mu + rho * (k - mu)
  assert abs(x[:, 0, 1, 0].mean() - true_mean) < 0.67 * abs(mu - true_mean)
  plain = solvers.sample(model_fn, solver, jax.random.key(6), (4, 1, 2, 1))
  nothing_known = inpainting.replacement(solver, known[:1], jnp.zeros_like(mask))
  assert nothing_known.multistep == solver.multistep and nothing_known.grid is solver.grid
  assert nothing_known.nfe == solver.nfe
  np.testing.assert_array_equal(
      solvers.sample(model_fn, nothing_known, jax.random.key(6), (4, 1, 2, 1)), plain)


@pytest.mark.parametrize('name,options', [('dpmpp_2m_sde', {}), ('unipc', {'order': 3}),
                                          ('heun', {'s_churn': 5.0})])
def test_sharded_chunked_and_reproducible(schedule, name, options):
  """The sampling loop of jaxddpm.sample (state split over 4 devices on 'data', the multistep
  history included) gives the single-device samples bitwise; the same key gives the same
  samples, another key others; the chunking does not matter."""
  model_fn = solvers.base.as_pytree(gaussian.optimal_model(schedule.alphas_cumprod))
  solver = solvers.make_solver(schedule, name, num_steps=11, **options)
  plan = solvers.make_plan(solver, chunk_length=3)
  key, shape = jax.random.key(7), (8, 4, 4, 1)
  want = solvers.sample(model_fn, plan, key, shape)
  np.testing.assert_array_equal(solvers.sample(model_fn, plan, key, shape), want)
  x = gaussian.sample_sharded(plan, model_fn, key, shape)
  assert len(x.sharding.device_set) == 4
  np.testing.assert_array_equal(x, want)
  one_chunk = solvers.sample(model_fn, solvers.make_plan(solver, num_chunks=1), key, shape)
  np.testing.assert_allclose(one_chunk, want, atol=1e-6)
  other = solvers.sample(model_fn, plan, jax.random.key(8), shape)
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-2


def test_heun_churn_is_algorithm_2_in_float64(schedule):
  """EDM Algorithm 2 in float64 NumPy, sigma^_i rounded to the trained level nearest in log
  sigma, with the driver's noise draws; the model sees exactly those integer timesteps."""
  churn = dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  solver = solvers.make_solver(schedule, 'heun', num_steps=15, clip_denoised=False, **churn)
  seen = []
  base_model = gaussian.optimal_model(schedule.alphas_cumprod)

  def model_fn(x, t, cond=None):  # records t, also inside the step's lax.cond
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
    return base_model(x, t, cond)

  x_T = np.asarray(jax.random.normal(jax.random.key(9), SHAPE), np.float64)
  key = jax.random.key(10)
  got = _run_eagerly(solver, model_fn, x_T, key)

  abar = schedule.alphas_cumprod64.array
  levels = np.sqrt((1 - abar) / abar)
  times = np.asarray(solver.times)
  sig = np.append(levels[times], 0.0)
  n = len(times)

  def denoise(y, t):  # D(y; sigma_t) of the optimal model, y = x / sqrt(abar_t)
    a = float(np.float32(abar[t]))
    x = y * np.sqrt(a)
    return gaussian.MU + gaussian.S ** 2 * np.sqrt(a) * (x - np.sqrt(a) * gaussian.MU) / (
        a * gaussian.S ** 2 + 1 - a)

  y, visited = x_T * np.sqrt(1 + sig[0] ** 2), []
  for i in range(n):
    gamma = min(churn['s_churn'] / n, np.sqrt(2) - 1) if 0.05 <= sig[i] <= 50.0 else 0.0
    t_hat = int(np.argmin(np.abs(np.log(levels) - np.log(sig[i] * (1 + gamma)))))
    op_key = jax.random.split(jax.random.fold_in(key, i))[0]
    eps = churn['s_noise'] * np.asarray(jax.random.normal(op_key, SHAPE), np.float64)
    y_hat = y + np.sqrt(levels[t_hat] ** 2 - sig[i] ** 2) * eps
    d = (y_hat - denoise(y_hat, t_hat)) / levels[t_hat]
    y = y_hat + (sig[i + 1] - levels[t_hat]) * d
    visited.append(t_hat)
    if i < n - 1:
      d_next = (y - denoise(y, times[i + 1])) / sig[i + 1]
      y = y_hat + (sig[i + 1] - levels[t_hat]) * (d + d_next) / 2
      visited.append(times[i + 1])
  np.testing.assert_allclose(got, y, rtol=0, atol=1e-5 * np.abs(y).max())
  assert [int(t[0]) for t in seen] == visited and all(t.dtype == np.int32 for t in seen)
  assert set(visited) - set(times.tolist())  # the churn visited other trained levels


def test_dynamic_thresholding_is_imagens():
  """s = max(quantile_p |x0|, 1) per sample, x0 -> clip(x0, -s, s) / s (Imagen sec. 2.3),
  against NumPy; as a solver option it reaches the x_0 prediction (DPM-Solver++'s final
  sample is one, so its largest value is exactly 1)."""
  x = np.random.default_rng(0).normal(0.0, 1.5, (3, 4, 4, 2)).astype(np.float32)
  x[2] *= 0.4  # a sample whose quantile is below 1: plain clipping
  got = diffusion.dynamic_threshold(x, 0.9)
  s = np.maximum(np.quantile(np.abs(x.reshape(3, -1)), 0.9, axis=1), 1.0)[:, None, None, None]
  np.testing.assert_allclose(got, np.clip(x, -s, s) / s, rtol=1e-6)

  schedule = schedules.make_schedule('linear', T)
  model_fn = gaussian.optimal_model(schedule.alphas_cumprod, mu=0.0, s=2.0)
  x_T = jax.random.normal(jax.random.key(11), SHAPE)
  outs = [solvers.sample(model_fn, solvers.make_solver(
      schedule, 'dpmpp_2m', num_steps=6, clip_denoised=False, thresholding=p),
                         jax.random.key(12), x_T=x_T) for p in (None, 0.9)]
  assert np.abs(outs[0]).max() > 1.5
  np.testing.assert_allclose(np.abs(np.asarray(outs[1])).max(axis=(1, 2, 3)), 1.0, rtol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='euler'), 'unknown solver'),
    (dict(name='dpmpp_2m', eta=0.5), "'dpmpp_2m' does not take eta"),
    (dict(name='ddim', s_churn=5.0), "'ddim' does not take s_churn"),
    (dict(name='dpmpp_2m', order=3), 'does not take order'),
    (dict(name='heun', lower_order_final=False), 'does not take lower_order_final'),
    (dict(name='dpmpp_3m', num_steps=2), 'at least 3'),
    (dict(name='unipc', order=3, num_steps=2), 'at least 3'),
    (dict(name='heun', num_steps=2), 'at least 3'),
    (dict(name='unipc', order=4), 'orders 2 and 3'),
    (dict(name='ddim', timestep_spacing='karras'), 'timestep spacings'),
    (dict(name='heun', timestep_spacing='trailing'), 'timestep spacings'),
    (dict(name='unipc', num_steps=1000), 'do not fit'),
    (dict(name='heun', s_noise=0.0), 's_noise > 0'),
    (dict(name='dpmpp_2m', thresholding=1.5), 'percentile'),
])
def test_bad_options_raise(schedule, kwargs, match):
  with pytest.raises(ValueError, match=match):
    solvers.make_solver(schedule, **kwargs)


def test_neutral_options_are_no_error(schedule):
  """eta = 0 and s_churn = 0 change nothing, so any solver accepts them (configs carry them)."""
  a = solvers.make_solver(schedule, 'dpmpp_2m', num_steps=5, eta=0.0, s_churn=0.0)
  b = solvers.make_solver(schedule, 'dpmpp_2m', num_steps=5)
  np.testing.assert_array_equal(a.data_coef, b.data_coef)
  assert [solvers.make_solver(schedule, n, num_steps=9).nfe for n in solvers.SOLVERS] == [
      9, 9, 9, 9, 9, 9, 9]
  assert solvers.make_solver(schedule, 'heun', num_steps=20).nfe == 19  # 2N - 1, N = 10
