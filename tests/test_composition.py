"""Composition of conditions and the MCMC correctors, against closed forms.

Data x_0 ~ N(0, I) in 2-D, and two conditions whose likelihoods are Gaussian in x, so that
p(x | c_i) = N(m_i, v_i I) and the product p(x | c_1, c_2) ~ p(x | c_1) p(x | c_2) / p(x) is
N(m*, v* I), 1 / v* = 1 / v_1 + 1 / v_2 - 1, m* = v* (m_1 / v_1 + m_2 / v_2). The exact model
of each condition (and of the null condition, p(x)) is the optimal Gaussian denoiser,

  eps(x_t | c) = sqrt(1 - abar) (x_t - sqrt(abar) m_c) / (abar v_c + 1 - abar),

so the composed eps (weights (1, 1)) is linear in x_t, and DDIM with ULA or HMC correctors is a
linear-Gaussian recursion whose output moments a float64 loop computes exactly. The composed
eps is the product's only at the data: at intermediate levels its Gaussian is not the noised
product, so plain DDIM lands away from N(m*, v*) (Du et al. 2023, sec. 3), and the correctors,
which sample each level's Gaussian, bring it close.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm.models import conditioning
from jaxddpm.solvers import composition
from jaxddpm.solvers import correctors

T = 1000
# Labels 0 and 1 are the conditions c_1, c_2; label 2 (`num_classes`) is the null condition.
SPEC = {'label': conditioning.Label(num_classes=2)}
MEANS = np.array([[1.0, 0.4], [-0.2, 0.6], [0.0, 0.0]])
VARS = np.array([0.3, 0.3, 1.0])
PRODUCT_VAR = 1.0 / (1.0 / VARS[0] + 1.0 / VARS[1] - 1.0)
PRODUCT_MEAN = PRODUCT_VAR * (MEANS[0] / VARS[0] + MEANS[1] / VARS[1])


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule('linear', T)


def label_model(schedule, learned_var=False, calls=None):
  """model_fn(x, t, {'label': [B]}) of the exact eps of each label's Gaussian; learned_var
  appends a variance output of 0.1 * label; `calls` gets each trace's batch size."""
  abar = jnp.asarray(schedule.alphas_cumprod)
  means, variances = jnp.asarray(MEANS, jnp.float32), jnp.asarray(VARS, jnp.float32)

  def model_fn(x, t, cond):
    if calls is not None:
      calls.append(x.shape[0])
    y = cond['label']
    a = abar[t][:, None]
    eps = (jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * means[y])
           / (a * variances[y][:, None] + 1 - a))
    if learned_var:
      eps = jnp.concatenate([eps, jnp.broadcast_to(0.1 * y[:, None], x.shape)], -1)
    return eps

  return model_fn


def eps64(schedule, x, t, label):
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None]
  return np.sqrt(1 - a) * (x - np.sqrt(a) * MEANS[label]) / (a * VARS[label][:, None] + 1 - a)


def _points():
  rng = np.random.default_rng(0)
  return rng.normal(size=(4, 2)), np.array([3, 250, 600, 990])


def test_identical_conditions_are_the_conditional_model_and_cfg(schedule):
  x, t = _points()
  x32 = x.astype(np.float32)
  model_fn = label_model(schedule, learned_var=True)
  same = composition.stack_conditions([{'label': jnp.zeros(4, jnp.int32)}] * 2, SPEC)
  run = jax.jit(lambda f, x, t, c: f(x, t, c))
  conditional = model_fn(x32, t, {'label': jnp.zeros(4, jnp.int32)})
  # Weights (1/2, 1/2): eps_null + (eps_c - eps_null), the guidance-free conditional model.
  half = run(composition.compose(model_fn, [0.5, 0.5], SPEC), x32, t, same)
  np.testing.assert_allclose(half, conditional, rtol=1e-5, atol=1e-6)
  # Weights (1, 1): 2 eps_c - eps_null, classifier-free guidance at w = 1; one condition with
  # weight 1 + w is that guidance too, learned-variance channels included.
  cfg = run(solvers.classifier_free_guidance(model_fn, 1.0, SPEC), x32, t,
            {'label': jnp.zeros(4, jnp.int32)})
  np.testing.assert_allclose(run(composition.compose(model_fn, [1.0, 1.0], SPEC), x32, t, same),
                             cfg, rtol=1e-5, atol=1e-6)
  single = composition.stack_conditions([{'label': jnp.zeros(4, jnp.int32)}], SPEC)
  np.testing.assert_allclose(run(composition.compose(model_fn, [2.0], SPEC), x32, t, single),
                             cfg, rtol=1e-5, atol=1e-6)


