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
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxddpm.models.classifier import ClassifierConfig, NoisyClassifier
from jaxddpm.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from jaxddpm.models.text import TextConfig
from jaxddpm.models.unet import UNet, UNetConfig

__all__ = ['ClassifierConfig', 'CLIPTextConfig', 'CLIPTextTransformer', 'NoisyClassifier',
           'TextConfig', 'UNet', 'UNetConfig', 'register', 'model_names', 'config_class',
           'create', 'init_params', 'make_model_fn', 'make_energy_fn', 'is_energy']


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


def _energy(model: nn.Module, params, x, t, cond, dropout_rng, train: bool):
  """E_theta(x, t) = 1/2 ||x + f_theta(x, t)||^2 per example, [B] float32 (`make_energy_fn`)."""
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  f = model.apply({'params': params}, x, t, cond, train=train, rngs=rngs)
  return 0.5 * jnp.sum(jnp.square(x + f).reshape(x.shape[0], -1), axis=-1)


def is_energy(model: nn.Module) -> bool:
  """Whether the denoiser is energy-parameterised (its config's `energy` field)."""
  return bool(getattr(model.config, 'energy', False))


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _apply(model: nn.Module, params, x, t, cond, dropout_rng, train: bool):
  """The network's forward pass; jitted, so eager calls (a notebook) run compiled.

  Inside other jitted code it is inlined. Models are hashable, so equal models
  share the compiled function. An energy-parameterised model returns grad_x E_theta
  (`make_energy_fn`), its eps prediction.
  """
  if is_energy(model):
    total = lambda x: jnp.sum(_energy(model, params, x, t, cond, dropout_rng, train))
    return jax.grad(total)(jnp.asarray(x, jnp.float32))
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  return model.apply({'params': params}, x, t, cond, train=train, rngs=rngs)


@functools.partial(jax.jit, static_argnames=('model',))
def _apply_energy(model: nn.Module, params, x, t, cond):
  return _energy(model, params, jnp.asarray(x, jnp.float32), t, cond, None, False)


@dataclasses.dataclass(frozen=True)
class _Energy:
  model: nn.Module

  def __call__(self, params, x, t, cond=None):
    return _apply_energy(self.model, params, x, t, {} if cond is None else cond)


def make_energy_fn(model: nn.Module, params) -> Partial:
  """energy_fn(x, t, cond={}) -> [B]: the scalar energy of an energy-parameterised denoiser.

    E_theta(x, t) = 1/2 ||x + f_theta(x, t)||^2,   eps_theta(x, t) = grad_x E_theta(x, t),

  f_theta the network (`UNetConfig.energy`), so the score is -grad_x E_theta / sigma_t and
  log p_t(x) = -E_theta(x, t) / sigma_t + const: a Metropolis-adjusted corrector can weigh a
  proposal (`solvers.correctors`, 'mala' / 'mhmc'; Du et al. 2023, sec. 3.3). The form is
  Salimans & Ho 2021's "energy as the squared norm of a vector field", shifted by x so that
  the zero-initialised output layer starts at eps = x, the exact eps of N(0, I) data, with a
  nonzero gradient for training (1/2 ||f||^2 has none at f = 0).

  Raises:
    ValueError: a model that is not energy-parameterised.
  """
  if not is_energy(model):
    raise ValueError('make_energy_fn needs an energy-parameterised model (model.energy = True)')
  return Partial(_Energy(model), params)


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
