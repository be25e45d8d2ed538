"""The diffusion math against independent float64 references: Bayes' rule for the posterior,
Monte Carlo for the KL, bin sums for the decoder, and a closed-form VLB for Gaussian data."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import ndtr

from jaxddpm import diffusion
from jaxddpm.diffusion import likelihood
from jaxddpm import objectives
from jaxddpm import schedules
from jaxddpm import timesteps

T = 1000
SHAPE = (4, 4, 4, 3)
LN2 = math.log(2.0)


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule('linear', T)


@pytest.fixture(scope='module')
def ref():
  """float64 coefficients of the linear schedule (DDPM eqs. 4, 6, 7)."""
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  return dict(betas=betas, abar=abar, abar_prev=abar_prev,
              post_var=betas * (1 - abar_prev) / (1 - abar))


def data(seed, shape=SHAPE):
  """x_0 uniform in [-1, 1] and eps ~ N(0, 1), float64 NumPy."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, shape), rng.standard_normal(shape)


def times(seed, batch=SHAPE[0], low=0):
  return np.random.default_rng(seed).integers(low, T, batch).astype(np.int32)


def col(v):
  """[B] -> [B, 1, 1, 1] for broadcasting in the NumPy references."""
  return np.asarray(v).reshape(-1, 1, 1, 1)


def close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# --- Forward process and posterior ---------------------------------------------------------------


def test_q_sample_and_q_mean_variance(schedule, ref):
  x0, eps = data(0)
  t = times(1)
  abar = col(ref['abar'][t])
  close(diffusion.q_sample(schedule, x0, t, eps), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps)
  mean, var, logvar = diffusion.q_mean_variance(schedule, x0, t)
  close(mean, np.sqrt(abar) * x0)
  close(var, np.broadcast_to(1 - abar, SHAPE))
  close(logvar, np.broadcast_to(np.log(1 - abar), SHAPE))


def test_posterior_is_bayes_rule(schedule, ref):
  """q(x_{t-1} | x_t, x_0) proportional to q(x_{t-1} | x_0) q(x_t | x_{t-1}), precision-weighted."""
  x0, _ = data(2)
  xt, _ = data(3)
  t = times(4, low=1)
  abar_prev, beta = col(ref['abar_prev'][t]), col(ref['betas'][t])
  # Prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); likelihood of x_{t-1} from
  # x_t ~ N(sqrt(1 - beta) x_{t-1}, beta), i.e. N(x_t / sqrt(1 - beta), beta / (1 - beta)).
  prior_prec, prior_mean = 1 / (1 - abar_prev), np.sqrt(abar_prev) * x0
  lik_prec, lik_mean = (1 - beta) / beta, xt / np.sqrt(1 - beta)
  want_var = 1 / (prior_prec + lik_prec)
  want_mean = want_var * (prior_prec * prior_mean + lik_prec * lik_mean)
  mean, var, logvar = diffusion.q_posterior_mean_variance(schedule, x0, xt, t)
  close(mean, want_mean)
  close(var, np.broadcast_to(want_var, SHAPE), rtol=1e-5, atol=0)
  close(logvar, np.broadcast_to(np.log(want_var), SHAPE), rtol=1e-5, atol=0)


def test_posterior_at_t0(schedule, ref):
  # x_{-1} is x_0 itself: mean x_0, variance 0, log variance clipped to log beta~_1.
  x0, _ = data(5)
  xt, _ = data(6)
  t = np.zeros(SHAPE[0], np.int32)
  mean, var, logvar = diffusion.q_posterior_mean_variance(schedule, x0, xt, t)
  close(mean, x0)
  close(var, np.zeros(SHAPE), atol=0)
  close(logvar, np.full(SHAPE, np.log(ref['post_var'][1])), atol=0)


def test_parameterisation_conversions(schedule, ref):
  x0, eps = data(7)
  t = times(8)
  abar = col(ref['abar'][t])
  xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  v = np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0  # Salimans & Ho 2022, appendix D
  close(diffusion.predict_v(schedule, x0, t, eps), v)
  # 1 / sqrt(abar_t) reaches 157, so float32 rounding of x_t is amplified.
  close(diffusion.predict_xstart_from_eps(schedule, xt, t, eps), x0, atol=2e-4)
  close(diffusion.predict_eps_from_xstart(schedule, xt, t, x0), eps, atol=2e-3, rtol=1e-3)
  close(diffusion.predict_xstart_from_v(schedule, xt, t, v), x0)
  close(diffusion.predict_eps_from_v(schedule, xt, t, v), eps)
  # Round trips through the float32 functions.
  x0_hat = diffusion.predict_xstart_from_eps(
      schedule, xt, t, diffusion.predict_eps_from_xstart(schedule, xt, t, x0))
  close(x0_hat, x0, atol=2e-4)


