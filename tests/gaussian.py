"""The analytic model of the solver tests: the optimal denoiser of Gaussian data.

For data x_0 ~ N(mu, s^2) per pixel, q(x_t) = N(sqrt(abar_t) mu, abar_t s^2 + 1 - abar_t) and

  E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
  E[x_0 | x_t] = mu + s^2 sqrt(abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t).

In EDM's variables y = x_t / sqrt(abar_t), sigma^2 = (1 - abar_t) / abar_t, the probability-flow
ODE dy / d sigma = (y - E[x_0 | y]) / sigma = (y - mu) sigma / (s^2 + sigma^2) has the closed-form
solution y(sigma) - mu = (y(sigma_T) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import parallel
from jaxddpm import solvers

MU, S = 0.3, 0.2


def optimal_model(alphas_cumprod, mean_type='eps', var_type='fixedlarge', mu=MU, s=S,
                  counter=None):
  """model_fn(x, t, cond) of the optimal eps / x0 / v prediction at integer timesteps t
  (alphas_cumprod: [T], the schedule's float32 abar); a learned_range variance output of 0
  (frac = 1/2) is appended for var_type 'learned_range'. `counter` gets one entry per trace."""
  abar = jnp.asarray(alphas_cumprod, jnp.float32)

  def model_fn(x, t, cond=None):
    del cond
    if counter is not None:
      counter.append(1)
    a = abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
    centred = (x - jnp.sqrt(a) * mu) / (a * s ** 2 + 1 - a)
    eps = jnp.sqrt(1 - a) * centred
    x0 = mu + s ** 2 * jnp.sqrt(a) * centred
    out = {'eps': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]
    if var_type == 'learned_range':
      out = jnp.concatenate([out, jnp.zeros_like(out)], axis=-1)
    return out

  return model_fn


def exact_ode_solution(x_T, abar_T: float, abar_t: float, mu=MU, s=S) -> np.ndarray:
  """float64 x_t of the probability-flow ODE started from x_T (at abar_T), at abar_t."""
  sigma_T2, sigma_t2 = (1 - abar_T) / abar_T, (1 - abar_t) / abar_t
  y_T = np.asarray(x_T, np.float64) / np.sqrt(abar_T)
  y_t = mu + (y_T - mu) * np.sqrt((s ** 2 + sigma_t2) / (s ** 2 + sigma_T2))
  return np.sqrt(abar_t) * y_t


def lambda_uniform_betas(num_timesteps: int, lambda_min: float, lambda_max: float) -> np.ndarray:
  """float64 betas whose T levels are uniform in lambda = log(alpha / sigma), lambda_max at
  t = 0: logSNR grids of N points with (T - 1) / (N - 1) an integer are lattice points, so the
  rounding to trained levels leaves their steps exactly uniform."""
  lam = lambda_max - (lambda_max - lambda_min) * np.arange(num_timesteps) / (num_timesteps - 1)
  abar = 1.0 / (1.0 + np.exp(-2.0 * lam))
  return 1.0 - abar / np.append(1.0, abar[:-1])


def sample_sharded(plan, model_fn, key, shape):
  """x_0 of `plan` by the loop jaxddpm.sample runs: the state split over every device on
  'data' (scalars replicated), x_T drawn there, one jitted `run_chunk` per chunk."""
  mesh = parallel.make_mesh()
  init = lambda k: plan.init(k, shape)
  shardings = jax.tree.map(
      lambda a: parallel.data_sharding(mesh) if a.ndim else parallel.replicated(mesh),
      jax.eval_shape(init, key))
  state = jax.jit(init, out_shardings=shardings)(key)
  run = jax.jit(solvers.run_chunk, out_shardings=(shardings, None))
  for start in plan.chunk_starts:
    state, _ = run(plan, model_fn, state, start)
  return state.x
