"""Solvers, their driver and wrappers against closed forms.

With data x_0 ~ N(MU, S^2) per pixel the optimal noise predictor is known in
closed form, q(x_t) = N(sqrt(abar_t) MU, abar_t S^2 + 1 - abar_t) and

  E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) MU) / (abar_t S^2 + 1 - abar_t),

so every solver is a linear-Gaussian recursion x_{t-1} = A_t x_t + B_t + sigma_t z whose
output mean and standard deviation a float64 NumPy loop computes exactly. The solvers'
Monte-Carlo moments must match that recursion, and the 1000-step solvers must reproduce
(MU, S) itself. (Few-step solvers are biased by their discretisation: 50 DDIM steps give
a standard deviation 12% (eta=0) to 21% (eta=1) too small for S=0.2; the recursion shows it.)
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm.models import conditioning
from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm.solvers import inpainting
from jaxddpm.solvers import repaint
import gaussian

MU, S = gaussian.MU, gaussian.S
SHAPE = (4, 32, 32, 1)  # 4096 i.i.d. pixels
N = int(np.prod(SHAPE))
T = 1000
BETAS = np.linspace(1e-4, 0.02, T)


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule('linear', T)


def gaussian_model(mean_type='eps', var_type='fixedlarge', mu=MU, s=S, counter=None):
  """The optimal model for x_0 ~ N(mu, s^2), called with original timesteps."""
  return gaussian.optimal_model(np.cumprod(1.0 - BETAS), mean_type, var_type, mu=mu, s=s,
                                counter=counter)


def exact_moments(use, kind, eta=0.0, var_type='fixedlarge', times=None, ops=None,
                  mu=MU, s=S):
  """Mean and std of the solver's output for x_T ~ N(0, 1), in float64.

  Args:
    use: kept timesteps (sorted); the respaced process has abar'_k = abar[use[k]].
    kind: 'ddpm' or 'ddim'.
    times, ops: a RePaint plan in levels (default: plain descending).
  """
  abar_full = np.cumprod(1.0 - BETAS)
  ab = abar_full[np.asarray(use)]
  abp = np.append(1.0, ab[:-1])
  b = 1.0 - ab / abp
  post = b * (1.0 - abp) / (1.0 - ab)
  post_clipped = np.append(post[1], post[1:])
  if times is None:
    times = np.arange(len(use))[::-1]
    ops = np.full(len(use), solvers.OP_STEP)
  m, v = 0.0, 1.0
  for i, op in zip(times, ops):
    if op == repaint.OP_RENOISE:
      m, v = np.sqrt(1 - b[i]) * m, (1 - b[i]) * v + b[i]
      continue
    a, ap = ab[i], abp[i]
    k = np.sqrt(1 - a) / (a * s ** 2 + 1 - a)  # eps = k (x - sqrt(a) mu)
    c1, c0 = (1 - np.sqrt(1 - a) * k) / np.sqrt(a), np.sqrt(1 - a) * k * mu  # x0 = c1 x + c0
    if kind == 'ddim':
      sig2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
      d = np.sqrt(1 - ap - sig2)
      A, B = np.sqrt(ap) * c1 + d * k, np.sqrt(ap) * c0 - d * k * np.sqrt(a) * mu
    else:
      coef1 = np.sqrt(ap) * b[i] / (1 - a)
      coef2 = np.sqrt(1 - b[i]) * (1 - ap) / (1 - a)
      A, B = coef1 * c1 + coef2, coef1 * c0
      sig2 = {'fixedlarge': b[i], 'fixedsmall': post[i],
              'learned_range': np.sqrt(b[i] * post_clipped[i])}[var_type]
    m, v = A * m + B, A * A * v + (sig2 if i > 0 else 0.0)
  return m, np.sqrt(v)


def assert_moments(x, mean, std, n=N):
  """Sample mean and std within 4.5 Monte-Carlo standard errors of (mean, std)."""
  x = np.asarray(x, np.float64).ravel()
  assert abs(x.mean() - mean) < 4.5 * std / np.sqrt(n), (x.mean(), mean)
  assert abs(x.std() - std) < 4.5 * std / np.sqrt(2 * n), (x.std(), std)


@pytest.mark.parametrize('kind,mean_type,var_type,seed', [
    ('ddpm', 'eps', 'fixedlarge', 0), ('ddpm', 'x0', 'fixedsmall', 0),
    ('ddpm', 'v', 'learned_range', 0), ('ddim', 'eps', 'fixedlarge', 1)])
def test_1000_steps_reproduce_gaussian(schedule, kind, mean_type, var_type, seed):
  solver = solvers.make_solver(schedule, kind, model_mean_type=mean_type,
                               model_var_type=var_type, clip_denoised=False)
  x = solvers.sample(gaussian_model(mean_type, var_type), solver, jax.random.key(seed), SHAPE)
  assert_moments(x, *exact_moments(np.arange(T), kind, var_type=var_type))
  assert_moments(x, MU, S)


@pytest.mark.parametrize('kind,num_steps,eta,spacing', [
    ('ddim', 50, 0.0, 'uniform'), ('ddim', 50, 1.0, 'uniform'), ('ddim', 50, 0.5, 'quad'),
    ('ddim', 25, 0.0, 'trailing'), ('ddpm', 100, 0.0, 'uniform')])
def test_few_steps_match_exact_recursion(schedule, kind, num_steps, eta, spacing):
  solver = solvers.make_solver(schedule, kind, num_steps=num_steps, eta=eta,
                               timestep_spacing=spacing, clip_denoised=False)
  x = solvers.sample(gaussian_model(), solver, jax.random.key(2), SHAPE)
  use = schedules.space_timesteps(T, num_steps, spacing)
  mean, std = exact_moments(use, kind, eta)
  assert_moments(x, mean, std)
  # The discretisation bias is real but bounded (and absent at 1000 steps, see above).
  assert abs(mean - MU) < 0.01 and abs(std - S) < 0.25 * S


def test_ddim_eta0_is_deterministic_given_x_T(schedule):
  solver = solvers.make_solver(schedule, 'ddim', num_steps=20)
  model_fn = gaussian_model()
  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  a = solvers.sample(model_fn, solver, jax.random.key(4), x_T=x_T)
  b = solvers.sample(model_fn, solver, jax.random.key(5), x_T=x_T)
  np.testing.assert_array_equal(a, b)
  stochastic = solvers.make_solver(schedule, 'ddim', num_steps=20, eta=1.0)
  c = solvers.sample(model_fn, stochastic, jax.random.key(4), x_T=x_T)
  d = solvers.sample(model_fn, stochastic, jax.random.key(5), x_T=x_T)
  assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-2


def test_ddim_matches_float64_reference_with_clipping():
  """Deterministic DDIM on a respaced 'quad' grid with a nonlinear model and x_0 clipping."""
  t_total, num_steps = 100, 12
  betas = np.linspace(1e-4, 0.05, t_total)
  schedule = schedules.schedule_from_betas(betas)

  def model_fn(x, t, cond=None):
    return 0.8 * jnp.tanh(2.0 * x) + 0.002 * t[:, None, None, None]

  solver = solvers.make_solver(schedule, 'ddim', num_steps=num_steps, timestep_spacing='quad',
                               clip_denoised=True)
  x_T = jax.random.normal(jax.random.key(6), (2, 4, 4, 3))
  got = solvers.sample(model_fn, solver, jax.random.key(7), x_T=x_T)

  use = np.unique((np.linspace(0, np.sqrt(0.8 * t_total), num_steps) ** 2).astype(int))
  abar = np.cumprod(1.0 - betas)[use]
  x = np.asarray(x_T, np.float64)
  for i in reversed(range(len(use))):
    a, ap = abar[i], (abar[i - 1] if i > 0 else 1.0)
    eps = 0.8 * np.tanh(2.0 * x) + 0.002 * use[i]
    x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
  np.testing.assert_allclose(got, x, atol=2e-5)


@pytest.mark.parametrize('kind,num_steps,spacing', [
    ('ddim', 50, 'uniform'), ('ddpm', 25, 'trailing'), ('ddpm', 1000, 'uniform')])
def test_grid_is_the_marginal_of_every_point(schedule, kind, num_steps, spacing):
  """Point j of the grid is q(x_t | x_0) at the j-th kept timestep from the top, the data
  last; beta_j is the forward transition between neighbours (float64 reference)."""
  grid = solvers.make_solver(schedule, kind, num_steps=num_steps, timestep_spacing=spacing).grid
  use = schedules.space_timesteps(T, num_steps, spacing)
  abar = np.append(np.cumprod(1.0 - BETAS)[use][::-1], 1.0)
  assert grid.num_steps == len(use) and grid.alpha.shape == grid.sigma.shape == abar.shape
  np.testing.assert_allclose(grid.alpha, np.sqrt(abar), rtol=1e-6)
  np.testing.assert_allclose(grid.sigma, np.sqrt(1.0 - abar), rtol=1e-5)
  np.testing.assert_allclose(grid.beta, 1.0 - abar[:-1] / abar[1:], rtol=1e-5)
  assert (grid.alpha[-1], grid.sigma[-1]) == (1.0, 0.0)


def test_same_key_same_samples_and_chunking_does_not_matter(schedule):
  model_fn = gaussian_model()
  solver = solvers.make_solver(schedule, 'ddpm', num_steps=30)
  one = solvers.make_plan(solver, num_chunks=1)
  seven = solvers.make_plan(solver, chunk_length=7)
  assert seven.num_chunks == 5 and seven.num_ops == 30
  a = solvers.sample(model_fn, one, jax.random.key(8), (2, 4, 4, 1))
  b = solvers.sample(model_fn, one, jax.random.key(8), (2, 4, 4, 1))
  c = solvers.sample(model_fn, seven, jax.random.key(8), (2, 4, 4, 1))
  d = solvers.sample(model_fn, seven, jax.random.key(9), (2, 4, 4, 1))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
  assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-2


def test_sharded_batch_gives_the_same_samples(schedule):
  """The loop of jaxddpm.sample: the state split over 4 devices on 'data', x_T drawn there."""
  model_fn = solvers.base.as_pytree(gaussian_model())
  plan = solvers.make_plan(solvers.make_solver(schedule, 'ddpm', num_steps=12), chunk_length=5)
  key = jax.random.key(15)
  want = solvers.sample(model_fn, plan, key, (8, 4, 4, 1))
  x = gaussian.sample_sharded(plan, model_fn, key, (8, 4, 4, 1))
  assert len(x.sharding.device_set) == 4
  np.testing.assert_array_equal(x, want)


def test_compiled_once_for_all_chunks_and_etas(schedule):
  counter = []
  model_fn = gaussian_model(counter=counter)
  for eta in (0.0, 0.5):
    solver = solvers.make_solver(schedule, 'ddim', num_steps=40, eta=eta)
    plan = solvers.make_plan(solver, chunk_length=10)
    assert plan.num_chunks == 4
    solvers.sample(model_fn, plan, jax.random.key(10), (2, 4, 4, 1))
  assert len(counter) == 1


def test_intermediates_are_the_states_after_every_kth_op(schedule):
  model_fn = gaussian_model()
  x_T = jax.random.normal(jax.random.key(11), (2, 4, 4, 1))
  solver = solvers.make_solver(schedule, 'ddim', num_steps=20)
  plan = solvers.make_plan(solver, intermediate_every=5, chunk_length=7)
  assert plan.chunk_length == 10
  final, xs = solvers.sample(model_fn, plan, jax.random.key(0), x_T=x_T,
                             return_intermediates=True)
  chex.assert_shape(xs, (4, 2, 4, 4, 1))
  np.testing.assert_array_equal(xs[-1], final)
  # The same states, from a plan run in chunks of 5 without a trajectory.
  plain = solvers.make_plan(solver, chunk_length=5)
  state = plain.init(jax.random.key(0), x_T=x_T)
  run_chunk = jax.jit(solvers.run_chunk, static_argnums=1)
  for i, start in enumerate(plain.chunk_starts):
    state, none = run_chunk(plain, model_fn, state, start)
    assert none is None
    np.testing.assert_allclose(xs[i], state.x, atol=1e-6)
  with pytest.raises(ValueError, match='intermediate_every'):
    solvers.sample(model_fn, plain, jax.random.key(0), x_T=x_T, return_intermediates=True)


def test_classifier_free_guidance_combines_predictions():
  num_classes, w = 10, 2.5

  def model_fn(x, t, cond):
    y = cond['label']
    eps = x * (1.0 + 0.1 * y[:, None, None, None]) + 0.01 * t[:, None, None, None]
    var = jnp.broadcast_to(0.05 * y[:, None, None, None], x.shape)
    return jnp.concatenate([eps, var], axis=-1)

  x = jax.random.normal(jax.random.key(12), (3, 2, 2, 2))
  t = jnp.array([5, 50, 500])
  y = jnp.array([0, 3, 9])
  spec = {'label': conditioning.Label(num_classes)}
  guided = jax.jit(lambda f, x, t, y: f(x, t, {'label': y}))(
      solvers.classifier_free_guidance(model_fn, w, spec), x, t, y)

  xn, tn, yn = (np.asarray(a, np.float64) for a in (x, t, y))
  cond = xn * (1 + 0.1 * yn[:, None, None, None]) + 0.01 * tn[:, None, None, None]
  uncond = xn * (1 + 0.1 * num_classes) + 0.01 * tn[:, None, None, None]
  want = np.concatenate([(1 + w) * cond - w * uncond,
                         np.broadcast_to(0.05 * yn[:, None, None, None], xn.shape)], -1)
  np.testing.assert_allclose(guided, want, rtol=1e-5, atol=1e-5)


def test_guided_sampling_compiles_once_for_all_scales(schedule):
  counter = []

  def model_fn(x, t, cond):
    counter.append(1)
    return 0.5 * x + 0.1 * cond['label'][:, None, None, None]

  solver = solvers.make_solver(schedule, 'ddim', num_steps=5, clip_denoised=False)
  y = jnp.array([1, 2])
  spec = {'label': conditioning.Label(10)}
  outs = [solvers.sample(solvers.classifier_free_guidance(model_fn, w, spec), solver,
                         jax.random.key(0), (2, 4, 4, 1), cond={'label': y})
          for w in (0.0, 3.0)]
  assert len(counter) == 1
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3


def _inpainting_setup():
  known = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)
  mask = np.zeros(SHAPE, np.float32)
  mask[:, :, :16] = 1.0  # keep the left half
  return known, jnp.asarray(mask)


def test_repaint_keeps_known_pixels_and_samples_the_rest(schedule):
  """Known pixels come back exact; the unknown pixels are independent of them here, so they
  follow the RePaint plan's exact recursion (renoising steps included)."""
  resample, jump = 3, 5
  known, mask = _inpainting_setup()
  solver = solvers.make_solver(schedule, 'ddpm', num_steps=50, clip_denoised=False)
  plan = repaint.make_plan(inpainting.replacement(solver, known, mask), resample=resample,
                           jump_length=jump)
  x = solvers.sample(gaussian_model(), plan, jax.random.key(13), SHAPE)
  x, known = np.asarray(x), np.asarray(known)
  np.testing.assert_array_equal(x[:, :, :16], known[:, :, :16])
  times, ops = repaint.repaint_plan(50, jump, resample)
  use = schedules.space_timesteps(T, 50, 'uniform')
  assert_moments(x[:, :, 16:], *exact_moments(use, 'ddpm', times=times, ops=ops), n=N // 2)
  psnr = solvers.masked_psnr(x, known, mask)
  chex.assert_shape(psnr, (SHAPE[0],))
  assert np.all(np.isfinite(psnr))


def test_step_wrappers_leave_the_solvers_noise_unchanged(schedule):
  """Inpainting draws from its own half of each operation's key: with nothing known the
  samples are bitwise the plain solver's; with everything known they are the reference."""
  known, _ = _inpainting_setup()
  solver = solvers.make_solver(schedule, 'ddpm', num_steps=20)
  plain = solvers.sample(gaussian_model(), solver, jax.random.key(16), SHAPE)
  for mask, want in ((jnp.zeros(SHAPE[1:]), plain), (jnp.ones(SHAPE[1:]), known)):
    wrapped = inpainting.replacement(solver, known, mask)
    assert wrapped.grid is solver.grid and not wrapped.multistep
    got = solvers.sample(gaussian_model(), wrapped, jax.random.key(16), SHAPE)
    np.testing.assert_array_equal(got, want)


def _exact_inpainting(use, times, ops, sigma, mu, known):
  """Mean and std of pixel 1 given pixel 0 = known, for x_0 ~ N(mu, sigma) on two pixels:
  the solver's 2-d linear-Gaussian recursion, pixel 0 replaced by q(x_t | known) after each
  denoising step (and at the start)."""
  ab = np.cumprod(1.0 - BETAS)[np.asarray(use)]
  abp = np.append(1.0, ab[:-1])
  b = 1.0 - ab / abp

  def replace(m, c, a):
    m, c = m.copy(), c.copy()
    m[0], c[0, :], c[:, 0] = np.sqrt(a) * known, 0.0, 0.0
    c[0, 0] = 1.0 - a
    return m, c

  m, c = replace(np.zeros(2), np.eye(2), ab[-1])
  for i, op in zip(times, ops):
    if op == repaint.OP_RENOISE:
      m, c = np.sqrt(1 - b[i]) * m, (1 - b[i]) * c + b[i] * np.eye(2)
      continue
    a, ap = ab[i], abp[i]
    gain = np.sqrt(1 - a) * np.linalg.inv(a * sigma + (1 - a) * np.eye(2))
    x1 = (np.eye(2) - np.sqrt(1 - a) * gain) / np.sqrt(a)  # x0-hat = x1 x + x0
    x0 = np.sqrt(1 - a) * gain @ mu
    coef1, coef2 = np.sqrt(ap) * b[i] / (1 - a), np.sqrt(1 - b[i]) * (1 - ap) / (1 - a)
    A = coef1 * x1 + coef2 * np.eye(2)
    m, c = A @ m + coef1 * x0, A @ c @ A.T + (b[i] if i > 0 else 0.0) * np.eye(2)
    m, c = replace(m, c, ap)
  return m[1], np.sqrt(c[1, 1])


@pytest.mark.parametrize('resample,jump', [(1, 1), (5, 5), (10, 1)])
def test_inpainting_conditions_on_the_known_region(schedule, resample, jump):
  """Two pixels with correlation 0.9, the first known: the fill follows the plan's exact
  recursion, and RePaint's resampling moves it towards the true conditional
  N(MU + 0.9 (k - MU), S^2 (1 - 0.81)) that the replacement method misses."""
  rho, k, n = 0.9, 0.6, 4096
  sigma = S ** 2 * np.array([[1.0, rho], [rho, 1.0]])
  mu = np.array([MU, MU])
  abar = jnp.asarray(np.cumprod(1.0 - BETAS), jnp.float32)

  def model_fn(x, t, cond=None):  # the optimal eps of q(x_t) = N(sqrt(a) mu, a sigma + (1 - a) I)
    a = abar[t][:, None]
    flat = x.reshape(-1, 2)
    diag, off = a * S ** 2 + 1 - a, a * S ** 2 * rho  # [[diag, off], [off, diag]]^-1 below
    centred = flat - jnp.sqrt(a) * MU
    eps = jnp.sqrt(1 - a) * (diag * centred - off * centred[:, ::-1]) / (diag ** 2 - off ** 2)
    return eps.reshape(x.shape)

  solver = solvers.make_solver(schedule, 'ddpm', num_steps=100, clip_denoised=False)
  known = jnp.full((n, 1, 2, 1), k)
  mask = jnp.asarray([1.0, 0.0]).reshape(1, 1, 2, 1)
  plan = repaint.make_plan(inpainting.replacement(solver, known, mask), resample=resample,
                           jump_length=jump)
  x = np.asarray(solvers.sample(model_fn, plan, jax.random.key(14), (n, 1, 2, 1)))
  np.testing.assert_array_equal(x[:, 0, 0, 0], np.float32(k))
  use = schedules.space_timesteps(T, 100, 'uniform')
  times, ops = repaint.repaint_plan(100, jump, resample)
  mean, std = _exact_inpainting(use, times, ops, sigma, mu, k)
  assert_moments(x[:, 0, 1, 0], mean, std, n=n)
  true_mean = MU + rho * (k - MU)
  replacement_mean, _ = _exact_inpainting(use, *repaint.repaint_plan(100, 1, 1), sigma, mu, k)
  if resample > 1:
    assert abs(mean - true_mean) < 0.55 * abs(replacement_mean - true_mean)


def test_repaint_plan_small_example():
  times, ops = repaint.repaint_plan(6, jump_length=2, resample=2)
  d, r = solvers.OP_STEP, repaint.OP_RENOISE
  # Levels visited: 5 4 3 2 | up 3 4 | 3 2 1 0 | up 1 2 | 1 0.
  np.testing.assert_array_equal(times, [5, 4, 3, 2, 2, 3, 3, 2, 1, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(ops, [d, d, d, d, r, r, d, d, d, d, r, r, d, d])


@pytest.mark.parametrize('num_steps,jump,resample', [(250, 10, 10), (37, 4, 3), (20, 1, 1)])
def test_repaint_plan_is_consistent(num_steps, jump, resample):
  """Each op starts where the previous one ended, and it ends at the data (level -1).
  The paper's setting (T=250, L=10, r=10) has 24 jump points."""
  times, ops = repaint.repaint_plan(num_steps, jump, resample)
  level = num_steps - 1
  for t, op in zip(times, ops):
    if op == solvers.OP_STEP:
      assert t == level
      level -= 1
    else:
      assert t == level + 1
      level += 1
  assert level == -1
  num_jumps = len(range(0, num_steps - jump, jump))
  assert (ops == repaint.OP_RENOISE).sum() == num_jumps * (resample - 1) * jump
  if num_steps == 250:
    assert (ops == solvers.OP_STEP).sum() == 250 + 24 * 9 * 10


def test_repaint_refuses_a_solver_with_multistep_history(schedule):
  known, mask = _inpainting_setup()
  multistep = types.SimpleNamespace(multistep=True, grid=None)
  for solver in (multistep, inpainting.replacement(multistep, known, mask)):
    with pytest.raises(ValueError, match='multistep history'):
      repaint.make_plan(solver, resample=2, jump_length=5)


def test_masked_psnr_matches_numpy():
  rng = np.random.default_rng(1)
  x, ref = rng.uniform(-1, 1, (2, 4, 4, 3)), rng.uniform(-1, 1, (2, 4, 4, 3))
  mask = (rng.uniform(size=(2, 4, 4, 1)) > 0.5).astype(np.float64)
  got = solvers.masked_psnr(x, ref, mask)
  for i in range(2):
    fill = np.broadcast_to(mask[i] == 0, x[i].shape)
    mse = np.mean((x[i][fill] - ref[i][fill]) ** 2)
    np.testing.assert_allclose(got[i], 10 * np.log10(4.0 / mse), rtol=1e-5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_steps=1001), 'num_steps'), (dict(name='ddim', eta=1.5), 'eta'),
    (dict(name='euler'), 'unknown solver'), (dict(model_var_type='big'), 'model_var_type')])
def test_bad_arguments_raise(schedule, kwargs, match):
  with pytest.raises(ValueError, match=match):
    solvers.make_solver(schedule, **kwargs)