# --- Reverse process -----------------------------------------------------------------------------


def oracle_model(schedule, x0, eps, mean_type, var_values=None):
  """A model that returns the true eps / x0 / v for the x_t built from (x0, eps)."""
  def model_fn(xt, t, cond=None):
    del xt
    out = {'eps': eps, 'x0': x0, 'v': diffusion.predict_v(schedule, x0, t, eps)}[mean_type]
    out = jnp.asarray(out, jnp.float32)
    if var_values is not None:
      out = jnp.concatenate([out, jnp.asarray(var_values, jnp.float32)], axis=-1)
    return out
  return model_fn


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
def test_p_mean_variance_oracle_recovers_posterior(schedule, mean_type):
  x0, eps = data(9)
  t = times(10)
  xt = diffusion.q_sample(schedule, x0, t, eps)
  out = diffusion.p_mean_variance(oracle_model(schedule, x0, eps, mean_type), schedule, xt, t,
                                  model_mean_type=mean_type, model_var_type='fixedsmall',
                                  clip_denoised=False)
  close(out['pred_xstart'], x0, atol=5e-5)
  want_mean, want_var, want_logvar = diffusion.q_posterior_mean_variance(schedule, x0, xt, t)
  close(out['mean'], want_mean, atol=5e-5)
  close(out['variance'], want_var, atol=0)
  close(out['log_variance'], want_logvar, atol=0)
  close(out['pred_eps'], eps, atol=5e-3, rtol=1e-3)


def test_p_mean_variance_variances(schedule, ref):
  x0, eps = data(11)
  t = np.array([0, 1, 500, 999], np.int32)
  xt = diffusion.q_sample(schedule, x0, t, eps)
  kw = dict(model_mean_type='eps', clip_denoised=False)
  post_var, betas = ref['post_var'], ref['betas']
  # fixedlarge: beta_t, beta~_1 at t = 0 (reference code: append(beta~_1, betas[1:])).
  large = diffusion.p_mean_variance(oracle_model(schedule, x0, eps, 'eps'), schedule, xt, t,
                                    model_var_type='fixedlarge', **kw)
  want = np.where(t == 0, post_var[1], betas[t])
  close(large['variance'], np.broadcast_to(col(want), SHAPE), atol=0)
  close(large['log_variance'], np.broadcast_to(col(np.log(want)), SHAPE), atol=0)
  small = diffusion.p_mean_variance(oracle_model(schedule, x0, eps, 'eps'), schedule, xt, t,
                                    model_var_type='fixedsmall', **kw)
  close(small['variance'], np.broadcast_to(col(post_var[t]), SHAPE), atol=0)
  # learned: the output is the log variance.
  raw = np.random.default_rng(12).uniform(-8, -2, SHAPE)
  learned = diffusion.p_mean_variance(oracle_model(schedule, x0, eps, 'eps', raw), schedule,
                                      xt, t, model_var_type='learned', **kw)
  close(learned['log_variance'], raw)
  close(learned['variance'], np.exp(raw), rtol=1e-5, atol=0)
  # learned_range (improved DDPM eq. 15): v = -1 -> log beta~_t, v = 1 -> log beta_t.
  log_small = np.log(np.where(t == 0, post_var[1], post_var[t]))
  for v, want_log in ((-1.0, log_small), (1.0, np.log(betas[t])),
                      (0.0, 0.5 * (log_small + np.log(betas[t])))):
    out = diffusion.p_mean_variance(oracle_model(schedule, x0, eps, 'eps', np.full(SHAPE, v)),
                                    schedule, xt, t, model_var_type='learned_range', **kw)
    close(out['log_variance'], np.broadcast_to(col(want_log), SHAPE), rtol=1e-6, atol=0)
  # The mean does not depend on the variance type.
  close(learned['mean'], large['mean'], atol=0)


