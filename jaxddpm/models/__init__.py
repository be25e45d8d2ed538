"""The U-Net and the glue from a run's ConfigDict to it.

The network is built from the typed `UNetConfig`, never from the ConfigDict,
so the model code does not depend on the config schema; `unet_config_from`
is the one place that reads `config.model`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxddpm.models.unet import UNet, UNetConfig

__all__ = ['UNet', 'UNetConfig', 'unet_config_from', 'create_model', 'init_params', 'make_model_fn']

LEARNED_VAR_TYPES = ('learned', 'learned_range')


def unet_config_from(config) -> UNetConfig:
  """UNetConfig from a run config (`config.model`, `config.data`, `config.diffusion`).

  Learned variances (`model_var_type` learned / learned_range, Nichol &
  Dhariwal 2021) double the output channels: [eps, v].
  """
  m = config.model
  channels = int(config.data.channels)
  out_channels = 2 * channels if config.diffusion.model_var_type in LEARNED_VAR_TYPES else channels
  return UNetConfig(
      image_size=int(config.data.image_size),
      in_channels=channels,
      out_channels=out_channels,
      ch=m.ch,
      ch_mult=m.ch_mult,
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions,
      dropout=m.dropout,
      num_classes=m.num_classes,
      class_dropout=m.class_dropout,
      num_heads=m.num_heads,
      num_head_channels=m.get('num_head_channels', 0),
      resblock_updown=m.resblock_updown,
      resamp_with_conv=m.resamp_with_conv,
      norm_groups=m.norm_groups,
      norm_eps=m.norm_eps,
      flip_sin_to_cos=m.get('flip_sin_to_cos', False),
      freq_shift=m.get('freq_shift', 1.0),
      downsample_padding=m.get('downsample_padding', 'same'),
      dtype=m.dtype,
      remat=m.remat,
  )


def create_model(config) -> UNet:
  """The U-Net of a run config."""
  return UNet(unet_config_from(config))


# For a top-level jit of an initialisation (jax.jit(..., compiler_options=...); JAX
# refuses them on a nested jit). Initialisation runs once: compiled with less LLVM
# optimisation it gives the same values, and XLA:CPU compiles it 2-4x faster (each
# parameter's threefry draw is a kernel of its own), while it runs a little longer.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.partial(jax.jit, static_argnames=('model', 'image_size', 'channels'))
def init_params(model: UNet, key, image_size: int, channels: int):
  """Freshly initialised float32 params of `model` for [1, image_size, image_size, channels] inputs.

  Jitted (equal models share the compiled init); use it under `jax.eval_shape`
  for shapes without allocating.
  """
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if model.config.num_classes > 0 else None
  return model.init(key, x, t, y)['params']


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _apply(model: UNet, params, x, t, y, dropout_rng, train: bool):
  """The U-Net's forward pass; jitted, so eager calls (a notebook) run compiled.

  Inside other jitted code it is inlined. Models are hashable, so equal models
  share the compiled function.
  """
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  return model.apply({'params': params}, x, t, y, train=train, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class _Apply:
  """The network's forward pass as a value: equal models give equal (hash-equal)
  functions, so compiled samplers and steps are reused across calls."""
  model: UNet
  train: bool

  def __call__(self, params, dropout_rng, x, t, y=None):
    return _apply(self.model, params, x, t, y, dropout_rng, train=self.train)


def make_model_fn(model: UNet, params, *, train: bool = False, dropout_rng=None) -> Partial:
  """model_fn(x, t, y=None) -> [B, H, W, out_channels]: the network as the diffusion math
  and the samplers see it.

  A `jax.tree_util.Partial` over (params, dropout_rng), so under jit the
  parameters are arguments, not constants compiled into the program. With
  train=True (dropout and label dropout on) a `dropout_rng` is required.
  """
  if train and dropout_rng is None:
    raise ValueError('make_model_fn(train=True) needs a dropout_rng')
  return Partial(_Apply(model, train), params, dropout_rng)
