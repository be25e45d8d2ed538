"""MCMC correctors at every noise level (Du et al. 2023, "Reduce, Reuse, Recycle:
Compositional Generation with Energy-Based Diffusion Models and MCMC", sec. 3), a step
wrapper around a single-step solver.

After the solver's step i puts x at grid point j = i + 1 (alpha_j, sigma_j, model timestep
t_j), K MCMC steps target the distribution whose score the model gives there,

  s(x) = grad_x log q_j(x) = -eps~(x, t_j) / sigma_j

(the score of an eps model, Dhariwal & Nichol 2021, sec. 4.2; Tweedie: E[eps | x_t] =
-sigma_t grad log p_t(x_t)), with eps~ whatever model_fn returns, composed or guided
(converted to eps from an x_0 or v prediction); no steps at the data (sigma = 0). For a single
model q_j is the marginal the solver is already at, and the steps change nothing in law; for a
composition (`composition.compose`) the summed scores are not those of the noised product,
and the annealed MCMC moves the samples towards the distribution the scores describe at each
level, which at the data is the product (Du et al., sec. 3).

  ULA (unadjusted Langevin; Du et al.'s `AnnealedULASampler`; Roberts & Tweedie 1996):
    x <- x + eta_j s(x) + sqrt(2 eta_j) z,   z ~ N(0, I),   eta_j = c sigma_j^2,
  K evaluations per level.
  HMC (unadjusted, Du et al.'s `AnnealedUHASampler`; Neal 2011, sec. 5.2 with partial momentum
  refreshment, Horowitz 1991): v ~ N(0, I) at the start of each level, then K times
    v <- d v + sqrt(1 - d^2) z,
    L leapfrog steps: v <- v + (h_j / 2) s(x);  x <- x + h_j v;  v <- v + (h_j / 2) s(x),
    h_j = c sigma_j  (unit mass; d the damping, 0 a full refresh),
  K L + 1 evaluations per level (the last gradient is reused by the next leapfrog step).

Step sizes: for one model the curvature of -log q_j is at most 1 / sigma_j^2 (Tweedie's
second-order formula, -grad^2 log p_t = (I - Cov[alpha_t x_0 | x_t] / sigma_t^2) / sigma_t^2;
a composition's is the weighted sum of such terms), so eta_j = c sigma_j^2 (ULA; the annealed
Langevin rule of Song & Ermon 2019, Algorithm 1: alpha_i proportional to sigma_i^2) and
h_j = c sigma_j (HMC) are stable for c < 2 at every level with one constant (on a Gaussian, ULA
contracts by |1 - eta lambda| and leapfrog needs h sqrt(lambda) < 2). Du et al.'s code takes
step sizes proportional to the schedule's beta_t instead (e.g. `la_step_sizes = betas * 2`),
which ties them to the step count. One HMC leapfrog step with d = 0 is ULA with eta = h^2 / 2.

Metropolis-adjusted versions (MALA, HMC with accept/reject) need log q_j(x) itself, i.e. an
energy-parameterised model (Du et al., sec. 4); they are not implemented here.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxddpm import diffusion
from jaxddpm.solvers import base

METHODS = ('ula', 'hmc')


def score(solver, model_fn, x: jax.Array, j, cond) -> jax.Array:
  """s(x) = -eps~(x, t_j) / sigma_j at grid point j < N of `solver` (see the module docstring).

  Args:
    solver: a solver with `schedule`, `times` (the schedule index of each grid point) and the
      prediction's static fields (every solver of this package, unwrapped).
    x: [B, ...] float32 at point j. j: int32 scalar, may be traced.

  Returns:
    [B, ...] float32.
  """
  t = jnp.full((x.shape[0],), solver.times[j], jnp.int32)
  out = diffusion.call_model(model_fn, solver.schedule, x, t, cond)
  pred, _ = diffusion.split_model_output(jnp.asarray(out, jnp.float32), x.shape[-1],
                                         solver.model_var_type)
  if solver.model_mean_type == 'x0':
    pred = diffusion.predict_eps_from_xstart(solver.schedule, x, t, pred)
  elif solver.model_mean_type == 'v':
    pred = diffusion.predict_eps_from_v(solver.schedule, x, t, pred)
  return -pred / solver.grid.sigma[j]


@flax.struct.dataclass
class Corrected(base.Wrapped):
  """A single-step solver with K MCMC steps at each noise level it reaches (see the module
  docstring). Build with `with_correctors`.

  solver: the wrapped solver. step_scale: float32 scalar c. damping: float32 scalar d (HMC).
  method: 'ula' or 'hmc'. num_steps: K. num_leapfrog: L (HMC). All but the arrays static.
  """
  solver: Any
  step_scale: jax.Array
  damping: jax.Array
  method: str = flax.struct.field(pytree_node=False)
  num_steps: int = flax.struct.field(pytree_node=False)
  num_leapfrog: int = flax.struct.field(pytree_node=False)

  @property
  def evaluations_per_level(self) -> int:
    if self.method == 'ula':
      return self.num_steps
    return self.num_steps * self.num_leapfrog + 1

  @property
  def nfe(self) -> int:
    return self.solver.nfe + (self.grid.num_steps - 1) * self.evaluations_per_level

  def init(self, x_T: jax.Array, key: jax.Array) -> Any:
    return self.solver.init(x_T, key)

  def step(self, model_fn, state, i, key, cond) -> Any:
    """The solver's step i, then K corrector steps at point i + 1 (none at the data)."""
    state = self.solver.step(model_fn, state, i, key, cond)
    # The corrector draws from the wrapper half of the key: the solver's noise is unchanged.
    _, corrector_key = base.split_op_key(key)
    j = i + 1
    run = self._ula if self.method == 'ula' else self._hmc
    x = jax.lax.cond(j < self.grid.num_steps,
                     lambda x: run(model_fn, x, j, corrector_key, cond), lambda x: x, state.x)
    return state.replace(x=x)

  def _ula(self, model_fn, x, j, key, cond):
    eta = self.step_scale * self.grid.sigma[j] ** 2

    def body(k, x):
      z = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
      return x + eta * score(self.solver, model_fn, x, j, cond) + jnp.sqrt(2.0 * eta) * z

    return jax.lax.fori_loop(0, self.num_steps, body, x)

  def _hmc(self, model_fn, x, j, key, cond):
    h = self.step_scale * self.grid.sigma[j]
    d = self.damping
    grad_fn = lambda x: score(self.solver, model_fn, x, j, cond)

    def leapfrog(_, carry):
      x, v, g = carry
      v = v + 0.5 * h * g
      x = x + h * v
      g = grad_fn(x)
      return x, v + 0.5 * h * g, g

    def body(k, carry):
      x, v, g = carry
      z = jax.random.normal(jax.random.fold_in(key, k + 1), x.shape, x.dtype)
      v = d * v + jnp.sqrt(1.0 - d ** 2) * z
      return jax.lax.fori_loop(0, self.num_leapfrog, leapfrog, (x, v, g))

    v = jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype)
    x, _, _ = jax.lax.fori_loop(0, self.num_steps, body, (x, v, grad_fn(x)))
    return x