def test_p_mean_variance_clips_and_denoised_fn(schedule):
  x0, eps = data(13)
  t = times(14)
  xt = diffusion.q_sample(schedule, x0, t, eps)
  model_fn = lambda x, t, cond=None: jnp.full(x.shape, 3.0)  # x0-prediction far outside [-1, 1]
  out = diffusion.p_mean_variance(model_fn, schedule, xt, t, model_mean_type='x0',
                                  model_var_type='fixedlarge')
  close(out['pred_xstart'], np.ones(SHAPE), atol=0)
  # pred_eps is consistent with the clipped x_0.
  close(out['pred_eps'], diffusion.predict_eps_from_xstart(schedule, xt, t, np.ones(SHAPE)),
        atol=0)
  out = diffusion.p_mean_variance(model_fn, schedule, xt, t, model_mean_type='x0',
                                  model_var_type='fixedlarge', denoised_fn=lambda x: -x)
  close(out['pred_xstart'], -np.ones(SHAPE), atol=0)


def test_model_sees_timestep_map_of_respaced_schedule(schedule):
  spaced = schedules.respace(schedule, schedules.space_timesteps(T, 10))
  seen = []

  def model_fn(x, t, cond):
    seen.append((np.asarray(t), cond))
    return jnp.zeros_like(x)

  x0, _ = data(15)
  t = np.array([0, 3, 5, 9], np.int32)
  diffusion.p_mean_variance(model_fn, spaced, x0, t, model_mean_type='eps',
                            model_var_type='fixedlarge', cond={'label': 7})
  np.testing.assert_array_equal(seen[0][0], [0, 333, 555, 999])
  assert seen[0][1] == {'label': 7}


# --- Likelihood pieces ---------------------------------------------------------------------------


def test_normal_kl_matches_monte_carlo():
  rng = np.random.default_rng(16)
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(1.7)
  x = m1 + np.exp(0.5 * lv1) * rng.standard_normal(2_000_000)
  log_n = lambda x, m, lv: -0.5 * (np.log(2 * np.pi) + lv + (x - m) ** 2 / np.exp(lv))
  samples = log_n(x, m1, lv1) - log_n(x, m2, lv2)
  got = float(likelihood.normal_kl(m1, lv1, m2, lv2))
  assert abs(got - samples.mean()) < 4 * samples.std() / math.sqrt(samples.size)
  # Closed form of KL between Gaussians, and zero for identical ones.
  want = np.log(np.sqrt(1.7 / 0.5)) + (0.5 + 0.5 ** 2) / (2 * 1.7) - 0.5
  assert got == pytest.approx(want, rel=1e-6)
  assert float(likelihood.normal_kl(0.1, -1.0, 0.1, -1.0)) == pytest.approx(0.0, abs=1e-7)


def test_approx_standard_normal_cdf():
  x = np.linspace(-6, 6, 1001)
  np.testing.assert_allclose(likelihood.approx_standard_normal_cdf(x), ndtr(x), atol=2e-4)


@pytest.mark.parametrize('mean, log_scale', [(0.0, np.log(0.01)), (0.9977, np.log(0.003)),
                                             (-1.3, np.log(0.4)), (0.2, np.log(3.0))])
def test_discretized_decoder_sums_to_one(mean, log_scale):
  x = np.arange(256) / 127.5 - 1.0  # the 256 levels, x = 2k/255 - 1
  logp = likelihood.discretized_gaussian_log_likelihood(
      x, means=np.full(256, mean), log_scales=np.full(256, log_scale))
  assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-5)
  # Each bin is the Gaussian's mass over it (open at the edges), up to the tanh CDF's error.
  scale = np.exp(log_scale)
  hi = np.where(x > 0.999, np.inf, x + 1 / 255)
  lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
  want = ndtr((hi - mean) / scale) - ndtr((lo - mean) / scale)
  np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)), want, atol=4e-4)


def test_prior_bpd(schedule, ref):
  x0, _ = data(17)
  abar = ref['abar'][-1]
  want = 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + abar * x0 ** 2)
  close(likelihood.prior_bpd(schedule, x0), want.mean(axis=(1, 2, 3)) / LN2, rtol=1e-4, atol=1e-9)


# --- Training losses -----------------------------------------------------------------------------