def test_negation_matches_float64_closed_form(schedule):
  """NOT by weights: Liu et al.'s eps(x | c_2) + w (eps(x | c_1) - eps(x | c_2)) is weights
  (w, 1 - w); and a general (1, -0.7) against its float64 sum. One model call on 3B rows."""
  x, t = _points()
  calls = []
  model_fn = label_model(schedule, learned_var=True, calls=calls)
  cond = composition.stack_conditions([{'label': jnp.zeros(4, jnp.int32)},
                                       {'label': jnp.ones(4, jnp.int32)}], SPEC)
  run = jax.jit(lambda f, x, t, c: f(x, t, c))
  e1, e2, e0 = (eps64(schedule, x, t, np.full(4, k)) for k in (0, 1, 2))
  w = 3.0
  got = run(composition.compose(model_fn, [w, 1.0 - w], SPEC), x.astype(np.float32), t, cond)
  np.testing.assert_allclose(got[:, :2], e2 + w * (e1 - e2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 2:], 0.0)  # the variance channels of c_1 (label 0)
  got = run(composition.compose(model_fn, [1.0, -0.7], SPEC), x.astype(np.float32), t, cond)
  np.testing.assert_allclose(got[:, :2], e0 + (e1 - e0) - 0.7 * (e2 - e0), rtol=1e-5, atol=1e-5)
  assert calls == [12]  # traced once for both weights, on (N + 1) B = 12 rows


def composed_moments(grid_abar, method=None, num_steps=0, c=0.0, num_leapfrog=1,
                     damping=0.0):
  """float64 [2] mean and [2] std of DDIM(eta=0) with the composed eps (weights (1, 1)) and
  the given correctors, x_T ~ N(0, I), on the grid of abar values [N + 1] (last 1)."""

  def composed(a):  # eps~ = k x - b, per coordinate
    d = a * VARS + 1 - a
    w = np.array([1.0, 1.0, -1.0])
    k = np.sum(w * np.sqrt(1 - a) / d)
    b = np.sum(w[:, None] * (np.sqrt(1 - a) * np.sqrt(a) * MEANS / d[:, None]), 0)
    return k, b

  n = len(grid_abar) - 1
  # Rows (x, v), columns the two coordinates; one (x, v) covariance for both coordinates.
  mean, cov = np.zeros((2, 2)), np.eye(2)
  for i in range(n):
    a, ap = grid_abar[i], grid_abar[i + 1]
    k, b = composed(a)
    gain = np.sqrt(ap) * (1 - np.sqrt(1 - a) * k) / np.sqrt(a) + np.sqrt(1 - ap) * k
    shift = (np.sqrt(ap) * np.sqrt(1 - a) / np.sqrt(a) - np.sqrt(1 - ap)) * b
    mean[0], cov[0, 0] = gain * mean[0] + shift, gain ** 2 * cov[0, 0]
    if i + 1 == n or method is None:
      continue
    k, b = composed(ap)
    sigma = np.sqrt(1 - ap)
    precision, centre = k / sigma, b / k  # score = -precision (x - centre)
    if method == 'ula':
      eta = c * sigma ** 2
      for _ in range(num_steps):
        f = 1 - eta * precision
        mean[0] = f * mean[0] + (1 - f) * centre
        cov[0, 0] = f ** 2 * cov[0, 0] + 2 * eta
      continue
    # HMC: leapfrog is linear in (x - centre, v); a fresh momentum N(0, 1) at each level.
    h = c * sigma
    kick = np.array([[1.0, 0.0], [-0.5 * h * precision, 1.0]])
    leap = np.linalg.matrix_power(kick @ np.array([[1.0, h], [0.0, 1.0]]) @ kick, num_leapfrog)
    m = leap @ np.diag([1.0, damping])
    offset = np.stack([centre, np.zeros(2)])
    mean[1], cov[0, 1], cov[1, 0], cov[1, 1] = 0.0, 0.0, 0.0, 1.0
    for _ in range(num_steps):
      mean = m @ (mean - offset) + offset
      cov = m @ cov @ m.T + leap @ np.diag([0.0, 1 - damping ** 2]) @ leap.T
  return mean[0], np.sqrt(cov[0, 0])


