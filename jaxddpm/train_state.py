"""The train state and the optimizer chain (DDPM Appendix B).

`TrainState` is everything training changes and a checkpoint holds;
`make_optimizer` is the Optax chain, clip -> Adam with the warmup schedule, which leaves the
parameters of frozen submodules (FROZEN_PREFIX, e.g. a pretrained CLIP text encoder) as they are;
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

# A top-level parameter subtree whose name starts with this is pretrained and frozen: the
# optimizer gives it no update and keeps no moments for it.
FROZEN_PREFIX = 'frozen_'


def _trainable_labels(params: PyTree) -> PyTree:
  """'frozen' for every leaf under a FROZEN_PREFIX top-level key, else 'train'."""
  return {k: jax.tree.map(lambda _, k=k: 'frozen' if k.startswith(FROZEN_PREFIX) else 'train', v)
          for k, v in params.items()}



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


def keep_frozen(tree: PyTree, params: PyTree) -> PyTree:
  """`tree` with its frozen top-level subtrees (FROZEN_PREFIX) taken from `params`."""
  return {k: params[k] if k.startswith(FROZEN_PREFIX) else v for k, v in tree.items()}


def has_frozen(config) -> bool:
  """Whether the run's model holds frozen pretrained parameters (a CLIP text encoder)."""
  text = config.model.get('text')
  return bool(text) and str(text.get('encoder', '')) == 'clip'


def make_optimizer(optim_config, *, frozen: bool = False) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> Adam(lr schedule) (AdamW when weight_decay > 0).

  With `frozen`, parameters under top-level names starting with FROZEN_PREFIX get zero
  updates and no moments; the model stops their gradients, so clipping sees only the rest.
  (Without it the state is the plain chain's, as every earlier checkpoint holds.)
  """
  tx = _trainable(optim_config)
  if not frozen:
    return tx
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, _trainable_labels)


def _trainable(optim_config) -> optax.GradientTransformation:
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


def create_train_state(config, model, key: jax.Array, params=None, *,
                       pretrained: dict[str, PyTree] | None = None) -> TrainState:
  """A fresh state: params from `models.init_params` (or the given ones, e.g. a
  distillation teacher's) with the top-level subtrees of `pretrained` put in (a frozen CLIP
  text encoder's weights; each must match the initialised subtree's shapes), EMA = params,
  step 0. Pure; jit it."""
  init_key, rng = jax.random.split(key)
  if params is None:
    params = models.init_params(model, init_key)
  if pretrained:
    params = dict(params)
    for name, subtree in pretrained.items():
      if name not in params:
        raise ValueError(f'pretrained parameters {name!r}: the model has no such submodule')
      expected = jax.tree.map(lambda a: a.shape, params[name])
      if jax.tree.map(lambda a: a.shape, subtree) != expected:
        raise ValueError(f'pretrained parameters {name!r} do not fit the model')
      params[name] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), subtree)
  tx = make_optimizer(config.optim, frozen=has_frozen(config))
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
