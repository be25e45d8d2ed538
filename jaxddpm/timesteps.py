"""Timestep samplers: how the training step draws t, and the importance weights that go with it.

References:
  [DDPM]  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021.

Two layers. The functions: `sample_timesteps` (t ~ Uniform{0, ..., T-1}, [DDPM] Algorithm 1) and
the loss-aware importance sampler of [IDDPM] sec. 3.3 (`LossAwareState`, `loss_aware_init`,
`loss_aware_probs`, `loss_aware_sample`, `loss_aware_update`). And the samplers built from them,
(init, sample, update) triples in the style of optax that an objective takes:
`TimestepSampler`, `uniform_timesteps` and `loss_aware_timesteps`.

t is int32 [B] in [0, T), an index into a `schedules.Schedule`.
"""

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

PyTree = Any


# --- Uniform and loss-aware draws ----------------------------------------------------------------


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
  """t ~ Uniform{0, ..., T-1}, int32 [batch_size]  [DDPM Algorithm 1]."""
  return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


@flax.struct.dataclass
class LossAwareState:
  """Loss history for importance sampling of t  [IDDPM sec. 3.3].

  loss_history: float32 [T, H], the last H losses seen at each t (oldest first once full).
  loss_counts: int32 [T], how many of the H slots are filled.
  """
  loss_history: jax.Array
  loss_counts: jax.Array


def loss_aware_init(num_timesteps: int, history_per_term: int = 10) -> LossAwareState:
  """Empty history; IDDPM keeps the last 10 losses per timestep."""
  return LossAwareState(
      loss_history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
      loss_counts=jnp.zeros((num_timesteps,), jnp.int32))


def loss_aware_probs(state: LossAwareState, uniform_prob: float = 0.001) -> jax.Array:
  """p_t proportional to sqrt(E[L_t^2])  [IDDPM sec. 3.3], float32 [T], sums to 1.

  Uniform until every timestep has a full history; afterwards mixed with a uniform
  distribution of weight uniform_prob, as in improved-diffusion's LossSecondMomentResampler.
  """
  num_timesteps = state.loss_counts.shape[0]
  rms = jnp.sqrt(jnp.mean(jnp.square(state.loss_history), axis=-1))
  probs = rms / jnp.sum(rms) * (1.0 - uniform_prob) + uniform_prob / num_timesteps
  warmed_up = jnp.all(state.loss_counts == state.loss_history.shape[1])
  return jnp.where(warmed_up, probs, jnp.full_like(probs, 1.0 / num_timesteps))


def loss_aware_sample(key: jax.Array, state: LossAwareState, batch_size: int,
                      uniform_prob: float = 0.001):
  """Draws t ~ p_t and the importance weights 1 / (T p_t)  [IDDPM sec. 3.3].

  E_{t~p}[w_t L_t] = E_{t~uniform}[L_t], so weight the per-example losses by the weights.

  Returns:
    (t int32 [batch_size], weights float32 [batch_size]).
  """
  probs = loss_aware_probs(state, uniform_prob)
  t = jax.random.choice(key, probs.shape[0], (batch_size,), p=probs).astype(jnp.int32)
  return t, 1.0 / (probs.shape[0] * probs[t])


def loss_aware_update(state: LossAwareState, t: jax.Array, losses: jax.Array) -> LossAwareState:
  """Appends each (t_i, loss_i) to the history in batch order, dropping the oldest once full.

  Pass the global batch (all devices) so every replica keeps the same state; losses are the
  unweighted per-example losses (IDDPM uses L_vlb terms). Gradients are stopped.

  Args:
    t: int32 [B]; losses: [B].
  """
  history_len = state.loss_history.shape[1]

  def push(carry, inputs):
    history, counts = carry
    ti, loss = inputs
    count = counts[ti]
    row = history[ti]
    shifted = jnp.concatenate([row[1:], loss[None]])
    appended = row.at[jnp.minimum(count, history_len - 1)].set(loss)
    row = jnp.where(count == history_len, shifted, appended)
    return (history.at[ti].set(row), counts.at[ti].set(jnp.minimum(count + 1, history_len))), None

  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  (history, counts), _ = jax.lax.scan(
      push, (state.loss_history, state.loss_counts), (t.astype(jnp.int32), losses))
  return LossAwareState(loss_history=history, loss_counts=counts)


# --- Samplers for the objectives -----------------------------------------------------------------


class TimestepSampler(NamedTuple):
  """How t is drawn, optax style: a state, a draw from it, and its update after the step.

  init() -> state (a pytree, or None when stateless); keep it in the train state.
  sample(key, state, batch_size) -> (t int32 [B], weights float32 [B]): the timesteps and the
    importance weights w_t with E_{t~p}[w_t L_t] = E_{t~uniform}[L_t].
  update(state, t, losses) -> state: after the step, with the objective's metrics['_t'] and
    metrics['_loss'] (per-example, global batch, before importance weights).
  """
  init: Callable[[], PyTree]
  sample: Callable[[jax.Array, PyTree, int], tuple[jax.Array, jax.Array]]
  update: Callable[[PyTree, jax.Array, jax.Array], PyTree]


def uniform_timesteps(num_timesteps: int) -> TimestepSampler:
  """t ~ Uniform{0, ..., T-1}, weights 1, no state  [DDPM Algorithm 1]."""

  def sample(key, state, batch_size):
    del state
    return (sample_timesteps(key, batch_size, num_timesteps),
            jnp.ones((batch_size,), jnp.float32))

  return TimestepSampler(init=lambda: None, sample=sample, update=lambda state, t, losses: state)


def loss_aware_timesteps(num_timesteps: int, history_per_term: int = 10,
                         uniform_prob: float = 0.001) -> TimestepSampler:
  """p_t proportional to sqrt(E[L_t^2]) over the last history_per_term losses at each t, with
  weights 1 / (T p_t)  [IDDPM sec. 3.3]; uniform until every t has a full history.

  The state is a `LossAwareState`; see `loss_aware_sample` and `loss_aware_update`.
  """

  def sample(key, state, batch_size):
    if state is None:
      raise ValueError('the loss-aware timestep sampler needs its state: pass '
                       'timestep_state=sampler.init() (then the updated one) to loss_fn')
    return loss_aware_sample(key, state, batch_size, uniform_prob)

  return TimestepSampler(
      init=lambda: loss_aware_init(num_timesteps, history_per_term),
      sample=sample, update=loss_aware_update)