def w2_to_product(x):
  """W2 between the diagonal Gaussian fitted to the samples x [n, 2] and N(m*, v* I)."""
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum((x.mean(0) - PRODUCT_MEAN) ** 2)
                 + np.sum((x.std(0) - np.sqrt(PRODUCT_VAR)) ** 2))


N_SAMPLES = 8000


def test_correctors_bring_the_composition_to_the_product(schedule):
  ddim = solvers.make_solver(schedule, 'ddim', num_steps=100, clip_denoised=False)
  model_fn = composition.compose(label_model(schedule), [1.0, 1.0], SPEC)
  cond = composition.stack_conditions([{'label': jnp.zeros(N_SAMPLES, jnp.int32)},
                                       {'label': jnp.ones(N_SAMPLES, jnp.int32)}], SPEC)
  grid_abar = np.asarray(ddim.grid.alpha, np.float64) ** 2
  runs = {'none': (ddim, {}),
          'ula': (correctors.with_correctors(ddim, 'ula', num_steps=5, step_scale=0.2),
                  dict(method='ula', num_steps=5, c=0.2)),
          'hmc': (correctors.with_correctors(ddim, 'hmc', num_steps=3, step_scale=0.3,
                                             num_leapfrog=3, damping=0.5),
                  dict(method='hmc', num_steps=3, c=0.3, num_leapfrog=3, damping=0.5))}
  distance = {}
  for name, (solver, recursion) in runs.items():
    x = np.asarray(solvers.sample(model_fn, solver, jax.random.key(5), (N_SAMPLES, 2),
                                  cond=cond), np.float64)
    mean, std = composed_moments(grid_abar, **recursion)
    # The sampler is the linear-Gaussian recursion: moments within 4.5 standard errors.
    assert (np.abs(x.mean(0) - mean) < 4.5 * std / np.sqrt(N_SAMPLES)).all(), (name, x.mean(0),
                                                                               mean)
    assert (np.abs(x.std(0) - std) < 4.5 * std / np.sqrt(2 * N_SAMPLES)).all(), (name, x.std(0),
                                                                               std)
    distance[name] = w2_to_product(x)
  # W2 of the recursions' Gaussians: none 0.247, ula 0.030, hmc 0.021 (measured 0.249, 0.039,
  # 0.025); the Monte-Carlo noise of a fitted W2 is ~0.01 at 8000 samples.
  assert distance['none'] > 0.2, distance
  assert distance['ula'] < distance['none'] / 3 and distance['ula'] < 0.06, distance
  assert distance['hmc'] < distance['none'] / 3 and distance['hmc'] < 0.06, distance
  assert runs['ula'][0].nfe == 100 + 99 * 5 and runs['hmc'][0].nfe == 100 + 99 * 10


def test_bad_arguments_raise(schedule):
  model_fn = label_model(schedule)
  with pytest.raises(ValueError, match='axis 1'):
    composition.compose(model_fn, [1.0, 1.0], SPEC)(
        jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), {'label': jnp.zeros(2, jnp.int32)})
  with pytest.raises(ValueError, match='one weight per condition'):
    composition.compose(model_fn, 1.0, SPEC)
  with pytest.raises(ValueError, match='multistep'):
    correctors.with_correctors(solvers.make_solver(schedule, 'dpmpp_2m'), 'ula')
  ddim = solvers.make_solver(schedule, 'ddim', num_steps=5)
  with pytest.raises(ValueError, match='unknown corrector'):
    correctors.with_correctors(ddim, 'nuts')
  with pytest.raises(ValueError, match='energy_fn'):
    correctors.with_correctors(ddim, 'mala')
  with pytest.raises(ValueError, match='energy_fn'):
    correctors.with_correctors(ddim, 'ula', energy_fn=label_energy(schedule))


