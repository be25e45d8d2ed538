"""The noisy classifier: its attention pooling and objective against float64 NumPy, its
training on noised data, the training loop's run, and its config checks."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits_classifier
from jaxddpm import config_utils
from jaxddpm import diffusion
from jaxddpm import factories
from jaxddpm import models
from jaxddpm import objectives
from jaxddpm import schedules
from jaxddpm import train
from jaxddpm import train_state
from jaxddpm import train_step
from jaxddpm.models import classifier as classifier_lib


def tiny_classifier_config():
  config = digits_classifier.get_config()
  config.data.image_size = 8
  config.data.num_workers = 0
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.norm_groups = 4
  config.model.pool_head_channels = 8
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 16
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 4
  config.training.eval_every = 4
  config.sampling.batch_size = 128
  return config


def test_attention_pool_matches_a_float64_derivation():
  b, h, w, c, heads, k = 2, 3, 3, 8, 2, 5
  x = np.random.default_rng(0).standard_normal((b, h, w, c)).astype(np.float32)
  pool = classifier_lib.AttentionPool(k, c // heads)
  params = pool.init(jax.random.key(1), jnp.asarray(x))['params']
  got = np.asarray(pool.apply({'params': params}, jnp.asarray(x)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = x.reshape(b, h * w, c).astype(np.float64)
  tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], 1) + p['positional_embedding']
  dense = lambda v, name: v @ p[name]['kernel'] + p[name]['bias']
  d = c // heads
  q = dense(tokens[:, :1], 'q').reshape(b, 1, heads, d)
  key, val = (dense(tokens, n).reshape(b, -1, heads, d) for n in ('k', 'v'))
  logits = np.einsum('bihd,bjhd->bhij', q, key) / np.sqrt(d)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  pooled = np.einsum('bhij,bjhd->bihd', weights, val).reshape(b, c)
  want = dense(pooled, 'proj_out')
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_objective_is_the_cross_entropy_at_x_t():
  """Against NumPy: x_t from the documented key split, logits of a linear classifier."""
  schedule = schedules.make_schedule('linear', 50)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  weight = rng.standard_normal((16, 3)).astype(np.float32)

  def apply_fn(params, x_t, t, cond, key):
    del key
    assert cond == {}
    return x_t.reshape(x_t.shape[0], -1) @ params + 0.01 * t[:, None]

  loss_fn = objectives.classifier_objective(apply_fn, schedule)
  key = jax.random.key(3)
  loss, metrics = jax.jit(loss_fn)(jnp.asarray(weight), {'x': x, 'cond': {'label': y}}, key)
  t_key, noise_key, _ = jax.random.split(key, 3)
  t = np.asarray(jax.random.randint(t_key, (6,), 0, 50))
  np.testing.assert_array_equal(np.asarray(metrics['_t']), t)
  noise = np.asarray(jax.random.normal(noise_key, x.shape, jnp.float32), np.float64)
  abar = np.asarray(schedule.alphas_cumprod64)[t][:, None, None, None]
  x_t = np.sqrt(abar) * x + np.sqrt(1 - abar) * noise
  logits = x_t.reshape(6, -1) @ weight.astype(np.float64) + 0.01 * t[:, None]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -log_p[np.arange(6), y]
  np.testing.assert_allclose(np.asarray(metrics['_loss']), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5)
  assert float(metrics['accuracy']) == pytest.approx(np.mean(logits.argmax(-1) == y), abs=1e-7)


def test_a_missing_label_is_a_clear_error():
  loss_fn = objectives.classifier_objective(lambda *a: None, schedules.make_schedule('linear', 10))
  with pytest.raises(ValueError, match='label'):
    loss_fn(None, {'x': jnp.zeros((2, 4, 4, 1)), 'cond': {}}, jax.random.key(0))


def test_the_network_learns_labels_that_survive_the_noise():
  """Two classes, images at -0.5 or +0.5: after 150 steps the classifier reads them at low
  noise, and at the last timestep (SNR 2e-5) it is at chance."""
  config = tiny_classifier_config()
  config.diffusion.num_timesteps = 1000
  config.model.dropout = 0.0
  config.model.num_classes = 2
  config.optim.warmup_steps = 10
  model = factories.create_model(config)
  schedule = factories.schedule(config)
  loss_fn, sampler = factories.objective(config, model, schedule)
  steps = jax.jit(train_step.make_generic_train_step(loss_fn, config.optim,
                                                     timestep_sampler=sampler))
  state = train_state.create_train_state(config, model, jax.random.key(0))
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, (150, 32)).astype(np.int32)
  x = np.broadcast_to(((y - 0.5))[..., None, None, None], (150, 32, 8, 8, 1)).astype(np.float32)
  state, metrics = steps(state, {'x': x, 'cond': {'label': y}})
  assert np.all(np.isfinite(np.asarray(metrics['loss'])))
  classify = models.make_model_fn(model, state.params)
  test_y = np.arange(200) % 2
  test_x = np.broadcast_to((test_y - 0.5)[:, None, None, None], (200, 8, 8, 1)).astype(np.float32)
  noise = jax.random.normal(jax.random.key(9), test_x.shape)
  for t, low, high in ((100, 0.95, 1.0), (999, 0.3, 0.7)):
    tt = jnp.full((200,), t, jnp.int32)
    x_t = diffusion.q_sample(schedule, jnp.asarray(test_x), tt, noise)
    accuracy = float(np.mean(np.argmax(np.asarray(classify(x_t, tt)), -1) == test_y))
    assert low <= accuracy <= high, (t, accuracy)


def test_config_checks():
  config = tiny_classifier_config()
  config_utils.validate_config(config)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.model.num_classes = 0
  with pytest.raises(ValueError, match='num_classes'):
    config_utils.validate_config(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.training.sample_every = 100
  with pytest.raises(ValueError, match='sample_every'):
    config_utils.validate_config(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.model.pool = 'max'
  with pytest.raises(ValueError, match='pool'):
    config_utils.validate_config(bad)


@pytest.fixture(scope='module')
def classifier_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('clf') / 'run')
  summary = train.train_and_evaluate(tiny_classifier_config(), workdir)
  assert summary['step'] == 4 and summary['train_step_traces'] == 1
  return workdir


def test_the_training_loop_trains_and_evaluates_a_classifier(classifier_run):
  with open(os.path.join(classifier_run, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert all('accuracy' in r for r in rows if 'loss' in r)
  evals = [r for r in rows if 'eval/accuracy_t0' in r]
  assert len(evals) == 1 and evals[0]['step'] == 4
  assert {f'eval/accuracy_t{t}' for t in (0, 25, 50, 74, 89)} <= set(evals[0])
  assert not os.path.exists(os.path.join(classifier_run, 'samples'))
