"""Progressive distillation (Salimans & Ho 2022, "PD"): the pure core.

A student learns to take in one DDIM step what its teacher takes in two (PD Algorithm 2).
Every round halves the step count: N -> N / 2 -> ... -> 1, the student of one round being
the teacher of the next.

The time grid. A discrete DDPM teacher (T timesteps) is distilled on K + 1 points
j = 0, ..., K of noise level j / K (K = 2 N_0, N_0 the first student's steps):

  point 0      the data: alpha = 1, sigma = 0;
  point j      the schedule index t_j = round(j T / K) - 1: alpha_j = sqrt(abar_{t_j}),
               sigma_j = sqrt(1 - abar_{t_j}) (float64, then float32), the model sees t_j;
  point K      pure noise: alpha = 0, sigma = 1 (SNR 0), the model sees T - 1.

A round of N student steps uses the points j = i K / N, i = 0..N; its teacher takes two
steps of half the size (the points j = i K / (2N)). Every round's points are a subset of
the first round's, so every model always sees integer timesteps it was trained on.

The endpoint. DDPM's schedules end at abar_T > 0 (linear: abar_{999} = 4.0e-5), but
sampling starts from x_T ~ N(0, I), not from alpha_T x + sigma_T eps. PD's pitfall is a
student trained at alpha_T > 0 that samples from pure noise: its first step sees an input it
was never trained on, and an eps student cannot predict x at SNR 0 at all (x = (z - sigma
eps) / alpha). So the top point is SNR 0 exactly: training draws z_K = eps, the student
(v or x parameterised, never eps) predicts x from pure noise, and sampling starts from the
same N(0, I). The original teacher is still called at index T - 1 on that pure noise, which
is what its own DDIM sampler does.

DDIM step between points (PD eq. 8, eta = 0), from x-hat at point t to point s:

  z_s = alpha_s x-hat + sigma_s (z_t - alpha_t x-hat) / sigma_t.

The target (PD Algorithm 2, eqs. 9-10): the teacher's two steps z_t -> z' -> z'' give

  x~ = (z'' - (sigma'' / sigma_t) z_t) / (alpha'' - (sigma'' / sigma_t) alpha_t),

the x-hat whose single DDIM step from z_t lands on z''. The loss is
w(t) ||x-hat_student(z_t) - x~||^2 with w = max(SNR_t, 1) ('truncated_snr', PD eq. 10) or
SNR_t + 1 ('snr_plus_one').
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import diffusion
from jaxddpm import schedules as schedules_lib
from jaxddpm.models import conditioning
from jaxddpm.solvers import base

STUDENT_MEAN_TYPES = ('v', 'x0')
WEIGHTINGS = ('truncated_snr', 'snr_plus_one')

# x_hat_fn(params, z [B, ...], j int32 scalar point, cond) -> x-hat [B, ...].
XHatFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@flax.struct.dataclass
class TimeGrid:
  """The K + 1 points of a distillation (module docstring); point j has noise level j / K.

  alpha, sigma: float32 [K + 1]; model_t: int32 [K + 1], the timestep the model sees at
  each point (0 at the data point, where no model is called).
  """
  alpha: jax.Array
  sigma: jax.Array
  model_t: jax.Array

  @property
  def num_points(self) -> int:
    """K (static: an array shape)."""
    return self.alpha.shape[0] - 1


def make_time_grid(schedule: schedules_lib.Schedule, num_points: int) -> TimeGrid:
  """The grid of K = num_points steps on a discrete schedule of T timesteps. Host-side.

  Raises:
    ValueError: K < 1 or K > T (two points would share a timestep).
  """
  t_total = schedule.num_timesteps
  if not 1 <= num_points <= t_total:
    raise ValueError(f'a distillation grid of {num_points} points needs 1 <= K <= T = '
                     f'{t_total} (the teacher\'s timesteps)')
  j = np.arange(num_points + 1)
  index = np.maximum(np.round(j * t_total / num_points).astype(np.int64) - 1, 0)
  abar = np.asarray(schedule.alphas_cumprod64, np.float64)[index]
  alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
  alpha[0], sigma[0] = 1.0, 0.0
  alpha[-1], sigma[-1] = 0.0, 1.0
  return TimeGrid(alpha=jnp.asarray(alpha, jnp.float32), sigma=jnp.asarray(sigma, jnp.float32),
                  model_t=jnp.asarray(index, jnp.int32))


def ddim_step(x_hat: jax.Array, z_t: jax.Array, alpha_t, sigma_t, alpha_s, sigma_s) -> jax.Array:
  """z_s = alpha_s x-hat + sigma_s (z_t - alpha_t x-hat) / sigma_t (PD eq. 8, eta = 0);
  sigma_t > 0. Arrays broadcast: [B, ...] samples, scalars or [B, 1, ...] coefficients."""
  return alpha_s * x_hat + sigma_s * (z_t - alpha_t * x_hat) / sigma_t


def distillation_target(z_t: jax.Array, z_tt: jax.Array, alpha_t, sigma_t, alpha_tt,
                        sigma_tt) -> jax.Array:
  """x~ = (z'' - (sigma'' / sigma_t) z_t) / (alpha'' - (sigma'' / sigma_t) alpha_t)
  (PD Algorithm 2): the x-hat whose DDIM step z_t -> point '' gives z''. At the data point
  (sigma'' = 0) it is z'' itself."""
  ratio = sigma_tt / sigma_t
  return (z_tt - ratio * z_t) / (alpha_tt - ratio * alpha_t)


def x_hat_from_output(output: jax.Array, z: jax.Array, alpha, sigma, mean_type: str) -> jax.Array:
  """x-hat of a v or x0 prediction on the grid: v: alpha z - sigma v (PD appendix D); x0: as is.
  output, z: [B, ...]; alpha, sigma broadcast against them."""
  if mean_type == 'v':
    return alpha * z - sigma * output
  if mean_type == 'x0':
    return output
  raise ValueError(f'a student predicts one of {STUDENT_MEAN_TYPES}, got {mean_type!r}')


def _coef(values: jax.Array, j: jax.Array, ndim: int) -> jax.Array:
  """values[j] for j int32 [B] (or scalar), shaped to broadcast against [B, ...] of rank ndim."""
  out = values[j]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def student_x_hat(apply_fn, grid: TimeGrid, *, mean_type: str, channels: int,
                  var_type: str = 'fixedlarge', clip: bool = False) -> XHatFn:
  """x_hat(params, z, j, cond, key=None) of a student network on the grid.

  apply_fn(params, z, t [B], cond, key) is the network (key: its dropout key, None in eval
  mode); a learned variance's extra channels are ignored. clip: to [-1, 1] (for a student
  that teaches the next round, as a sampler clips).
  """
  diffusion.check_types('eps', var_type)
  if mean_type not in STUDENT_MEAN_TYPES:
    raise ValueError(f'a student predicts one of {STUDENT_MEAN_TYPES}, got {mean_type!r}')

  def x_hat(params, z, j, cond, key=None):
    j = jnp.broadcast_to(j, (z.shape[0],))
    out, _ = diffusion.split_model_output(apply_fn(params, z, grid.model_t[j], cond, key),
                                          channels, var_type)
    x = x_hat_from_output(out, z, _coef(grid.alpha, j, z.ndim), _coef(grid.sigma, j, z.ndim),
                          mean_type)
    return jnp.clip(x, -1.0, 1.0) if clip else x

  return x_hat


def run_x_hat(apply_fn, schedule: schedules_lib.Schedule, grid: TimeGrid, *, mean_type: str,
              var_type: str, clip: bool) -> XHatFn:
  """x_hat(params, z, j, cond) of a trained diffusion run (any mean type, eps included) at
  grid points: its own `diffusion.p_mean_variance` at index model_t[j] on its (unrespaced)
  schedule, what its DDIM sampler uses; apply_fn(params, z, t, cond) is the network."""
  diffusion.check_types(mean_type, var_type)

  def x_hat(params, z, j, cond):
    t = grid.model_t[jnp.broadcast_to(j, (z.shape[0],))]
    model_fn = lambda x, tt, c: apply_fn(params, x, tt, c)
    return diffusion.p_mean_variance(model_fn, schedule, z, t, model_mean_type=mean_type,
                                     model_var_type=var_type, clip_denoised=clip,
                                     cond=cond)['pred_xstart']

  return x_hat


def teacher_two_steps(teacher: XHatFn, teacher_params, grid: TimeGrid, z_t: jax.Array,
                      j: jax.Array, half: int, cond) -> jax.Array:
  """z'' of two teacher DDIM steps j -> j - half -> j - 2 half; z_t [B, ...], j int32 [B]."""
  nd = z_t.ndim
  c = lambda v, at: _coef(v, at, nd)
  j1, j2 = j - half, j - 2 * half
  z1 = ddim_step(teacher(teacher_params, z_t, j, cond), z_t, c(grid.alpha, j), c(grid.sigma, j),
                 c(grid.alpha, j1), c(grid.sigma, j1))
  return ddim_step(teacher(teacher_params, z1, j1, cond), z1, c(grid.alpha, j1),
                   c(grid.sigma, j1), c(grid.alpha, j2), c(grid.sigma, j2))


def distillation_objective(student: XHatFn, teacher: XHatFn, grid: TimeGrid, student_steps: int,
                           *, weighting: str = 'truncated_snr',
                           cond_spec: Optional[conditioning.Spec] = None):
  """The loss of one round: N = student_steps student steps on `grid` (K divisible by 2N).

  Per example (PD Algorithm 2): x from the batch, i ~ U{1..N}, j = i K / N, eps ~ N(0, I),
  z_t = alpha_j x + sigma_j eps; z'' = `teacher_two_steps` (stop-gradient); x~ =
  `distillation_target`; L = w(SNR_j) mean((x-hat_student(z_t, j) - x~)^2), w from `weighting`.

  Randomness: (i_key, noise_key, dropout_key) = split(key, 3), dropout_key going to the
  student (`student_x_hat`'s key); conditioning dropout (for guidance) from fold_in(key, 3),
  the same dropped conditioning for teacher and student.

  Args:
    student: x_hat(params, z, j, cond, key) of the student in training mode.
    teacher: x_hat(params, z, j, cond) of the teacher (`run_x_hat` or `student_x_hat`).

  Returns:
    loss_fn(params, teacher_params, batch, key) -> (loss, metrics {'loss', 'mse'}), pure;
    batch = {'x': [B, ...], 'cond': {...}}.

  Raises:
    ValueError: K not divisible by 2 N, or an unknown weighting.
  """
  k = grid.num_points
  if student_steps < 1 or k % (2 * student_steps):
    raise ValueError(f'{student_steps} student steps need a grid of a multiple of '
                     f'{2 * student_steps} points, got {k}')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'distillation weighting must be one of {WEIGHTINGS}, got {weighting!r}')
  stride = k // student_steps

  def loss_fn(params, teacher_params, batch, key):
    x = batch['x']
    nd = x.ndim
    i_key, noise_key, dropout_key = jax.random.split(key, 3)
    cond = batch.get('cond', {})
    if cond_spec is not None:
      cond = conditioning.drop(cond, cond_spec, jax.random.fold_in(key, 3))
    j = stride * jax.random.randint(i_key, (x.shape[0],), 1, student_steps + 1)
    eps = jax.random.normal(noise_key, x.shape, jnp.float32)
    alpha, sigma = _coef(grid.alpha, j, nd), _coef(grid.sigma, j, nd)
    z_t = alpha * x + sigma * eps
    z_tt = teacher_two_steps(teacher, teacher_params, grid, z_t, j, stride // 2, cond)
    j2 = j - stride
    target = jax.lax.stop_gradient(distillation_target(
        z_t, z_tt, alpha, sigma, _coef(grid.alpha, j2, nd), _coef(grid.sigma, j2, nd)))
    mse = diffusion.mean_flat(jnp.square(student(params, z_t, j, cond, dropout_key) - target))
    snr = jnp.square(grid.alpha[j] / grid.sigma[j])
    weight = jnp.maximum(snr, 1.0) if weighting == 'truncated_snr' else snr + 1.0
    loss = jnp.mean(weight * mse)
    return loss, {'loss': loss, 'mse': jnp.mean(mse)}

  return loss_fn


# ---------------------------------------------------------------------------
# Sampling a student: DDIM on its N points of the grid.


@flax.struct.dataclass
class StudentDDIM:
  """The N-step deterministic sampler of a distilled student (PD eq. 8 on the grid).

  Step i goes from grid point (N - i) K / N to (N - i - 1) K / N. grid: the `base.Grid` of
  those points (point 0 pure noise: alpha 0, sigma 1, beta 1); alpha, sigma, model_t [N + 1]
  in solver order; mean_type 'v' or 'x0'; clip_denoised clips x-hat to [-1, 1].
  """
  grid: base.Grid
  model_t: jax.Array
  mean_type: str = flax.struct.field(pytree_node=False)
  channels: int = flax.struct.field(pytree_node=False)
  var_type: str = flax.struct.field(pytree_node=False)
  clip_denoised: bool = flax.struct.field(pytree_node=False)

  multistep = False

  @property
  def nfe(self) -> int:
    """Model evaluations of a pass: one per step."""
    return self.grid.num_steps

  def init(self, x_T: jax.Array, key: jax.Array) -> base.SolverState:
    del key
    return base.SolverState(x=x_T)

  def step(self, model_fn, state: base.SolverState, i, key, cond) -> base.SolverState:
    del key  # deterministic
    z = state.x
    out = model_fn(z, jnp.full((z.shape[0],), self.model_t[i], jnp.int32), cond)
    out, _ = diffusion.split_model_output(out, self.channels, self.var_type)
    g = self.grid
    x_hat = x_hat_from_output(out, z, g.alpha[i], g.sigma[i], self.mean_type)
    if self.clip_denoised:
      x_hat = jnp.clip(x_hat, -1.0, 1.0)
    return state.replace(x=ddim_step(x_hat, z, g.alpha[i], g.sigma[i], g.alpha[i + 1],
                                     g.sigma[i + 1]))


def student_solver(grid: TimeGrid, num_steps: int, *, mean_type: str, channels: int,
                   var_type: str = 'fixedlarge', clip_denoised: bool = True) -> StudentDDIM:
  """The sampler of a student distilled for `num_steps` on `grid`. Host-side.

  Raises:
    ValueError: K not divisible by num_steps, or an unknown mean type.
  """
  k = grid.num_points
  if num_steps < 1 or k % num_steps:
    raise ValueError(f'{num_steps} steps do not divide the {k}-point distillation grid')
  if mean_type not in STUDENT_MEAN_TYPES:
    raise ValueError(f'a student predicts one of {STUDENT_MEAN_TYPES}, got {mean_type!r}')
  points = np.arange(num_steps, -1, -1) * (k // num_steps)
  alpha = np.asarray(grid.alpha, np.float64)[points]
  sigma = np.asarray(grid.sigma, np.float64)[points]
  abar = alpha ** 2
  with np.errstate(divide='ignore', invalid='ignore'):
    beta = 1.0 - abar[:-1] / abar[1:]
  solver_grid = base.Grid(alpha=jnp.asarray(alpha, jnp.float32),
                          sigma=jnp.asarray(sigma, jnp.float32),
                          beta=jnp.asarray(beta, jnp.float32))
  return StudentDDIM(grid=solver_grid, model_t=jnp.asarray(np.asarray(grid.model_t)[points[:-1]]),
                     mean_type=mean_type, channels=int(channels), var_type=var_type,
                     clip_denoised=bool(clip_denoised))
