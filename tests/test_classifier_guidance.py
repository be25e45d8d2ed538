"""Classifier guidance against the exact posterior of a two-Gaussian mixture.

Data in 2-D: x_0 ~ sum_k pi_k N(mu_k, s_k^2 I). Its noisy marginal and noisy classifier are
closed forms,

  p_t(x) = sum_k pi_k N(x; sqrt(abar) mu_k, v_k I),   v_k = abar s_k^2 + 1 - abar,
  p(y = k | x_t) = pi_k N(x_t; sqrt(abar) mu_k, v_k I) / p_t(x_t)   (the responsibilities),

with the exact eps(x_t) = -sqrt(1 - abar) grad log p_t(x_t). At guidance scale 1 the shifted
eps is the eps of component y's own noisy marginal, so an exact sampler guided to y draws
from N(mu_y, s_y^2 I): the samples' mean and standard deviation are checked against it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm.solvers import classifier_guidance as cg

T = 1000
MU = np.array([[-0.5, 0.3], [0.6, -0.2]])
S = np.array([0.3, 0.4])
PI = np.array([0.3, 0.7])
LABEL = cg.CLASSIFIER_LABEL


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule('linear', T)


def _abar(schedule, t, ndim):
  return jnp.asarray(schedule.alphas_cumprod)[t].reshape((-1,) + (1,) * (ndim - 1))


def _log_terms(x, a):
  """log pi_k N(x; sqrt(a) mu_k, v_k I) [B, K], and v [B, K]; x [B, 2], a [B, 1]."""
  var = a * S ** 2 + 1.0 - a
  diff = x[:, None, :] - jnp.sqrt(a)[:, :, None] * MU[None]
  sq = jnp.sum(diff ** 2, -1)
  return jnp.log(PI) - sq / (2 * var) - jnp.log(2 * np.pi * var), var


def mixture_model(schedule, mean_type='eps', learned_var=False):
  """The exact unconditional model_fn of the mixture (eps, x0 or v), called with the
  original timesteps; learned_var appends a variance output of 0.3 (passed through)."""

  def model_fn(x, t, cond):
    assert not cond, cond  # the classifier's label never reaches the model
    a = _abar(schedule, t, x.ndim)
    logits, var = _log_terms(x, a)
    r = jax.nn.softmax(logits, -1)
    diff = x[:, None, :] - jnp.sqrt(a)[:, :, None] * MU[None]
    eps = jnp.sqrt(1 - a) * jnp.sum(r[..., None] * diff / var[..., None], 1)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    out = {'eps': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]
    if learned_var:
      out = jnp.concatenate([out, jnp.full_like(out, 0.3)], -1)
    return out

  return model_fn


def exact_classifier(schedule):
  """classifier_fn(x, t) -> logits [B, K] of the exact noisy posterior p(y | x_t)."""
  return lambda x, t: _log_terms(x, _abar(schedule, t, x.ndim))[0]


def reference_output(schedule, x, t, y, scale, mean_type):
  """float64 NumPy: the guided prediction, eps - sqrt(1 - abar) s grad log p(y | x_t) put in
  the model's parameterisation."""
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None]
  var = a * S ** 2 + 1 - a  # [B, K]
  diff = x[:, None, :] - np.sqrt(a)[:, :, None] * MU[None]  # [B, K, 2]
  logits = np.log(PI) - np.sum(diff ** 2, -1) / (2 * var) - np.log(2 * np.pi * var)
  r = np.exp(logits - logits.max(1, keepdims=True))
  r /= r.sum(1, keepdims=True)
  grad_log_p = -np.sum(r[..., None] * diff / var[..., None], 1)
  rows = np.arange(len(y))
  grad_log_joint = -diff[rows, y] / var[rows, y][:, None]  # grad log pi_y N_y
  eps = -np.sqrt(1 - a) * grad_log_p
  guided = eps - np.sqrt(1 - a) * scale * (grad_log_joint - grad_log_p)
  x0 = (x - np.sqrt(1 - a) * guided) / np.sqrt(a)
  return {'eps': guided, 'x0': x0, 'v': np.sqrt(a) * guided - np.sqrt(1 - a) * x0}[mean_type]


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_eps_shift_matches_float64_closed_form(schedule, mean_type):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 2))
  t = np.array([0, 10, 200, 500, 800, 999])
  y = np.array([0, 1, 0, 1, 0, 1])
  guided = cg.classifier_guided(mixture_model(schedule, mean_type, learned_var=True),
                                exact_classifier(schedule), schedule, 2.0,
                                model_mean_type=mean_type)
  out = jax.jit(lambda f, x, t, y: f(x, t, {LABEL: y}))(guided, x.astype(np.float32), t, y)
  want = reference_output(schedule, x, t, y, 2.0, mean_type)
  np.testing.assert_allclose(out[:, :2], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(out[:, 2:], np.float32(0.3))  # the variance passes through
  # At s = 1 the guided eps is component y's own: Bayes' rule with the exact classifier.
  exact = cg.classifier_guided(mixture_model(schedule), exact_classifier(schedule), schedule, 1.0)
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None]
  eps_y = np.sqrt(1 - a) * (x - np.sqrt(a) * MU[y]) / (a * S[y, None] ** 2 + 1 - a)
  np.testing.assert_allclose(exact(x.astype(np.float32), t, {LABEL: y}), eps_y,
                             rtol=1e-4, atol=1e-5)


