"""The step that DPM-Solver++ and UniPC share: a linear multistep update on data predictions.

With D_j = x0_hat(x_j, t_j), the model's (clipped, thresholded) data prediction at grid point
j, each update of these exponential-integrator multistep methods is linear in the sample and
the stored predictions, with coefficients that depend only on the time grid:

  x_i^c   = x_i + sum_{k=0..K} c_{i,k} D_{i-k}                      (a corrector; UniPC's UniC)
  x_{i+1} = a_i x_i^c + sum_{k=0..K} b_{i,k} D_{i-k} + n_i z,  z ~ N(0, I)  (n_i: SDE variants)

The families compute the coefficient tables once, on the host, in float64 (`dpm_solver.py`,
`unipc.py`), and store them float32: a_i, n_i [N]; b_{i,k}, c_{i,k} [N, K + 1]. An order
lowered at the start (too few predictions yet) or at the end (lower-order final steps) is a
row with zeros where the missing or dropped predictions would go. One model evaluation per
step, N in all: grid points 0..N-1 are the model's times, point N the data.

The state carries x and the last K predictions, newest first, each [B, ...] (batch-leading, so
the sampling loop can shard it); they start at zero, which the zero coefficients of the first
steps never read into the result.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxddpm.solvers import base


@flax.struct.dataclass
class MultistepState:
  """x [B, ...] float32, the sample at the current point; history: the data predictions at
  the K previous points, newest first, a tuple of [B, ...] float32."""
  x: jax.Array
  history: tuple[jax.Array, ...]


@flax.struct.dataclass
class LinearMultistep(base.Denoising):
  """A solver of the form in the module docstring; the other fields are `base.Denoising`'s.

  times: int32 [N], the schedule index of grid point i (the model's time at step i).
  x_coef: float32 [N], a_i. data_coef: float32 [N, K + 1], b_{i,k}.
  corrector_coef: float32 [N, K + 1], c_{i,k} (read when `corrector`).
  noise_coef: float32 [N], n_i (read when `stochastic`).
  corrector, stochastic: static flags.
  """
  times: jax.Array
  x_coef: jax.Array
  data_coef: jax.Array
  corrector_coef: jax.Array
  noise_coef: jax.Array
  corrector: bool = flax.struct.field(pytree_node=False)
  stochastic: bool = flax.struct.field(pytree_node=False)

  multistep = True

  @property
  def nfe(self) -> int:
    return self.times.shape[0]

  @property
  def history_length(self) -> int:
    """K (static: an array shape)."""
    return self.data_coef.shape[1] - 1

  def init(self, x_T: jax.Array, key: jax.Array) -> MultistepState:
    del key  # the start is x_T itself
    zeros = jnp.zeros_like(x_T)
    return MultistepState(x=x_T, history=(zeros,) * self.history_length)

  def step(self, model_fn, state: MultistepState, i, key, cond) -> MultistepState:
    """Grid point i -> i + 1 (one model call at times[i]); x [B, ...] float32."""
    d = self.predict(model_fn, state.x, self.times[i], cond)['pred_xstart']
    preds = (d,) + state.history
    x = state.x
    if self.corrector:
      x = x + _combine(self.corrector_coef[i], preds)
    x_next = self.x_coef[i] * x + _combine(self.data_coef[i], preds)
    if self.stochastic:
      noise_key, _ = base.split_op_key(key)
      x_next = x_next + self.noise_coef[i] * jax.random.normal(noise_key, x.shape, x.dtype)
    return MultistepState(x=x_next, history=preds[:self.history_length])


def _combine(coefs: jax.Array, preds: tuple[jax.Array, ...]) -> jax.Array:
  """sum_k coefs[k] preds[k]."""
  total = coefs[0] * preds[0]
  for k in range(1, len(preds)):
    total = total + coefs[k] * preds[k]
  return total


def make(schedule, times, tables: dict, *, prediction: dict) -> LinearMultistep:
  """A `LinearMultistep` from float64 coefficient tables. Host-side.

  Args:
    schedule: the training schedule (the model's times index it).
    times: int [N], descending schedule indices of grid points 0..N-1.
    tables: x_coef [N], data_coef [N, K + 1], and optionally corrector_coef [N, K + 1] and
      noise_coef [N] (float64 NumPy).
    prediction: `base.prediction_fields(...)`.
  """
  n = len(times)
  data_coef = tables['data_coef']
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return LinearMultistep(
      schedule=schedule, grid=base.index_grid(schedule, times),
      times=jnp.asarray(times, jnp.int32), x_coef=f32(tables['x_coef']),
      data_coef=f32(data_coef),
      corrector_coef=f32(tables.get('corrector_coef', 0.0 * data_coef)),
      noise_coef=f32(tables.get('noise_coef', [0.0] * n)),
      corrector='corrector_coef' in tables, stochastic='noise_coef' in tables, **prediction)