def linear_model(mean_scale, var_value, learned):
  """model_fn whose prediction is mean_scale * x and variance output var_value."""
  def model_fn(x, t, cond=None):
    del t
    pred = mean_scale * x
    if learned:
      pred = jnp.concatenate([pred, jnp.full(x.shape, var_value, pred.dtype)], axis=-1)
    return pred
  return model_fn


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
def test_mse_loss_is_l_simple(schedule, mean_type):
  x0, eps = data(18)
  t = times(19)
  xt = np.asarray(diffusion.q_sample(schedule, x0, t, eps), np.float64)
  target = {'eps': eps, 'x0': x0,
            'v': np.asarray(diffusion.predict_v(schedule, x0, t, eps), np.float64)}[mean_type]
  terms = objectives.training_losses(linear_model(0.7, 0.0, False), schedule, x0, t, eps,
                                    model_mean_type=mean_type, model_var_type='fixedlarge',
                                    loss_type='mse')
  want = ((target - 0.7 * xt) ** 2).mean(axis=(1, 2, 3))
  close(terms['mse'], want)
  close(terms['loss'], want)
  assert 'vb' not in terms
  oracle = objectives.training_losses(oracle_model(schedule, x0, eps, mean_type), schedule, x0,
                                     t, eps, model_mean_type=mean_type,
                                     model_var_type='fixedlarge', loss_type='mse')
  close(oracle['loss'], np.zeros(SHAPE[0]), atol=1e-10)


def test_kl_loss_terms(schedule, ref):
  x0 = np.round((data(20)[0] + 1) * 127.5) / 127.5 - 1  # on the 256-level grid
  _, eps = data(20)
  t = np.array([0, 1, 10, 999], np.int32)
  model_fn = linear_model(0.3, 0.0, False)
  terms = objectives.training_losses(model_fn, schedule, x0, t, eps, model_mean_type='eps',
                                    model_var_type='fixedlarge', loss_type='kl')
  # Reference: KL between the true posterior and the model's Gaussian (DDPM eq. 5), decoder
  # NLL at t = 0 (DDPM eq. 13), both in bits per dimension.
  abar, abar_prev, betas, post_var = (col(ref[k][t]) for k in ('abar', 'abar_prev', 'betas',
                                                              'post_var'))
  xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  c1 = betas * np.sqrt(abar_prev) / (1 - abar)
  c2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
  x0_hat = (xt - np.sqrt(1 - abar) * 0.3 * xt) / np.sqrt(abar)
  model_mean = c1 * x0_hat + c2 * xt
  model_var = np.where(col(t) == 0, ref['post_var'][1], betas)
  true_var = np.where(col(t) == 0, ref['post_var'][1], post_var)
  kl = 0.5 * (-1 + np.log(model_var / true_var) + true_var / model_var
              + (c1 * x0 + c2 * xt - model_mean) ** 2 / model_var)
  hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  sd = np.sqrt(model_var)
  with np.errstate(divide='ignore'):  # rows t > 0 are not decoder terms
    nll = -np.log(ndtr((hi - model_mean) / sd) - ndtr((lo - model_mean) / sd))
  want = np.where(t == 0, nll.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))) / LN2
  close(terms['vb'], want, rtol=2e-3, atol=1e-6)
  close(terms['loss'], terms['vb'], atol=0)


@pytest.mark.parametrize('var_type', ['fixedlarge', 'learned', 'learned_range'])
def test_hybrid_is_l_simple_plus_scaled_vlb_with_frozen_mean(var_type):
  schedule = schedules.make_schedule('cosine', 400)  # T != 1000 so the vb scale is visible
  x0, eps = data(21)
  t = np.array([0, 3, 200, 399], np.int32)
  learned = var_type in diffusion.LEARNED_VAR_TYPES
  kw = dict(model_mean_type='eps', model_var_type=var_type)

  def loss(params, loss_type):
    model_fn = linear_model(params['mean'], params['var'], learned)
    return objectives.training_losses(model_fn, schedule, x0, t, eps, loss_type=loss_type, **kw)

  @jax.jit
  def everything(params):
    mean_loss = lambda p, lt: loss(p, lt)['loss'].mean()
    grads = {lt: jax.grad(mean_loss)(params, lt) for lt in ('hybrid', 'kl')}
    grads['mse_term'] = jax.grad(lambda p: loss(p, 'mse')['mse'].mean())(params)
    return {lt: loss(params, lt) for lt in diffusion.LOSS_TYPES}, grads

  params = {'mean': jnp.float32(0.4), 'var': jnp.float32(0.2 if learned else 0.0)}
  terms, grads = everything(params)
  hybrid, mse, kl = terms['hybrid'], terms['mse'], terms['kl']
  # Improved DDPM sec. 3.1: L_simple + 0.001 L_vlb, L_vlb estimated by T L_t.
  close(hybrid['loss'], hybrid['mse'] + 0.001 * 400 * hybrid['vb'], atol=1e-6)
  close(hybrid['vb'], kl['vb'], rtol=1e-6)
  if learned:  # plain mse with a learned variance adds the unscaled vb term
    close(mse['loss'], mse['mse'] + mse['vb'], atol=1e-6)
  # Stop-gradient on the mean: the vb term does not move the mean prediction.
  assert float(grads['hybrid']['mean']) == pytest.approx(float(grads['mse_term']['mean']),
                                                         rel=1e-5)
  assert abs(float(grads['kl']['mean'])) > 1e-3
  if learned:
    assert abs(float(grads['hybrid']['var'])) > 1e-6


