"""Objectives: the loss weightings against a float64 NumPy reference for every mean type, their
x-space consistency through the whole loss, the timestep samplers, and bitwise agreement with
the train step's loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
import toy_model
from jaxddpm.models import conditioning
from jaxddpm import diffusion
from jaxddpm import objectives
from jaxddpm import schedules
from jaxddpm import timesteps
from jaxddpm import train
from jaxddpm import train_state
from jaxddpm import factories

T = 100
GAMMA = 5.0
SCHEDULE_NAMES = ('linear', 'cosine')
# Indices at both ends (SNR ~ 1e4 .. 1e-8 for cosine) and across the middle.
T_INDEX = np.array([0, 1, 5, 20, 40, 60, 80, 98, 99], np.int32)


def reference_weights(name):
  """float64 {weighting: {mean_type: [T]}} from alphas_cumprod computed here.

  The reference writes each weighting's x-space weight lambda and converts it with the target's
  relation to x_0 (x_t = sqrt(abar) x + sqrt(1 - abar) eps, SNR = abar / (1 - abar)):
    eps - eps_hat = sqrt(SNR) (x_hat - x)          -> MSE_eps = SNR MSE_x0,
    v - v_hat = (x_hat - x) / sqrt(1 - abar)       -> MSE_v = (SNR + 1) MSE_x0,
  so the weight on MSE_target is lambda / SNR, lambda, lambda / (SNR + 1).
  """
  betas = schedules.get_betas(name, T)
  abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
  ratio = abar / (1.0 - abar)
  per_target = {'eps': ratio, 'x0': np.ones_like(ratio), 'v': ratio + 1.0}
  x_space = {'min_snr': np.minimum(ratio, GAMMA), 'truncated_snr': np.maximum(ratio, 1.0),
             'snr_plus_one': ratio + 1.0}
  ref = {w: {m: lam / per_target[m] for m in diffusion.MEAN_TYPES} for w, lam in x_space.items()}
  ref['uniform'] = {m: np.ones_like(ratio) for m in diffusion.MEAN_TYPES}
  return ref, ratio, per_target


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_weightings_match_float64_reference(name):
  schedule = schedules.make_schedule(name, T)
  ref, ratio, _ = reference_weights(name)
  t = jnp.arange(T, dtype=jnp.int32)
  np.testing.assert_allclose(objectives.snr(schedule, t), ratio, rtol=2e-6)
  for weighting in objectives.WEIGHTINGS:
    for mean_type in diffusion.MEAN_TYPES:
      got = objectives.loss_weight(schedule, t, model_mean_type=mean_type, weighting=weighting,
                                   min_snr_gamma=GAMMA)
      assert got.shape == (T,) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, ref[weighting][mean_type], rtol=2e-6,
                                 err_msg=f'{weighting} / {mean_type}')
    if weighting != 'uniform':
      np.testing.assert_allclose(objectives.x0_loss_weight(schedule, t, weighting, GAMMA),
                                 ref[weighting]['x0'], rtol=2e-6)


def test_reference_values_by_hand():
  # Spot checks of the table: at SNR = 1 (abar = 1/2) every SNR weighting is 1 on x0 and eps.
  ref, ratio, _ = reference_weights('linear')
  i = int(np.argmin(np.abs(ratio - 1.0)))
  assert abs(ratio[i] - 1.0) < 0.05
  np.testing.assert_allclose(ref['truncated_snr']['v'][i], max(ratio[i], 1) / (ratio[i] + 1))
  # Min-SNR on eps is min(1, gamma / SNR): 1 at low SNR, gamma / SNR at high SNR.
  assert ref['min_snr']['eps'][-1] == 1.0
  np.testing.assert_allclose(ref['min_snr']['eps'][0], GAMMA / ratio[0])


def test_min_snr_with_large_gamma_is_the_plain_snr_weight():
  schedule = schedules.make_schedule('cosine', T)
  t = jnp.arange(T, dtype=jnp.int32)
  _, ratio, _ = reference_weights('cosine')
  weight = lambda m: objectives.loss_weight(schedule, t, model_mean_type=m, weighting='min_snr',
                                            min_snr_gamma=1e30)
  # lambda = SNR: L_simple on eps, SNR on x0, SNR / (SNR + 1) = abar on v.
  np.testing.assert_array_equal(weight('eps'), np.ones(T, np.float32))
  np.testing.assert_allclose(weight('x0'), ratio, rtol=2e-6)
  np.testing.assert_allclose(weight('v'), ratio / (ratio + 1.0), rtol=2e-6)
  np.testing.assert_allclose(objectives.x0_loss_weight(schedule, t, 'min_snr', 1e30), ratio,
                             rtol=2e-6)


def test_min_snr_stays_finite_at_zero_snr():
  # The jsd schedule's last beta is 1, so abar_{T-1} = 0 and SNR = 0 there.
  schedule = schedules.make_schedule('jsd', 10)
  t = jnp.array([9], jnp.int32)
  assert float(objectives.snr(schedule, t)[0]) == 0.0
  got = {m: float(objectives.loss_weight(schedule, t, model_mean_type=m, weighting='min_snr')[0])
         for m in diffusion.MEAN_TYPES}
  assert got == {'eps': 1.0, 'x0': 0.0, 'v': 0.0}
  assert float(objectives.loss_weight(schedule, t, model_mean_type='v',
                                      weighting='truncated_snr')[0]) == 1.0


def test_bad_arguments_are_rejected():
  schedule = schedules.make_schedule('linear', T)
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match='weighting'):
    objectives.loss_weight(schedule, t, model_mean_type='eps', weighting='snr')
  with pytest.raises(ValueError, match='min_snr_gamma'):
    objectives.loss_weight(schedule, t, model_mean_type='eps', weighting='min_snr',
                           min_snr_gamma=0.0)
  with pytest.raises(ValueError, match='uniform'):
    objectives.x0_loss_weight(schedule, t, 'uniform')
  with pytest.raises(ValueError, match="'kl'"):
    objectives.denoising_objective(None, schedule, model_mean_type='eps',
                                   model_var_type='fixedlarge', loss_type='kl',
                                   weighting='min_snr')
  with pytest.raises(ValueError, match='model_mean_type'):
    objectives.denoising_objective(None, schedule, model_mean_type='score',
                                   model_var_type='fixedlarge', loss_type='mse')


# ---------------------------------------------------------------------------
# The whole loss.


def _fixed_timesteps(t):
  """A sampler that always draws the given t (weights 1): the sampler plug-in at its simplest."""
  t = jnp.asarray(t, jnp.int32)
  return timesteps.TimestepSampler(
      init=lambda: None, sample=lambda key, state, batch_size: (t, jnp.ones(t.shape)),
      update=lambda state, t, losses: state)


def _x_hat(x_t):
  """A fixed x_0 prediction, unrelated to x so that x - x_hat is of order one."""
  return 0.7 * jnp.tanh(x_t) - 0.1


def _prediction_fn(schedule, mean_type):
  """apply_fn predicting the eps / x0 / v that imply x_hat = _x_hat(x_t)."""

  def apply_fn(params, x_t, t, cond, key):
    del params, cond, key
    x_hat = _x_hat(x_t)
    if mean_type == 'x0':
      return x_hat
    eps_hat = diffusion.predict_eps_from_xstart(schedule, x_t, t, x_hat)
    return eps_hat if mean_type == 'eps' else diffusion.predict_v(schedule, x_hat, t, eps_hat)

  return apply_fn


def test_mean_types_give_the_same_x_space_loss():
  # One x_0 prediction, expressed as eps, x0 and v: for every SNR weighting the weighted losses
  # of the three targets are all lambda(t) * mean((x - x_hat)^2), computed here in float64.
  schedule = schedules.make_schedule('cosine', T)
  ref, _, _ = reference_weights('cosine')
  x = jax.random.uniform(jax.random.key(3), (len(T_INDEX), 4, 4, 2), minval=-1, maxval=1)
  key = jax.random.key(4)
  snr_weightings = [w for w in objectives.WEIGHTINGS if w != 'uniform']

  @jax.jit
  def all_losses(x, key):
    return {(w, m): objectives.denoising_objective(
        _prediction_fn(schedule, m), schedule, model_mean_type=m, model_var_type='fixedlarge',
        loss_type='mse', weighting=w, timestep_sampler=_fixed_timesteps(T_INDEX))(
            None, {'x': x, 'cond': {}}, key)
            for w in snr_weightings for m in diffusion.MEAN_TYPES}

  losses = all_losses(x, key)
  _, noise_key, _ = jax.random.split(key, 3)
  noise = np.asarray(jax.random.normal(noise_key, x.shape, jnp.float32), np.float64)
  abar = np.cumprod(1.0 - schedules.get_betas('cosine', T))[T_INDEX][:, None, None, None]
  x_t = np.sqrt(abar) * np.asarray(x, np.float64) + np.sqrt(1.0 - abar) * noise
  x_hat = np.asarray(_x_hat(jnp.asarray(x_t, jnp.float32)), np.float64)
  x_mse = np.mean(np.square(np.asarray(x, np.float64) - x_hat), axis=(1, 2, 3))
  for (weighting, mean_type), (loss, metrics) in losses.items():
    expected = ref[weighting]['x0'][T_INDEX] * x_mse
    np.testing.assert_array_equal(metrics['_t'], T_INDEX)
    # rtol: at t = 99 (SNR ~ 1e-8) the eps implied by x_hat differs from the noise by only
    # ~1e-4 of its size, so its float32 rounding costs ~1e-3 of the eps error (test-side).
    np.testing.assert_allclose(metrics['_loss'], expected, rtol=1e-3,
                               err_msg=f'{weighting} / {mean_type}')
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-4)


def test_weighting_scales_only_the_mse_term_of_hybrid():
  schedule = schedules.make_schedule('linear', T)
  x = jax.random.uniform(jax.random.key(5), (len(T_INDEX), 4, 4, 1), minval=-1, maxval=1)
  t = jnp.asarray(T_INDEX)

  def apply_fn(params, x_t, t, cond, key):
    del cond, key
    return jnp.concatenate([params * x_t, jnp.tanh(x_t)], axis=-1)  # learned_range output

  types = dict(model_mean_type='v', model_var_type='learned_range', loss_type='hybrid')

  @jax.jit
  def run(x, key):
    metrics = {w: objectives.denoising_objective(
        apply_fn, schedule, weighting=w, timestep_sampler=_fixed_timesteps(T_INDEX), **types)(
            0.3, {'x': x, 'cond': {}}, key)[1] for w in ('uniform', 'min_snr')}
    noise = jax.random.normal(jax.random.split(key, 3)[1], x.shape)
    terms = objectives.training_losses(lambda x_t, t, c: apply_fn(0.3, x_t, t, c, None), schedule,
                                      x, t, noise, **types)
    return metrics, terms

  metrics, terms = run(x, jax.random.key(6))
  plain, minsnr = metrics['uniform'], metrics['min_snr']
  # The metrics report the unweighted MSE and VLB terms; the weight multiplies the MSE only.
  np.testing.assert_array_equal(minsnr['mse'], plain['mse'])
  np.testing.assert_array_equal(minsnr['vb'], plain['vb'])
  np.testing.assert_allclose(plain['_loss'], terms['loss'], rtol=1e-6)
  w = objectives.loss_weight(schedule, t, model_mean_type='v', weighting='min_snr')
  np.testing.assert_allclose(minsnr['_loss'], w * terms['mse'] + 0.001 * T * terms['vb'],
                             rtol=1e-6)
  assert not np.allclose(minsnr['_loss'], plain['_loss'])


def test_loss_fn_is_jitted_once_and_differentiable():
  schedule = schedules.make_schedule('linear', T)
  loss_fn = objectives.denoising_objective(
      lambda params, x_t, t, cond, key: params['a'] * x_t, schedule, model_mean_type='eps',
      model_var_type='fixedlarge', loss_type='mse', weighting='min_snr')

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grad_fn(params, batch, key):
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)

  params = {'a': jnp.float32(0.5)}
  batch = {'x': jnp.ones((4, 2, 2, 1)), 'cond': {}}
  for step in range(3):
    (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(jax.random.key(0), step))
    assert metrics['loss'] == loss and np.isfinite(grads['a'])
    assert set(metrics) == {'loss', 'mse', '_t', '_loss'}
    assert metrics['_t'].shape == metrics['_loss'].shape == (4,)


# ---------------------------------------------------------------------------
# Loss-aware timesteps.


def _warm_loss_aware_state(seed=0):
  """A full history with losses growing in t, so p_t is far from uniform."""
  state = timesteps.loss_aware_init(T)
  losses = np.linspace(0.1, 3.0, T)[:, None] * np.random.default_rng(seed).uniform(
      0.5, 1.5, (T, state.loss_history.shape[1]))
  return state.replace(loss_history=jnp.asarray(losses, jnp.float32),
                       loss_counts=jnp.full((T,), state.loss_history.shape[1], jnp.int32))


def test_loss_aware_sampler_weights_and_update():
  schedule = schedules.make_schedule('linear', T)
  sampler = timesteps.loss_aware_timesteps(T)
  loss_fn = objectives.denoising_objective(
      lambda params, x_t, t, cond, key: params * x_t, schedule, model_mean_type='eps',
      model_var_type='fixedlarge', loss_type='mse', weighting='truncated_snr',
      timestep_sampler=sampler)
  x = jax.random.uniform(jax.random.key(7), (16, 2, 2, 1), minval=-1, maxval=1)
  state = _warm_loss_aware_state()
  key = jax.random.key(8)
  loss, metrics = jax.jit(loss_fn)(0.5, {'x': x, 'cond': {}}, key, state)

  t_key = jax.random.split(key, 3)[0]
  t_ref, importance = timesteps.loss_aware_sample(t_key, state, 16)
  np.testing.assert_array_equal(metrics['_t'], t_ref)
  # _loss is the weighted per-example loss before the importance weights: eps-MSE of the
  # prediction 0.5 x_t, times max(1, 1 / SNR) (truncated SNR on eps).
  ref, _, _ = reference_weights('linear')
  abar = np.cumprod(1.0 - schedules.get_betas('linear', T))[np.asarray(t_ref)][:, None, None, None]
  noise = np.asarray(jax.random.normal(jax.random.split(key, 3)[1], x.shape), np.float64)
  x_t = np.sqrt(abar) * np.asarray(x, np.float64) + np.sqrt(1.0 - abar) * noise
  eps_mse = np.mean(np.square(noise - 0.5 * x_t), axis=(1, 2, 3))
  np.testing.assert_allclose(metrics['_loss'], ref['truncated_snr']['eps'][np.asarray(t_ref)]
                             * eps_mse, rtol=1e-5)
  # loss = mean_i (1 / (T p_{t_i})) L_i, the importance-weighted estimate [IDDPM sec. 3.3].
  probs = np.asarray(timesteps.loss_aware_probs(state), np.float64)
  np.testing.assert_allclose(importance, 1.0 / (T * probs[np.asarray(t_ref)]), rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(importance * metrics['_loss']), rtol=1e-6)
  assert np.ptp(importance) > 0.5  # the weights matter here

  # The update appends each (t_i, L_i): the newest slot of row t holds the last L_i with t_i = t.
  update = jax.jit(sampler.update)
  new = update(state, metrics['_t'], metrics['_loss'])
  t_seen = np.asarray(metrics['_t'])
  for ti in np.unique(t_seen):
    last = np.asarray(metrics['_loss'])[np.flatnonzero(t_seen == ti)[-1]]
    assert float(new.loss_history[ti, -1]) == float(last)
  np.testing.assert_array_equal(new.loss_counts, state.loss_counts)  # full histories stay full

  fresh = sampler.init()
  assert int(fresh.loss_counts.sum()) == 0
  updated = update(fresh, metrics['_t'], metrics['_loss'])
  assert int(updated.loss_counts.sum()) == 16
  with pytest.raises(ValueError, match='timestep_state'):
    loss_fn(0.5, {'x': x, 'cond': {}}, key)


# ---------------------------------------------------------------------------
# Bitwise agreement with today's train step.


def _generic_step(loss_fn, sampler, tx, ema_decay):
  """One optimizer step that knows nothing of the objective: the shape of the train step."""

  def step(state, batch):
    key = jax.random.fold_in(state.rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, state.timestep_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    timestep_state = sampler.update(state.timestep_state, metrics['_t'], metrics['_loss'])
    metrics = {k: v for k, v in metrics.items() if not k.startswith('_')}
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                         opt_state=opt_state, timestep_state=timestep_state), metrics

  return step


@pytest.mark.parametrize('mean_type,var_type,loss_type,sampler', [
    ('eps', 'fixedlarge', 'mse', 'uniform'),
    ('v', 'learned_range', 'hybrid', 'loss_aware'),
])
def test_uniform_weighting_reproduces_the_train_step_bitwise(mean_type, var_type, loss_type,
                                                             sampler):
  config = tiny.get_config()
  config.diffusion.update(model_mean_type=mean_type, model_var_type=var_type,
                          loss_type=loss_type, timestep_sampler=sampler)
  model = toy_model.ToyModel(toy_model.ToyConfig(
      out_channels=diffusion.model_output_channels(1, var_type)))
  schedule = factories.schedule(config)
  state = train_state.create_train_state(config, model, jax.random.PRNGKey(0))
  if sampler == 'loss_aware':
    state = state.replace(timestep_state=_warm_loss_aware_state())
  state = state.replace(step=jnp.asarray(3, jnp.int32))
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 4, 4, 1), minval=-1, maxval=1)
  want_state, want = jax.jit(train.make_train_step(config, model, schedule))(
      state, {'x': x[None]})

  def apply_fn(params, x_t, t, cond, key):
    assert cond == {}
    return model.apply({'params': params}, x_t, t, cond, train=True, rngs={'dropout': key})

  timestep_sampler = (timesteps.loss_aware_timesteps(T) if sampler == 'loss_aware'
                      else timesteps.uniform_timesteps(T))
  loss_fn = objectives.denoising_objective(
      apply_fn, schedule, model_mean_type=mean_type, model_var_type=var_type,
      loss_type=loss_type, timestep_sampler=timestep_sampler)
  # The same program structure as the train step: XLA may fuse a lone loss_fn differently,
  # which can move the loss or the mean VLB term by an ulp.
  step = _generic_step(loss_fn, timestep_sampler, train_state.make_optimizer(config.optim),
                       float(config.optim.ema_decay))
  got_state, got = jax.jit(step)(state, {'x': x, 'cond': {}})
  assert set(got) == {'loss', 'mse', 'grad_norm'} | ({'vb'} if 'vb' in want else set())
  for name, value in got.items():
    assert value.dtype == want[name].dtype
    assert value == want[name][0], (name, float(value), float(want[name][0]))
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_conditioning_dropout_follows_the_spec():
  """The objective nulls labels with the spec's rate from fold_in(key, 3) (classifier-free
  guidance training); the network never sees the dropped labels."""
  schedule = schedules.make_schedule('linear', T, beta_start=1e-4, beta_end=0.02)

  def apply_fn(params, x_t, t, cond, key):
    del t, key
    return params * x_t + 0.1 * cond['label'].astype(jnp.float32)[:, None, None, None]

  x = jax.random.uniform(jax.random.key(1), (6, 4, 4, 1), minval=-1, maxval=1)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  key = jax.random.key(7)
  types = dict(model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse')
  spec = {'label': conditioning.Label(3, dropout=0.5)}
  loss = objectives.denoising_objective(apply_fn, schedule, cond_spec=spec, **types)
  plain = objectives.denoising_objective(apply_fn, schedule, **types)
  got = loss(0.3, {'x': x, 'cond': {'label': labels}}, key)[0]
  dropped = conditioning.drop({'label': labels}, spec, jax.random.fold_in(key, 3))
  assert 0 < int(jnp.sum(dropped['label'] == 3)) < 6
  assert got == plain(0.3, {'x': x, 'cond': dropped}, key)[0]
  assert got != plain(0.3, {'x': x, 'cond': {'label': labels}}, key)[0]