def with_correctors(solver, method: str = 'ula', *, num_steps: int = 1,
                    step_scale: float = 0.1, num_leapfrog: int = 3,
                    damping: float = 0.0) -> Corrected:
  """`solver` with `num_steps` (K) MCMC steps of `method` at every noise level it reaches.
  Host-side.

  Args:
    solver: a single-step solver of this package (ddpm, ddim, heun), not wrapped (wrap the
      result with inpainting if needed). Guidance and composition are in the model_fn given
      to `sample`, which the corrector's score uses too.
    method: 'ula' or 'hmc' (see the module docstring).
    num_steps: K >= 1 per level.
    step_scale: c > 0: eta_j = c sigma_j^2 (ULA), h_j = c sigma_j (HMC); below 2 for stability.
    num_leapfrog: L >= 1 leapfrog steps per HMC step.
    damping: d in [0, 1), the momentum kept at each HMC refresh.

  Raises:
    ValueError: an unknown method, a bad count or scale, or a solver with a multistep history
      (its remembered predictions belong to the uncorrected path) or without `times`.
  """
  if method not in METHODS:
    raise ValueError(f'unknown corrector {method!r}; expected one of {METHODS}')
  if num_steps < 1 or num_leapfrog < 1:
    raise ValueError(f'num_steps and num_leapfrog must be >= 1, got {num_steps}, {num_leapfrog}')
  if not step_scale > 0 or not 0.0 <= damping < 1.0:
    raise ValueError(f'need step_scale > 0 and damping in [0, 1), got {step_scale}, {damping}')
  if solver.multistep:
    raise ValueError('correctors move x between steps, which a solver whose state holds a '
                     'multistep history cannot follow (its earlier predictions belong to the '
                     'uncorrected path); use ddpm, ddim or heun')
  if not hasattr(solver, 'times'):
    raise ValueError(f'{type(solver).__name__} has no model times per grid point; wrap the '
                     f'solver itself with correctors, then with inpainting')
  return Corrected(solver=solver, step_scale=jnp.asarray(step_scale, jnp.float32),
                   damping=jnp.asarray(damping, jnp.float32), method=method,
                   num_steps=int(num_steps), num_leapfrog=int(num_leapfrog))