LOSS_CASES = [(mean, var, loss) for loss in diffusion.LOSS_TYPES for var in diffusion.VAR_TYPES
              for mean in ('eps',)] + [(mean, 'learned_range', 'hybrid') for mean in ('x0', 'v')]


@pytest.mark.parametrize('mean_type, var_type, loss_type', LOSS_CASES)
def test_losses_trace_once_and_are_finite_in_bf16(schedule, mean_type, var_type, loss_type):
  learned = var_type in diffusion.LEARNED_VAR_TYPES
  chex.clear_trace_counter()  # the counter is keyed by function, shared by the parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(scale, x0, t, noise):
    model_fn = linear_model(scale, 0.1, learned)
    return objectives.training_losses(model_fn, schedule, x0, t, noise, model_mean_type=mean_type,
                                     model_var_type=var_type, loss_type=loss_type)

  for seed in (22, 23):
    x0, eps = data(seed)
    x0 = jnp.asarray(x0, jnp.bfloat16)
    eps = jnp.asarray(eps, jnp.bfloat16)
    terms = loss_fn(jnp.bfloat16(0.5 + 0.1 * seed), x0, jnp.asarray(times(seed)), eps)
    for name, value in terms.items():
      chex.assert_shape(value, (SHAPE[0],))
      chex.assert_tree_all_finite(value)
      assert value.dtype == jnp.float32, name
    assert ('vb' in terms) == (loss_type != 'mse' or learned)


def test_bpd_loop_traces_once(schedule):
  small = schedules.make_schedule('linear', 20)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def bpd(scale, x0, key):
    return likelihood.calc_bpd_loop(lambda x, t, cond=None: scale * x, small, x0, key,
                                   model_mean_type='eps', model_var_type='fixedlarge')

  for seed in (24, 25):
    out = bpd(jnp.float32(0.1 * seed), jnp.asarray(data(seed)[0], jnp.bfloat16),
              jax.random.key(seed))
    chex.assert_shape([out['vb'], out['mse'], out['xstart_mse']], (SHAPE[0], 20))
    chex.assert_tree_all_finite(out)
    close(out['total_bpd'], out['vb'].sum(axis=1) + out['prior_bpd'], rtol=1e-6)


# --- Gaussian data: the bound in closed form -----------------------------------------------------

STD = 0.5  # x_0 ~ N(0, STD^2) per pixel, discretised to the 256 levels


def bin_probs(x, mean, sd):
  """Mass of N(mean, sd^2) over the bins of x (open edges), float64."""
  hi = np.where(x > 0.999, np.inf, x + 1 / 255)
  lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
  return ndtr((hi - mean) / sd) - ndtr((lo - mean) / sd)


