"""What every solver shares: the noise-level grid, the single-step state, the solver protocol.

A solver is a pytree (a `flax.struct` dataclass) with two pure methods, in the style of an
optax `GradientTransformation`:

  state = solver.init(x_T, key)
  state = solver.step(model_fn, state, i, key, cond)    # step i: grid point i -> i + 1

Its arrays (schedule, time grid, eta, ...) are pytree leaves, so under jit a new eta is a new
argument, not a recompilation; its options (mean type, clipping) are static fields. The state
is the solver's own pytree with the current sample in `state.x` (DDPM and DDIM carry only x;
a multistep solver adds its earlier predictions). Every array of a state has the batch as
its leading axis (a history is a tuple of [B, ...] arrays), so the sampling loop can split
states over devices without knowing the solver.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxddpm import diffusion
from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import time_grids


@flax.struct.dataclass
class Grid:
  """The noise levels an N-step solver visits: point 0 is x_T, point N the data.

  At point j, x is distributed as alpha_j x_0 + sigma_j eps, eps ~ N(0, I) (the marginal
  q(x_t | x_0) of DDPM eq. 4, alpha = sqrt(abar), sigma = sqrt(1 - abar)); step i goes from
  point i to point i + 1. Wrappers (inpainting, RePaint) read only this, so they work for
  any solver, whatever its own time values (indices of a respaced schedule, continuous
  times, Karras sigmas).

  alpha, sigma: float32 [N + 1]; alpha[N] = 1, sigma[N] = 0.
  beta: float32 [N], beta_i = 1 - abar_i / abar_{i+1} (abar_j = alpha_j^2, computed in
    float64 where the grid is made): the one-step forward transition
    q(x_i | x_{i+1}) = N(sqrt(1 - beta_i) x_{i+1}, beta_i I) (RePaint's renoising, Lugmayr
    et al. 2022, Algorithm 1 line 13).
  """
  alpha: jax.Array
  sigma: jax.Array
  beta: jax.Array

  @property
  def num_steps(self) -> int:
    """N (static: an array shape)."""
    return self.beta.shape[0]


@flax.struct.dataclass
class SolverState:
  """The state of a single-step solver: x [B, ...] float32, the sample at the current point."""
  x: jax.Array


class Solver(Protocol):
  """The contract of a solver (see the module docstring); wrappers are solvers too."""
  grid: Grid
  multistep: bool  # the state remembers earlier steps (RePaint cannot jump back)
  nfe: int  # model evaluations of a whole pass over the grid

  def init(self, x_T: jax.Array, key: jax.Array) -> Any:
    """The state at point 0 for x_T [B, ...] float32; key: randomness of the start."""

  def step(self, model_fn, state: Any, i: jax.Array, key: jax.Array, cond) -> Any:
    """The state at point i + 1 (i: int32 scalar, may be traced); key: see `split_op_key`;
    cond: the conditioning pytree passed to model_fn(x, t, cond)."""


def split_op_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(solver key, wrapper key) of one operation's key.

  A solver draws its noise from the first half, a step wrapper (inpainting) from the second,
  so wrapping a solver leaves the solver's noise unchanged.
  """
  solver_key, wrapper_key = jax.random.split(key)
  return solver_key, wrapper_key


def as_pytree(model_fn) -> Partial:
  """model_fn as a `Partial` (a pytree; a `Partial` is returned as is) so it can be a jit
  argument: its bound parameters are then arguments, not constants of the program."""
  return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


def respaced(schedule: schedules_lib.Schedule, num_steps: int | None,
             spacing: str) -> schedules_lib.Schedule:
  """The schedule of `num_steps` kept timesteps (improved DDPM sec. 4); the schedule itself
  for num_steps None or T. Host-side. `spacing`: a name in `schedules.SPACINGS`.

  Raises:
    ValueError: num_steps outside [1, T], or a spacing keeping fewer than 2 timesteps.
  """
  t_total = schedule.num_timesteps
  if num_steps is None or num_steps == t_total:
    return schedule
  if not 1 <= num_steps <= t_total:
    raise ValueError(f'num_steps must be in [1, {t_total}] (the number of diffusion '
                     f'timesteps), got {num_steps}')
  use = schedules_lib.space_timesteps(t_total, num_steps, spacing)
  if use.size < 2:
    raise ValueError(f'{num_steps} step(s) with {spacing!r} spacing keep '
                     f'{use.size} timestep(s); need at least 2')
  return schedules_lib.respace(schedule, use)


class Wrapped:
  """A solver wrapper (inpainting, classifier mean shift, correctors): a dataclass with a
  `solver` field whose grid, multistep flag and evaluations it reports as its own (a
  wrapper that adds evaluations overrides `nfe`). No fields of its own."""

  @property
  def grid(self) -> 'Grid':
    return self.solver.grid

  @property
  def multistep(self) -> bool:
    return self.solver.multistep

  @property
  def nfe(self) -> int:
    return self.solver.nfe