def label_energy(schedule):
  """energy_fn(x, t, {'label'}) -> [B] whose x-gradient is `label_model`'s exact eps:
  E = sqrt(1 - abar) ||x - sqrt(abar) m||^2 / (2 (abar v + 1 - abar))."""
  abar = jnp.asarray(schedule.alphas_cumprod)
  means, variances = jnp.asarray(MEANS, jnp.float32), jnp.asarray(VARS, jnp.float32)

  def energy_fn(x, t, cond):
    y = cond['label']
    a = abar[t][:, None]
    return jnp.sum(jnp.sqrt(1 - a) * jnp.square(x - jnp.sqrt(a) * means[y])
                   / (2 * (a * variances[y][:, None] + 1 - a)), axis=-1)

  return energy_fn


def _two_conditions(n):
  return composition.stack_conditions([{'label': jnp.zeros(n, jnp.int32)},
                                       {'label': jnp.ones(n, jnp.int32)}], SPEC)


def test_the_composed_energy_is_the_potential_of_the_composed_eps(schedule):
  x, t = _points()
  cond = _two_conditions(4)
  energy = composition.compose_energy(label_energy(schedule), [1.0, -0.7], SPEC)
  grad = jax.grad(lambda x: jnp.sum(energy(x, t, cond)))(jnp.asarray(x, jnp.float32))
  e1, e2, e0 = (eps64(schedule, x, t, np.full(4, k)) for k in (0, 1, 2))
  np.testing.assert_allclose(grad, e0 + (e1 - e0) - 0.7 * (e2 - e0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['mala', 'mhmc'])
def test_metropolis_adjusted_correctors_keep_the_level_exact_where_ula_does_not(schedule,
                                                                               method):
  """At a high-noise level the composed potential is Gaussian with precision lambda, and
  eta lambda = c sigma k ~ 1.6 at c = 1.9: ULA's chain then has variance 2 / (lambda (2 -
  eta lambda)), 5x the exact 1 / lambda, while the accept/reject keeps the exact Gaussian."""
  ddim = solvers.make_solver(schedule, 'ddim', num_steps=10, clip_denoised=False)
  j = 1  # the first level below pure noise
  a = float(ddim.grid.alpha[j]) ** 2  # the respaced schedule's abar there
  sigma = float(ddim.grid.sigma[j])
  d = a * VARS + 1 - a
  w = np.array([1.0, 1.0, -1.0])
  k = np.sum(w * np.sqrt(1 - a) / d)
  centre = np.sum(w[:, None] * np.sqrt(1 - a) * np.sqrt(a) * MEANS / d[:, None], 0) / k
  precision = k / sigma
  n = 20000
  x0 = centre + np.random.default_rng(0).normal(size=(n, 2)) / np.sqrt(precision)
  cond = _two_conditions(n)
  model_fn = composition.compose(label_model(schedule), [1.0, 1.0], SPEC)
  energy = composition.compose_energy(label_energy(schedule), [1.0, 1.0], SPEC)
  exact_std = 1 / np.sqrt(precision)
  adjusted = correctors.with_correctors(ddim, method, num_steps=20, step_scale=1.9,
                                        num_leapfrog=2, energy_fn=energy)
  run = getattr(adjusted, '_' + method)
  x = np.asarray(jax.jit(run)(model_fn, jnp.asarray(x0, jnp.float32), j,
                              jax.random.key(1), cond), np.float64)
  assert np.abs(x.mean(0) - centre).max() < 4 * exact_std / np.sqrt(n)
  assert np.abs(x.std(0) / exact_std - 1).max() < 0.03, x.std(0) / exact_std
  assert np.abs(x - x0).mean() > 0.3 * exact_std  # the chain moved
  ula = correctors.with_correctors(ddim, 'ula', num_steps=20, step_scale=1.9)
  y = np.asarray(jax.jit(ula._ula)(model_fn, jnp.asarray(x0, jnp.float32), j,  # pylint: disable=protected-access
                                    jax.random.key(1), cond), np.float64)
  assert (y.std(0) / exact_std > 1.5).all(), y.std(0) / exact_std