def expected_vlb_bits(x0, var_type):
  """E over x_{1:T} ~ q of the VLB (DDPM eq. 5) per pixel, in bits, for the Gaussian-optimal
  eps model; float64 closed forms, plus Gauss-Hermite quadrature for the decoder term.

  With v_t = abar_t s^2 + 1 - abar_t, the model's x_0-hat = k_t x_t, k_t = sqrt(abar_t) s^2 / v_t
  (E[x_0 | x_t]); the mean error c1_t (x_0 - k_t x_t) is Gaussian given x_0.
  """
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  c1 = betas * np.sqrt(abar_prev) / (1 - abar)
  k = np.sqrt(abar) * STD ** 2 / (abar * STD ** 2 + 1 - abar)
  x = x0.reshape(-1, 1)
  model_var = betas[1:] if var_type == 'fixedlarge' else post_var[1:]
  sq_err = x ** 2 * (1 - k[1:] * np.sqrt(abar[1:])) ** 2 + k[1:] ** 2 * (1 - abar[1:])
  kl = 0.5 * (-1 + np.log(model_var / post_var[1:]) + post_var[1:] / model_var
              + c1[1:] ** 2 * sq_err / model_var)
  z, w = np.polynomial.hermite_e.hermegauss(80)
  x1 = np.sqrt(abar[0]) * x + np.sqrt(1 - abar[0]) * z  # c1_0 = 1, c2_0 = 0
  p = np.maximum(bin_probs(x, k[0] * x1, np.sqrt(post_var[1])), 1e-300)
  decoder = -(np.log(p) * w).sum(axis=1) / w.sum()
  prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x[:, 0] ** 2)
  return (kl.sum(axis=1) + decoder + prior) / LN2


def test_gaussian_data_vlb(schedule):
  """The full bound for x_0 ~ N(0, 0.5^2), quantised, with the optimal eps-predictor
  E[eps | x_t] = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t).

  Numbers (float64): the exact discretised NLL (entropy of the quantised Gaussian, whose two
  edge bins hold the 4.6% of mass beyond +-1) is 7.764 bits/dim; the continuous approximation
  h(N(0, 0.25)) + log2(255/2) = 8.041 ignores those edges. The expected fixedlarge bound is
  8.039: 0.16 of the 0.275 gap comes from the edge pixels (the linear model does not know
  the atoms at +-1), the rest from the decoder, whose variance beta~_1 ~= 5e-5 is half the
  forward noise beta_1 = 1e-4 at the first step. fixedsmall is looser (8.69).
  """
  rng = np.random.default_rng(26)
  x0 = np.clip(np.round((rng.normal(0, STD, (8, 16, 16, 4)) + 1) * 127.5), 0, 255) / 127.5 - 1
  true_nll = -np.log2(bin_probs(x0, 0.0, STD)).mean()
  levels = np.arange(256) / 127.5 - 1
  probs = bin_probs(levels, 0.0, STD)
  assert -(probs * np.log2(probs)).sum() == pytest.approx(7.7629, abs=1e-3)
  continuous = 0.5 * np.log2(2 * np.pi * np.e * STD ** 2) + np.log2(127.5)
  assert continuous == pytest.approx(8.041, abs=1e-3)

  def model_fn(x, t, cond=None):
    abar = diffusion.extract(schedule.alphas_cumprod, t, x.ndim)
    return jnp.sqrt(1 - abar) * x / (abar * STD ** 2 + 1 - abar)

  @jax.jit
  def bpd(x, key):
    return {var: likelihood.calc_bpd_loop(model_fn, schedule, x, key, model_mean_type='eps',
                                         model_var_type=var, clip_denoised=False)['total_bpd']
            for var in ('fixedlarge', 'fixedsmall')}

  got = bpd(jnp.asarray(x0, jnp.float32), jax.random.key(0))
  large, small = float(got['fixedlarge'].mean()), float(got['fixedsmall'].mean())
  want_large = expected_vlb_bits(x0, 'fixedlarge').mean()
  want_small = expected_vlb_bits(x0, 'fixedsmall').mean()
  # Monte Carlo over x_{1:T} (one draw per t): ~0.018 bits/dim standard error at 8192 pixels.
  assert large == pytest.approx(want_large, abs=0.07)
  assert small == pytest.approx(want_small, abs=0.07)
  assert 0 < want_large - true_nll < 0.3  # a bound, and not a loose one
  assert abs(want_large - continuous) < 0.05  # the "~8.04 bits/dim"
  assert large > true_nll
  assert small > large + 0.4  # fixedsmall is the looser bound


# --- Time sampling -------------------------------------------------------------------------------


def test_sample_timesteps():
  t = timesteps.sample_timesteps(jax.random.key(0), 4096, 10)
  assert t.dtype == jnp.int32 and t.shape == (4096,)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.min() > 300 and int(t.max()) == 9 and int(t.min()) == 0