@flax.struct.dataclass
class Denoising:
  """What every solver of this package shares: the schedule it indexes and how a model output
  becomes the x_0 prediction it steps with.

  schedule: the schedule whose indices the solver's times are ([T] arrays); the model sees
    schedule.timestep_map[t].
  grid: the `Grid` of the points the solver visits.
  model_mean_type, model_var_type, clip_denoised: as in `diffusion.p_mean_variance` (a
    learned variance is read and, by the solvers that only use the mean, ignored).
  thresholding: 0 (off), or the percentile of Imagen's dynamic thresholding of x0_hat, in
    (0, 1) (`diffusion.dynamic_threshold`; applied before clip_denoised, which it makes a
    no-op).
  """
  schedule: schedules_lib.Schedule
  grid: Grid
  model_mean_type: str = flax.struct.field(pytree_node=False)
  model_var_type: str = flax.struct.field(pytree_node=False)
  clip_denoised: bool = flax.struct.field(pytree_node=False)
  thresholding: float = flax.struct.field(pytree_node=False)

  def predict(self, model_fn, x: jax.Array, t, cond) -> dict[str, jax.Array]:
    """`diffusion.p_mean_variance` at index t (int32 scalar, may be traced) for the batch x."""
    denoised_fn = None
    if self.thresholding:
      denoised_fn = functools.partial(diffusion.dynamic_threshold, ratio=self.thresholding)
    return diffusion.p_mean_variance(
        model_fn, self.schedule, x, jnp.full((x.shape[0],), t, jnp.int32),
        model_mean_type=self.model_mean_type, model_var_type=self.model_var_type,
        clip_denoised=self.clip_denoised, cond=cond, denoised_fn=denoised_fn)


def prediction_fields(*, model_mean_type: str, model_var_type: str, clip_denoised: bool,
                      thresholding: float | None) -> dict[str, Any]:
  """The static `Denoising` fields, checked. Host-side.

  Raises:
    ValueError: an unknown mean / variance type, or thresholding outside (0, 1).
  """
  diffusion.check_types(model_mean_type, model_var_type)
  thresholding = float(thresholding or 0.0)
  if not 0.0 <= thresholding < 1.0:
    raise ValueError(f'thresholding is the percentile of dynamic thresholding, in (0, 1) '
                     f'(e.g. 0.995; 0 turns it off), got {thresholding}')
  return dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
              clip_denoised=bool(clip_denoised), thresholding=thresholding)


def index_grid(schedule: schedules_lib.Schedule, times: np.ndarray) -> Grid:
  """The `Grid` of the descending schedule indices `times` [N], the data appended.

  abar comes from the schedule's float64 `alphas_cumprod64` (float32 values without it), so
  alpha_j and sigma_j are the float32 roundings of sqrt(abar_t), sqrt(1 - abar_t), as the
  schedule's own arrays. Host-side.
  """
  abar = np.append(time_grids.alphas_cumprod64(schedule)[np.asarray(times)], 1.0)
  grid = Grid(alpha=np.sqrt(abar).astype(np.float32),
              sigma=np.sqrt(1.0 - abar).astype(np.float32),
              beta=(1.0 - abar[:-1] / abar[1:]).astype(np.float32))
  return jax.tree.map(jnp.asarray, grid)


@flax.struct.dataclass
class DiscreteSolver(Denoising):
  """Fields shared by the solvers that step down a (respaced) discrete schedule, S indices.

  Step i denoises at index times[i] = S - 1 - i (x_t -> x_{t-1}), so grid point j is
  index S - 1 - j and point S the data. Build with `discrete_fields`; the other fields are
  `Denoising`'s, the schedule the respaced one.

  times: int32 [S], the schedule index of each step.
  """
  times: jax.Array

  multistep = False

  @property
  def nfe(self) -> int:
    return self.times.shape[0]

  def init(self, x_T: jax.Array, key: jax.Array) -> SolverState:
    del key  # the start is x_T itself
    return SolverState(x=x_T)

  def step_terms(self, model_fn, x: jax.Array, i, key: jax.Array, cond):
    """What step i of DDPM and DDIM starts from, for x [B, ...] at index t = times[i].

    Returns:
      (t, out, noise, not_last): out is `Denoising.predict` at t for the whole batch;
      noise ~ N(0, I) [B, ...] from the solver half of key (`split_op_key`); not_last is
      float 0 at t = 0 (x_0 gets no noise), else 1.
    """
    t = self.times[i]
    noise_key, _ = split_op_key(key)
    out = self.predict(model_fn, x, t, cond)
    noise = jax.random.normal(noise_key, x.shape, x.dtype)
    return t, out, noise, (t > 0).astype(x.dtype)


def discrete_fields(schedule: schedules_lib.Schedule, *, model_mean_type: str,
                    model_var_type: str, clip_denoised: bool,
                    thresholding: float | None = None) -> dict[str, Any]:
  """The `DiscreteSolver` fields of a descending pass over every index of `schedule`.

  The grid (`index_grid`) holds alpha_j = sqrt(abar[t_j]), sigma_j = sqrt(1 - abar[t_j]) and
  beta_j = betas[t_j] (for consecutive indices 1 - abar_t / abar_{t-1} is beta_t). Host-side
  (the schedule must be concrete).
  """
  options = prediction_fields(model_mean_type=model_mean_type, model_var_type=model_var_type,
                              clip_denoised=clip_denoised, thresholding=thresholding)
  times = np.arange(schedule.num_timesteps, dtype=np.int32)[::-1]
  return dict(schedule=schedule, times=jnp.asarray(times), grid=index_grid(schedule, times),
              **options)
