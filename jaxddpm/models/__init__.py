"""Denoisers: the model registry, initialisation, and the one model adapter.

A denoiser is a Flax Module built from a typed, frozen config dataclass (never
from a ConfigDict; `jaxddpm.factories` translates those) and registered under a
name, `config.model.name` in a run's config. Its config provides
`cond_spec()` (the conditioning keys it reads, `jaxddpm.models.conditioning`) and
`example_inputs(batch)`; the module is called as
`module.apply({'params': p}, x, t, cond, train=..., rngs={'dropout': key})`.
Nothing outside this package knows which network runs.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
from jax.tree_util import Partial

from jaxddpm.models.classifier import ClassifierConfig, NoisyClassifier
from jaxddpm.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from jaxddpm.models.text import TextConfig
from jaxddpm.models.unet import UNet, UNetConfig

__all__ = ['ClassifierConfig', 'CLIPTextConfig', 'CLIPTextTransformer', 'NoisyClassifier',
           'TextConfig', 'UNet', 'UNetConfig', 'register', 'model_names', 'config_class',
           'create', 'init_params', 'make_model_fn']


@dataclasses.dataclass(frozen=True)
class _Entry:
  config_class: type
  module_class: type


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, config_class: type, module_class: type) -> None:
  """Adds a denoiser: `module_class(config)` with `config` a `config_class` instance."""
  if name in _REGISTRY:
    raise ValueError(f'model {name!r} is already registered')
  _REGISTRY[name] = _Entry(config_class, module_class)


def model_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(f'unknown model {name!r}; registered models: {list(_REGISTRY)}')
  return _REGISTRY[name]


def config_class(name: str) -> type:
  """The typed config dataclass of model `name`."""
  return _entry(name).config_class


def create(name: str, model_config) -> nn.Module:
  """The Flax Module of model `name` built from its typed config."""
  entry = _entry(name)
  if not isinstance(model_config, entry.config_class):
    raise TypeError(f'model {name!r} takes a {entry.config_class.__name__}, '
                    f'got {type(model_config).__name__}')
  return entry.module_class(model_config)


register('unet', UNetConfig, UNet)
register('noisy_classifier', ClassifierConfig, NoisyClassifier)


# For a top-level jit of an initialisation (jax.jit(..., compiler_options=...); JAX
# refuses them on a nested jit). Initialisation runs once: compiled with less LLVM
# optimisation it gives the same values, and XLA:CPU compiles it 2-4x faster (each
# parameter's threefry draw is a kernel of its own), while it runs a little longer.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.partial(jax.jit, static_argnames=('model',))
def init_params(model: nn.Module, key):
  """Freshly initialised float32 params of `model` for its config's `example_inputs(1)`.

  Jitted (equal models share the compiled init); use it under `jax.eval_shape`
  for shapes without allocating.
  """
  x, t, cond = model.config.example_inputs(1)
  return model.init(key, x, t, cond)['params']


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _apply(model: nn.Module, params, x, t, cond, dropout_rng, train: bool):
  """The network's forward pass; jitted, so eager calls (a notebook) run compiled.

  Inside other jitted code it is inlined. Models are hashable, so equal models
  share the compiled function.
  """
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  return model.apply({'params': params}, x, t, cond, train=train, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class _Apply:
  """The network's forward pass as a value: equal models give equal (hash-equal)
  functions, so compiled solvers and steps are reused across calls."""
  model: nn.Module
  train: bool

  def __call__(self, params, dropout_rng, x, t, cond=None):
    return _apply(self.model, params, x, t, {} if cond is None else cond, dropout_rng,
                  train=self.train)


def make_model_fn(model: nn.Module, params, *, train: bool = False, dropout_rng=None) -> Partial:
  """model_fn(x, t, cond={}) -> [B, ..., out_channels]: the network as the diffusion math,
  the objectives and the solvers see it (`cond` the conditioning pytree).

  A `jax.tree_util.Partial` over (params, dropout_rng), so under jit the
  parameters are arguments, not constants compiled into the program. With
  train=True (dropout on) a `dropout_rng` is required.
  """
  if train and dropout_rng is None:
    raise ValueError('make_model_fn(train=True) needs a dropout_rng')
  return Partial(_Apply(model, train), params, dropout_rng)