class ReferenceResampler:
  """improved-diffusion's LossSecondMomentResampler, transcribed in NumPy float64."""

  def __init__(self, num_timesteps, history, uniform_prob):
    self.history = np.zeros((num_timesteps, history))
    self.counts = np.zeros(num_timesteps, int)
    self.uniform_prob = uniform_prob

  def weights(self):
    if not (self.counts == self.history.shape[1]).all():
      return np.full(len(self.counts), 1 / len(self.counts))
    w = np.sqrt((self.history ** 2).mean(axis=-1))
    w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / len(w)
    return w

  def update(self, ts, losses):
    for t, loss in zip(ts, losses):
      if self.counts[t] == self.history.shape[1]:
        self.history[t, :-1] = self.history[t, 1:]
        self.history[t, -1] = loss
      else:
        self.history[t, self.counts[t]] = loss
        self.counts[t] += 1


def test_loss_aware_sampler_matches_reference():
  num_timesteps, history = 6, 3
  state = timesteps.loss_aware_init(num_timesteps, history)
  ref = ReferenceResampler(num_timesteps, history, 0.01)
  update = jax.jit(timesteps.loss_aware_update)
  rng = np.random.default_rng(27)
  np.testing.assert_allclose(timesteps.loss_aware_probs(state, 0.01), ref.weights(), rtol=1e-6)
  for _ in range(12):  # repeated t within a batch, histories filling and shifting
    t = rng.integers(0, num_timesteps, 8).astype(np.int32)
    losses = rng.uniform(0.1, 2.0, 8) * (1 + np.arange(num_timesteps))[t]
    state = update(state, t, losses.astype(np.float32))
    ref.update(t, losses)
    np.testing.assert_allclose(state.loss_history, ref.history, rtol=1e-6)
    np.testing.assert_array_equal(state.loss_counts, ref.counts)
    np.testing.assert_allclose(timesteps.loss_aware_probs(state, 0.01), ref.weights(), rtol=1e-5)
  assert (ref.counts == history).all()
  t, weights = jax.jit(timesteps.loss_aware_sample, static_argnums=2)(jax.random.key(1), state,
                                                                      20000, 0.01)
  probs = ref.weights()
  np.testing.assert_allclose(weights, 1 / (num_timesteps * probs[np.asarray(t)]), rtol=1e-5)
  freq = np.bincount(np.asarray(t), minlength=num_timesteps) / 20000
  np.testing.assert_allclose(freq, probs, atol=0.015)
  # Importance weighting leaves the expected loss unchanged.
  per_t = rng.uniform(1, 2, num_timesteps)
  assert float(np.mean(per_t[np.asarray(t)] * np.asarray(weights))) == pytest.approx(
      per_t.mean(), rel=0.03)


# --- Errors --------------------------------------------------------------------------------------


def test_types_from_config():
  from jaxddpm import factories  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'diffusion': dict(
      model_mean_type='v', model_var_type='learned_range', loss_type='hybrid')})
  assert factories.diffusion_types(config) == dict(
      model_mean_type='v', model_var_type='learned_range', loss_type='hybrid')
  for field, bad in (('model_mean_type', 'epsilon'), ('model_var_type', 'fixed'),
                     ('loss_type', 'l1')):
    broken = ml_collections.ConfigDict(config.to_dict())
    broken.diffusion[field] = bad
    with pytest.raises(ValueError, match=f"{field} '{bad}'"):
      factories.diffusion_types(broken)


def test_bad_types_and_shapes_raise(schedule):
  x0, eps = data(28)
  t = times(29)
  model_fn = linear_model(1.0, 0.0, False)
  with pytest.raises(ValueError, match="'score'"):
    diffusion.p_mean_variance(model_fn, schedule, x0, t, model_mean_type='score',
                              model_var_type='fixedlarge')
  with pytest.raises(ValueError, match="'huber'"):
    objectives.training_losses(model_fn, schedule, x0, t, eps, model_mean_type='eps',
                              model_var_type='fixedlarge', loss_type='huber')
  with pytest.raises(ValueError, match="'learned'"):  # C channels where 2C are needed
    objectives.training_losses(model_fn, schedule, x0, t, eps, model_mean_type='eps',
                              model_var_type='learned', loss_type='mse')
  assert diffusion.model_output_channels(3, 'learned_range') == 6
  assert diffusion.model_output_channels(3, 'fixedsmall') == 3
