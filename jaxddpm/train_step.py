"""The pure train step: `steps_per_call` optimizer steps of any objective in one `lax.scan`.

Per step k (DDPM Algorithm 1, Ho et al. 2020, for the denoising objective):

  t ~ Uniform{0..T-1} (or IDDPM's importance sampling), eps ~ N(0, I),
  loss = mean_b w(t_b) L(x_0, t, eps)  (`objectives.denoising_objective`: L_simple,
    L_vlb or hybrid, weighted uniformly, by Min-SNR-gamma or by an SNR weighting),
  g = clip_by_global_norm(grad loss),  params <- Adam(g, lr_k),
  lr_k = lr * min(1, k / warmup_steps)  (Appendix B: linear warmup),
  ema <- decay * ema + (1 - decay) * params  (`optax.incremental_update`).

All randomness of step k comes from fold_in(state.rng, k), so a run resumed
from a checkpoint reproduces the uninterrupted run bit for bit, and the same
run on 1 or N devices agrees to float32 rounding (threefry draws do not depend
on the sharding). The training loop (`jaxddpm.train`) jit-compiles the step
once per run over a mesh of every device of every process, the batch sharded
on 'data', the state replicated and donated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxddpm import timesteps
from jaxddpm import train_state


def make_generic_train_step(loss_fn, optim_config, *,
                            timestep_sampler: timesteps.TimestepSampler | None = None,
                            frozen: bool = False) -> Callable:
  """Returns train_steps(state, batches) -> (state, metrics), pure and jit-able, for any
  objective `loss_fn(params, batch, key, timestep_state) -> (loss, metrics)`.

  Per step k (DDPM Algorithm 1 for the denoising objective):
    key = fold_in(state.rng, k), (loss, metrics), g = value_and_grad(loss_fn)(params, batch, key),
    g = clip_by_global_norm(g), params <- Adam(g, lr_k), ema <- decay ema + (1 - decay) params
  and the timestep sampler's state is updated with the step's per-example losses.

  Args of the returned function:
    state: train_state.TrainState.
    batches: {'x': float32 [k, B, ...] in [-1, 1], 'cond': {key: [k, B, ...]}} (the
      conditioning pytree, e.g. {'label': int32 [k, B]}; {} when unconditional): the
      batches of k consecutive steps.

  Returns:
    The state after k steps, and metrics: dict of float32 [k] (the objective's scalar metrics,
    e.g. loss, mse and vb; grad_norm, lr, and finite: 1 when the loss, the gradient norm and the
    updated parameters are all finite), one entry per step.
  `frozen`: the model holds frozen pretrained parameters (`train_state.make_optimizer`).
  """
  tx = train_state.make_optimizer(optim_config, frozen=frozen)
  lr_schedule = train_state.learning_rate_schedule(optim_config)
  ema_decay = float(optim_config.ema_decay)

  def one_step(state: train_state.TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, state.timestep_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    if frozen:  # the average of a constant is that constant, without rounding
      ema_params = train_state.keep_frozen(ema_params, params)
    timestep_state = state.timestep_state
    if timestep_sampler is not None and timestep_state is not None:
      timestep_state = timestep_sampler.update(timestep_state, aux['_t'], aux['_loss'])
    grad_norm = optax.tree.norm(grads)
    # The loss of step k is computed before its update, so a bad update shows only in the
    # new parameters; `finite` lets the loop refuse to save (or continue from) such a state.
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {k: v for k, v in aux.items() if not k.startswith('_')}
    metrics.update(
        grad_norm=grad_norm,
        lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
        finite=(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite).astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, timestep_state=timestep_state)
    return new_state, metrics

  def train_steps(state: train_state.TrainState, batches):
    if jax.tree.leaves(batches)[0].shape[0] == 1:
      # A single step needs no loop.
      state, metrics = one_step(state, jax.tree.map(lambda b: b[0], batches))
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(one_step, state, batches)

  return train_steps


def make_teacher_train_step(loss_fn, optim_config) -> Callable:
  """train_steps(state, batches, teacher_params) for an objective with a frozen teacher,
  loss_fn(params, teacher_params, batch, key) -> (loss, metrics) (progressive distillation):
  `make_generic_train_step` with the teacher's parameters bound, so they are an argument
  of the compiled step, not a constant of it."""
  def train_steps(state: train_state.TrainState, batches, teacher_params):
    bound = lambda params, batch, key, _: loss_fn(params, teacher_params, batch, key)
    return make_generic_train_step(bound, optim_config)(state, batches)

  return train_steps