def _check_component_moments(x, y, n_sigma=4.5, bias=0.0):
  """Per component k: the guided samples' mean and std per coordinate against (mu_k, s_k),
  within n_sigma Monte-Carlo standard errors plus `bias` (absolute)."""
  x = np.asarray(x, np.float64)
  for k in (0, 1):
    xk = x[y == k]
    n = len(xk)
    mean_err = np.abs(xk.mean(0) - MU[k])
    std_err = np.abs(xk.std(0) - S[k])
    assert (mean_err < n_sigma * S[k] / np.sqrt(n) + bias).all(), (k, xk.mean(0), MU[k])
    assert (std_err < n_sigma * S[k] / np.sqrt(2 * n) + bias).all(), (k, xk.std(0), S[k])


N_SAMPLES = 8000  # 4000 per component


def _labels():
  return np.repeat(np.arange(2, dtype=np.int32), N_SAMPLES // 2)


@pytest.mark.parametrize('name,steps,mean_type', [
    ('ddim', 1000, 'eps'), ('dpmpp_2m', 50, 'x0'), ('heun', 121, 'v')])
def test_eps_shift_samples_the_exact_conditional(schedule, name, steps, mean_type):
  solver = solvers.make_solver(schedule, name, num_steps=steps, model_mean_type=mean_type,
                               clip_denoised=False)
  model_fn = cg.classifier_guided(mixture_model(schedule, mean_type), exact_classifier(schedule),
                                  schedule, 1.0, model_mean_type=mean_type)
  y = _labels()
  x = solvers.sample(model_fn, solver, jax.random.key(1), (N_SAMPLES, 2), cond={LABEL: y})
  _check_component_moments(x, y)


def test_mean_shift_samples_the_conditional_with_many_steps(schedule):
  """Algorithm 1 at 1000 steps. Its mean is (x_t + beta_t score) / sqrt(alpha_t) + beta_t g,
  where DDPM with the exact conditional eps has (x_t + beta_t (score + g)) / sqrt(alpha_t): the
  shift is off by a factor sqrt(alpha_t), 1 - beta_t / 2 >= 0.99, an O(beta_t^2) error per step
  whose sum stays well under the 0.005 allowed beyond Monte-Carlo error (measured: within
  2 standard errors at 20000 samples; at 100 steps the std is 5% too large)."""
  solver = cg.classifier_mean_shift(solvers.make_solver(schedule, 'ddpm', clip_denoised=False),
                                    exact_classifier(schedule), 1.0)
  y = _labels()
  x = solvers.sample(mixture_model(schedule), solver, jax.random.key(2), (N_SAMPLES, 2),
                     cond={LABEL: y})
  _check_component_moments(x, y, bias=0.005)


def test_mean_shift_at_scale_zero_is_ddpm_and_scale_does_not_recompile(schedule):
  ddpm = solvers.make_solver(schedule, 'ddpm', num_steps=10, clip_denoised=False)
  model_fn = mixture_model(schedule)
  y = jnp.array([0, 1, 1, 0])
  plain = solvers.sample(model_fn, ddpm, jax.random.key(3), (4, 2))

  @chex.assert_max_traces(n=1)
  def classifier(x, t):
    return exact_classifier(schedule)(x, t)

  outs = [solvers.sample(model_fn, cg.classifier_mean_shift(ddpm, classifier, s), jax.random.key(3),
                         (4, 2), cond={LABEL: y}) for s in (0.0, 3.0)]
  np.testing.assert_allclose(outs[0], plain, rtol=1e-6, atol=1e-6)  # the same noise
  assert np.abs(np.asarray(outs[1]) - np.asarray(plain)).max() > 1e-2


def test_eps_shift_scale_is_an_argument(schedule):
  solver = solvers.make_solver(schedule, 'ddim', num_steps=5, clip_denoised=False)

  @chex.assert_max_traces(n=1)
  def classifier(x, t):
    return exact_classifier(schedule)(x, t)

  model_fn = mixture_model(schedule)
  y = jnp.array([0, 1])
  outs = [solvers.sample(cg.classifier_guided(model_fn, classifier, schedule, s), solver,
                         jax.random.key(4), (2, 2), cond={LABEL: y}) for s in (0.0, 2.0)]
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3


def test_bad_arguments_raise(schedule):
  model_fn, classifier = mixture_model(schedule), exact_classifier(schedule)
  with pytest.raises(ValueError, match='respaced'):
    cg.classifier_guided(model_fn, classifier, schedules.respace(schedule, [0, 500, 999]), 1.0)
  with pytest.raises(ValueError, match='ancestral DDPM'):
    cg.classifier_mean_shift(solvers.make_solver(schedule, 'ddim', num_steps=5), classifier, 1.0)
  with pytest.raises(ValueError, match='model_mean_type'):
    cg.classifier_guided(model_fn, classifier, schedule, 1.0, model_mean_type='score')
  guided = cg.classifier_guided(model_fn, classifier, schedule, 1.0)
  with pytest.raises(ValueError, match=LABEL):
    guided(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), {})
