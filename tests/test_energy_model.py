"""The energy-parameterised U-Net: eps = grad_x E, E = 1/2 ||x + f||^2, its start at the exact
eps of N(0, I) data, its training through the gradient, and its config checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from jaxddpm import config_utils
from jaxddpm import factories
from jaxddpm import models
from jaxddpm import train_state
from jaxddpm import train_step


def energy_config():
  config = tiny.get_config()
  config.model.energy = True
  config.model.ch = 8
  config.model.norm_groups = 4
  return config


def test_eps_is_the_gradient_of_the_energy():
  config = energy_config()
  model = factories.create_model(config)
  params = models.init_params(model, jax.random.key(0))
  # Perturb every weight (the output layer starts at zero) so f and its Jacobian matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
  t = jnp.array([0, 40, 99])
  energy_fn = models.make_energy_fn(model, params)
  eps = models.make_model_fn(model, params)(x, t)
  grad = jax.grad(lambda x: jnp.sum(energy_fn(x, t)))(x)
  np.testing.assert_allclose(eps, grad, rtol=1e-5, atol=1e-6)
  f = model.apply({'params': params}, x, t, {})
  np.testing.assert_allclose(energy_fn(x, t), 0.5 * np.sum(np.square(np.asarray(x + f,
                             np.float64)).reshape(3, -1), -1), rtol=1e-5)


def test_a_fresh_energy_model_predicts_eps_x_and_learns():
  """The zero-initialised output layer gives E = |x|^2 / 2, eps = x; the denoising loss then
  trains through grad_x E (second derivatives) to finite, falling values."""
  config = energy_config()
  config.optim.warmup_steps = 1
  model = factories.create_model(config)
  state = train_state.create_train_state(config, model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  eps = models.make_model_fn(model, state.params)(x, jnp.array([5, 50]))
  np.testing.assert_allclose(eps, x, rtol=1e-4, atol=1e-4)
  loss_fn, sampler = factories.objective(config, model, factories.schedule(config))
  steps = jax.jit(train_step.make_generic_train_step(loss_fn, config.optim,
                                                     timestep_sampler=sampler))
  data = np.random.default_rng(0).uniform(-1, 1, (30, 16, 8, 8, 1)).astype(np.float32) * 0.1
  state, metrics = steps(state, {'x': data, 'cond': {}})
  loss = np.asarray(metrics['loss'])
  assert np.all(np.isfinite(loss)) and np.all(np.asarray(metrics['grad_norm']) > 0)
  assert loss[-10:].mean() < loss[:5].mean()


def test_energy_needs_eps_and_a_fixed_variance():
  config = energy_config()
  config_utils.validate_config(config)
  for field, value in (('model_mean_type', 'v'), ('model_var_type', 'learned_range')):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.diffusion[field] = value
    with pytest.raises(ValueError, match='energy'):
      config_utils.validate_config(bad)
  with pytest.raises(ValueError, match='energy-parameterised'):
    models.make_energy_fn(factories.create_model(tiny.get_config()), {})
