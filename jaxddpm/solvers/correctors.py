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

Metropolis-adjusted versions need log q_j(x) itself, which an energy-parameterised model
gives (Du et al., sec. 3.3; `jaxddpm.models.make_energy_fn`: eps = grad_x E, so
log q_j = -U_j + const with U_j(x) = E(x, t_j) / sigma_j; compositions by
`composition.compose_energy`). With `energy_fn` they make the steps exact for q_j at any step
size (the step size then trades acceptance against distance):

  MALA (Roberts & Tweedie 1996): x' = x - eta_j grad U(x) + sqrt(2 eta_j) z, accepted with
    probability min(1, exp(U(x) - U(x') + log g(x | x') - log g(x' | x))),
    log g(a | b) = -||a - b + eta_j grad U(b)||^2 / (4 eta_j);  K steps per level.
  MHMC (Neal 2011, sec. 5.2.3): v ~ N(0, I) afresh, L leapfrog steps of size h_j on U, the
    end point accepted with probability min(1, exp(H(x, v) - H(x', v'))), H = U + |v|^2 / 2;
    K steps per level.

The scores then come from grad U, the model function is not called by the corrector.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxddpm import diffusion
from jaxddpm.solvers import base

METHODS = ('ula', 'hmc', 'mala', 'mhmc')
ADJUSTED = ('mala', 'mhmc')  # Metropolis-adjusted: they need an energy


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
  energy_fn: energy_fn(x, t, cond) -> [B] for 'mala' / 'mhmc', else None.
  method: one of METHODS. num_steps: K. num_leapfrog: L (HMC, MHMC). All but the arrays and
  energy_fn static.
  """
  solver: Any
  step_scale: jax.Array
  damping: jax.Array
  energy_fn: Any
  method: str = flax.struct.field(pytree_node=False)
  num_steps: int = flax.struct.field(pytree_node=False)
  num_leapfrog: int = flax.struct.field(pytree_node=False)

  @property
  def evaluations_per_level(self) -> int:
    if self.method in ('ula', 'mala'):
      return self.num_steps + (self.method == 'mala')
    return self.num_steps * (self.num_leapfrog + (self.method == 'mhmc')) + 1

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
    run = {'ula': self._ula, 'hmc': self._hmc, 'mala': self._mala, 'mhmc': self._mhmc}[self.method]
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


  def _potential(self, j, cond):
    """x -> (U_j(x) [B], grad U_j(x)), U_j = E(x, t_j) / sigma_j (module docstring)."""
    t_index = self.solver.times[j]
    sigma = self.grid.sigma[j]

    def potential(x):
      t = jnp.full((x.shape[0],), self.solver.schedule.timestep_map[t_index], jnp.int32)
      u = jnp.asarray(self.energy_fn(x, t, cond), jnp.float32) / sigma
      return jnp.sum(u), u

    def value_and_grad(x):
      (_, u), g = jax.value_and_grad(potential, has_aux=True)(x)
      return u, g

    return value_and_grad

  @staticmethod
  def _accept(key, log_ratio, new, old):
    """Per example: `new` where log u < log_ratio (u ~ U(0, 1)), else `old`."""
    u = jax.random.uniform(key, log_ratio.shape)
    take = jnp.log(u) < log_ratio
    return jax.tree.map(lambda a, b: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                        new, old)

  def _mala(self, model_fn, x, j, key, cond):
    del model_fn
    eta = self.step_scale * self.grid.sigma[j] ** 2
    value_and_grad = self._potential(j, cond)
    flat = lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=-1)

    def body(k, carry):
      x, u, g = carry
      z_key, u_key = jax.random.split(jax.random.fold_in(key, k))
      proposal = x - eta * g + jnp.sqrt(2.0 * eta) * jax.random.normal(z_key, x.shape, x.dtype)
      u_new, g_new = value_and_grad(proposal)
      log_ratio = (u - u_new - flat(x - proposal + eta * g_new) / (4.0 * eta)
                   + flat(proposal - x + eta * g) / (4.0 * eta))
      return self._accept(u_key, log_ratio, (proposal, u_new, g_new), (x, u, g))

    u, g = value_and_grad(x)
    return jax.lax.fori_loop(0, self.num_steps, body, (x, u, g))[0]

  def _mhmc(self, model_fn, x, j, key, cond):
    del model_fn
    h = self.step_scale * self.grid.sigma[j]
    value_and_grad = self._potential(j, cond)
    kinetic = lambda v: 0.5 * jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1)

    def leapfrog(_, carry):
      x, v, u, g = carry
      v = v - 0.5 * h * g
      x = x + h * v
      u, g = value_and_grad(x)
      return x, v - 0.5 * h * g, u, g

    def body(k, carry):
      x, u, g = carry
      v_key, u_key = jax.random.split(jax.random.fold_in(key, k))
      v = jax.random.normal(v_key, x.shape, x.dtype)
      x_new, v_new, u_new, g_new = jax.lax.fori_loop(0, self.num_leapfrog, leapfrog,
                                                     (x, v, u, g))
      log_ratio = u + kinetic(v) - u_new - kinetic(v_new)
      return self._accept(u_key, log_ratio, (x_new, u_new, g_new), (x, u, g))

    u, g = value_and_grad(x)
    return jax.lax.fori_loop(0, self.num_steps, body, (x, u, g))[0]


def with_correctors(solver, method: str = 'ula', *, num_steps: int = 1,
                    step_scale: float = 0.1, num_leapfrog: int = 3,
                    damping: float = 0.0, energy_fn=None) -> Corrected:
  """`solver` with `num_steps` (K) MCMC steps of `method` at every noise level it reaches.
  Host-side.

  Args:
    solver: a single-step solver of this package (ddpm, ddim, heun), not wrapped (wrap the
      result with inpainting if needed). Guidance and composition are in the model_fn given
      to `sample`, which the corrector's score uses too.
    method: 'ula', 'hmc', or the Metropolis-adjusted 'mala', 'mhmc' (module docstring).
    num_steps: K >= 1 per level.
    step_scale: c > 0: eta_j = c sigma_j^2 (ULA), h_j = c sigma_j (HMC); below 2 for stability.
    num_leapfrog: L >= 1 leapfrog steps per HMC step.
    damping: d in [0, 1), the momentum kept at each HMC refresh (MHMC refreshes fully).
    energy_fn: for 'mala' / 'mhmc', energy_fn(x, t, cond) -> [B] with eps = grad_x energy
      (`models.make_energy_fn`, or `composition.compose_energy` of one), called with the
      model's timesteps; None otherwise.

  Raises:
    ValueError: an unknown method, a bad count or scale, or a solver with a multistep history
      (its remembered predictions belong to the uncorrected path) or without `times`.
  """
  if method not in METHODS:
    raise ValueError(f'unknown corrector {method!r}; expected one of {METHODS}')
  if num_steps < 1 or num_leapfrog < 1:
    raise ValueError(f'num_steps and num_leapfrog must be >= 1, got {num_steps}, {num_leapfrog}')
  if (method in ADJUSTED) != (energy_fn is not None):
    raise ValueError(f"the Metropolis-adjusted correctors {ADJUSTED} need energy_fn (an "
                     f"energy-parameterised model) and the others take none; got method "
                     f"{method!r} with{'' if energy_fn is not None else 'out'} energy_fn")
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
                   damping=jnp.asarray(damping, jnp.float32),
                   energy_fn=None if energy_fn is None else base.as_pytree(energy_fn),
                   method=method,
                   num_steps=int(num_steps), num_leapfrog=int(num_leapfrog))
