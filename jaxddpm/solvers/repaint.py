"""RePaint's resampling (Lugmayr et al. 2022), a plan-level wrapper around a solver.

The plan goes down the solver's grid, and every `jump_length` points it jumps back up,
renoising one point at a time with the forward transition (Algorithm 1, line 13)

  x_i = sqrt(1 - beta_i) x_{i+1} + sqrt(beta_i) z,   z ~ N(0, I)   (`base.Grid.beta`),

and goes down the same stretch again, `resample - 1` times per jump point. With the
inpainting wrapper (`inpainting.replacement`) this harmonises the fill with the known
region; resample = 1 is the plain plan (the replacement method). A solver whose state holds
a multistep history is refused: after a jump its remembered predictions belong to the
other branch of the path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm.solvers import driver

OP_RENOISE = driver.OP_STEP + 1


def repaint_plan(num_steps: int, jump_length: int = 10,
                 resample: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """RePaint's time schedule (sec. 4.2 and Algorithm 1), in levels num_steps - 1 .. 0.

  Going down from level num_steps-1 to 0, every `jump_length` levels (at j = 0, L, 2L, ...
  < num_steps - L) the plan jumps back up by L, renoising, and denoises the same stretch
  again, `resample - 1` times per jump point. resample=1 is the plain descending plan.

  Returns:
    (times, ops): int32 arrays; op k denoises at level times[k] (x_t -> x_{t-1}; code
    `driver.OP_STEP`) or renoises to level times[k] (x_{t-1} -> x_t; code OP_RENOISE).
    Level t is the solver's grid point num_steps - 1 - t.

  Raises:
    ValueError: an argument < 1, or resample > 1 with jump_length >= num_steps (no jump
      point: the plan would silently be plain replacement).
  """
  if num_steps < 1 or jump_length < 1 or resample < 1:
    raise ValueError(f'need num_steps, jump_length, resample >= 1, got '
                     f'{num_steps}, {jump_length}, {resample}')
  if resample > 1 and jump_length >= num_steps:
    raise ValueError(f'RePaint jump length {jump_length} >= {num_steps} steps never jumps '
                     f'back (it would be plain replacement); use a jump length below '
                     f'{num_steps}, or resample = 1')
  # The list of visited levels, as in the RePaint reference code (get_schedule_jump).
  jumps = {j: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t = num_steps
  visited = []
  while t >= 1:
    t -= 1
    visited.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        visited.append(t)
  times, ops = [], []
  last = visited[0] + 1
  for t in visited:
    if t < last:  # x_t -> x_{t-1}
      times.append(t)
      ops.append(driver.OP_STEP)
    else:  # x_{last-1} -> x_last
      times.append(last)
      ops.append(OP_RENOISE)
    last = t
  return np.asarray(times, np.int32), np.asarray(ops, np.int32)


def renoise(solver, state, i, key):
  """Grid point i + 1 -> i: x_i ~ q(x_i | x_{i+1}) = N(sqrt(1 - beta_i) x_{i+1}, beta_i I)."""
  beta = solver.grid.beta[i]
  noise = jax.random.normal(key, state.x.shape, state.x.dtype)
  return state.replace(x=jnp.sqrt(1.0 - beta) * state.x + jnp.sqrt(beta) * noise)


def make_plan(solver, *, jump_length: int = 10, resample: int = 1,
              **chunking) -> driver.Plan:
  """The RePaint plan of `solver` (usually an `inpainting.replacement`); chunking as in
  `driver.make_plan`. resample = 1 gives the plain plan.

  Raises:
    ValueError: as `repaint_plan`, or a solver with multistep history.
  """
  if solver.multistep:
    raise ValueError('RePaint jumps back in time, which a solver whose state holds a multistep '
                     'history cannot follow (its earlier predictions belong to the path before '
                     'the jump); use a single-step solver such as ddpm or ddim')
  num_steps = solver.grid.num_steps
  times, ops = repaint_plan(num_steps, jump_length, resample)
  extra = (renoise,) if (ops == OP_RENOISE).any() else ()
  return driver.make_plan(solver, (num_steps - 1 - times, ops), extra_ops=extra, **chunking)
