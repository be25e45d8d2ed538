"""The train state and the optimizer chain (DDPM Appendix B).

`TrainState` is everything training changes and a checkpoint holds;
`make_optimizer` is the Optax chain, clip -> Adam with the warmup schedule;
`create_train_state` makes a fresh state from a config and a model.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxddpm import models
from jaxddpm import timesteps

PyTree = Any



@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpointed as a whole.

  step: int32 scalar, optimizer steps taken.
  params: float32 U-Net parameters (the Flax 'params' collection).
  ema_params: exponential moving average of params (used for sampling).
  opt_state: the optax state (clip has none; Adam moments; schedule count).
  rng: uint32 [2] base key; step k uses fold_in(rng, k).
  timestep_state: `timesteps.LossAwareState` for importance-sampled t
    (diffusion.timestep_sampler='loss_aware'), else None.
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  timestep_state: timesteps.LossAwareState | None = None


def learning_rate_schedule(optim_config) -> optax.Schedule:
  """lr_k = lr * min(1, k / warmup_steps): DDPM's linear warmup, then constant; with
  optim.decay_steps = D > 0, annealed linearly from lr after the warmup to 0 at step D
  (progressive distillation's rounds, Salimans & Ho 2022 sec. 4)."""
  lr = float(optim_config.lr)
  warmup = int(optim_config.warmup_steps)
  decay = int(optim_config.get('decay_steps', 0))
  rising = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else None
  if decay <= 0:
    return rising or optax.constant_schedule(lr)
  falling = optax.linear_schedule(lr, 0.0, max(decay - warmup, 1))
  return falling if rising is None else optax.join_schedules([rising, falling], [warmup])


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> Adam(lr schedule) (AdamW when weight_decay > 0)."""
  lr = learning_rate_schedule(optim_config)
  adam_kwargs = dict(b1=float(optim_config.beta1), b2=float(optim_config.beta2),
                     eps=float(optim_config.eps))
  if float(optim_config.weight_decay) > 0:
    opt = optax.adamw(lr, weight_decay=float(optim_config.weight_decay), **adam_kwargs)
  else:
    opt = optax.adam(lr, **adam_kwargs)
  if float(optim_config.grad_clip) > 0:
    return optax.chain(optax.clip_by_global_norm(float(optim_config.grad_clip)), opt)
  return opt


def create_train_state(config, model, key: jax.Array, params=None) -> TrainState:
  """A fresh state: params from `models.init_params` (or the given ones, e.g. a
  distillation teacher's), EMA = params, step 0. Pure; jit it."""
  init_key, rng = jax.random.split(key)
  if params is None:
    params = models.init_params(model, init_key)
  tx = make_optimizer(config.optim)
  timestep_state = None
  if config.diffusion.timestep_sampler == 'loss_aware':
    timestep_state = timesteps.loss_aware_timesteps(int(config.diffusion.num_timesteps)).init()
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=rng,
      timestep_state=timestep_state)
