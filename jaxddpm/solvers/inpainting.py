"""Inpainting by replacement, a wrapper around any solver's step, and the PSNR of the fill.

After every step (and at the start) the known region of x is replaced by a draw of the
forward process at the level x is now at, q(x_j | x_0 = known) = N(alpha_j known, sigma_j^2 I)
(the replacement method, Song et al. 2021 "Score-based generative modeling through SDEs",
app. I.2; RePaint, Lugmayr et al. 2022, Algorithm 1 line 5), exactly `known` at the data.
The wrapped solver's noise is unchanged: the replacement draws from the wrapper half of each
operation's key (`base.split_op_key`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxddpm.solvers import base


@flax.struct.dataclass
class Inpainting(base.Wrapped):
  """A solver whose samples keep `known` where mask = 1. Build with `replacement`.

  solver: the wrapped solver. known: float32 in [-1, 1], broadcastable to x [B, ...] (one
  image [1, ...] for the whole batch, or one per sample). mask: float32, broadcastable to x,
  1 where `known` is kept.
  """
  solver: Any
  known: jax.Array
  mask: jax.Array

  def _replace(self, x: jax.Array, point, key: jax.Array) -> jax.Array:
    """x with its known region a draw of q(x_point | known) (DDPM eq. 4)."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    noisy = self.grid.alpha[point] * self.known + self.grid.sigma[point] * noise
    return self.mask * noisy + (1.0 - self.mask) * x

  def init(self, x_T: jax.Array, key: jax.Array) -> Any:
    return self.solver.init(self._replace(x_T, 0, jax.random.fold_in(key, 1)), key)

  def step(self, model_fn, state, i, key, cond) -> Any:
    state = self.solver.step(model_fn, state, i, key, cond)
    _, known_key = base.split_op_key(key)
    return state.replace(x=self._replace(state.x, i + 1, known_key))


def replacement(solver, known, mask) -> Inpainting:
  """`solver` inpainting `known` (float32 in [-1, 1]) where `mask` = 1 (see `Inpainting`)."""
  return Inpainting(solver=solver, known=jnp.asarray(known, jnp.float32),
                    mask=jnp.asarray(mask, jnp.float32))


def masked_psnr(x, reference, mask, *, data_range: float = 2.0) -> jax.Array:
  """PSNR of the filled (mask == 0) region: 10 log10(data_range^2 / MSE), per image.

  Args:
    x, reference: [B, H, W, C] images on the same scale ([-1, 1] -> data_range 2;
      uint8 values -> 255).
    mask: broadcastable to x, 1 = known region (excluded).

  Returns:
    [B] float32 PSNR in dB (inf where the filled region matches exactly).
  """
  x = jnp.asarray(x, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  fill = 1.0 - jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  axes = tuple(range(1, x.ndim))
  mse = jnp.sum(fill * (x - reference) ** 2, axes) / jnp.maximum(jnp.sum(fill, axes), 1.0)
  return 10.0 * jnp.log10(data_range ** 2 / mse)
