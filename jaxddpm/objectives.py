"""Training objectives: per-example losses, loss weightings and the denoising loss factory.

An objective is `loss_fn(params, batch, key, timestep_state=None) -> (loss, metrics)`, a pure
function of the parameters, one batch `{'x': [B, ...], 'cond': {...}}` and the step's key; the
train step differentiates it with `jax.value_and_grad(loss_fn, has_aux=True)`.

References:
  [DDPM]   Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
  [IDDPM]  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. 2021.
  [PD]     Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. 2022.
  [MinSNR] Hang et al. Efficient Diffusion Training via Min-SNR Weighting Strategy. 2023.

Loss weightings. With x_t = alpha_t x + sigma_t eps, alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t
and SNR_t = alpha_t^2 / sigma_t^2 = abar_t / (1 - abar_t), the three targets' errors are
multiples of the x-space error of the x_0-hat they imply ([PD] sec. 4 and appendix D):

  eps - eps_hat = (alpha_t / sigma_t) (x_0-hat - x)     so  MSE_eps = SNR_t MSE_x0,
  v - v_hat     = (x_0-hat - x) / sigma_t               so  MSE_v = (SNR_t + 1) MSE_x0.

A weighting is defined by its weight lambda(t) on the x-space loss lambda(t) ||x - x_0-hat||^2;
on a target's MSE it becomes lambda / SNR (eps), lambda (x0), lambda / (SNR + 1) (v), so one
weighting trains the same x-space objective whichever mean type the network predicts:

  weighting      lambda (x0)   eps                v                       source
  uniform        per target: 1 on every target's MSE (L_simple for eps)  [DDPM eq. 14]
  min_snr        min(SNR, g)   min(1, g / SNR)    min(SNR, g) / (SNR + 1)  [MinSNR sec. 3]
  truncated_snr  max(SNR, 1)   max(1, 1 / SNR)    max(abar, 1 - abar)      [PD sec. 4, eq. 9-10]
  snr_plus_one   SNR + 1       1 + 1 / SNR        1                        [PD sec. 4, eq. 9-10]

truncated_snr is max(||x - x_0-hat||^2, ||eps - eps-hat||^2) and snr_plus_one is
||x - x_0-hat||^2 + ||eps - eps-hat||^2 = ||v - v-hat||^2 [PD sec. 4].

'uniform' is the one exception: it is 1 on the MSE of whatever the network predicts (so its
x-space weight is SNR for eps, 1 for x0, SNR + 1 for v). g is min_snr_gamma (5 in [MinSNR]).
Min-SNR's eps and v forms are those of the paper's code and diffusers'
examples/text_to_image/train_text_to_image.py (`compute_snr`): min(SNR, g) / SNR and
min(SNR, g) / (SNR + 1).

The per-example losses (`training_losses`: L_simple, L_vlb, hybrid) are here too; the timestep
samplers an objective takes (uniform, loss-aware) are in `jaxddpm.timesteps`, the VLB terms in
`jaxddpm.likelihood`.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxddpm.models import conditioning
from jaxddpm import diffusion
from jaxddpm.diffusion import likelihood
from jaxddpm import timesteps
from jaxddpm.schedules import Schedule

WEIGHTINGS = ('uniform', 'min_snr', 'truncated_snr', 'snr_plus_one')

# Improved DDPM sec. 3.1: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001.
HYBRID_VLB_WEIGHT = 0.001

PyTree = Any
# apply_fn(params, x_t, t, cond, key) -> [B, ...] or [B, ..., 2C]: the network in training
# mode; t is the original timestep (schedule.timestep_map of the index), key its dropout key.
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, dict, jax.Array], jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

_float = diffusion._float  # pylint: disable=protected-access  (one dtype rule for the core)


def _check_weighting(weighting: str, min_snr_gamma: float) -> None:
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}; expected one of {WEIGHTINGS}')
  if weighting == 'min_snr' and not min_snr_gamma > 0:
    raise ValueError(f'min_snr_gamma must be > 0, got {min_snr_gamma!r}')


# --- Loss weightings -----------------------------------------------------------------------------


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """SNR_t = abar_t / (1 - abar_t)  [PD sec. 2], float32 [B] for t int32 [B].

  Read as 1 / schedule.sqrt_recipm1_alphas_cumprod[t]^2, a field computed in float64, so it
  keeps float32 precision where 1 - abar_t rounds badly (abar_t near 1). 0 where abar_t = 0.
  """
  return 1.0 / jnp.square(schedule.sqrt_recipm1_alphas_cumprod[t])


def x0_loss_weight(schedule: Schedule, t: jax.Array, weighting: str,
                   min_snr_gamma: float = 5.0) -> jax.Array:
  """lambda(t), the weight on the x-space loss ||x - x_0-hat||^2 (module docstring table).

  min_snr: min(SNR, gamma) [MinSNR]; truncated_snr: max(SNR, 1); snr_plus_one: SNR + 1
  [PD sec. 4]; an x-space loss (distillation's) uses them as they are. 'uniform' has no single
  x-space weight (see `loss_weight`) and is rejected.

  Args:
    t: int32 [B] schedule indices.

  Returns:
    float32 [B].
  """
  _check_weighting(weighting, min_snr_gamma)
  ratio = snr(schedule, t)
  if weighting == 'min_snr':
    return jnp.minimum(ratio, min_snr_gamma)
  if weighting == 'truncated_snr':
    return jnp.maximum(ratio, 1.0)
  if weighting == 'snr_plus_one':
    return ratio + 1.0
  raise ValueError("weighting 'uniform' is 1 on the target's MSE, not an x-space weight; "
                   'use loss_weight')


def loss_weight(schedule: Schedule, t: jax.Array, *, model_mean_type: str, weighting: str,
                min_snr_gamma: float = 5.0) -> jax.Array:
  """The factor on the per-example MSE of model_mean_type's target (module docstring table).

  lambda(t) / SNR_t for eps, lambda(t) for x0, lambda(t) / (SNR_t + 1) for v, where lambda is
  `x0_loss_weight`; 1 for 'uniform'. Written in forms that stay finite as SNR -> 0 where the
  weight is finite (min_snr's eps weight is min(1, gamma / SNR) = 1 at SNR 0); truncated_snr
  and snr_plus_one on eps are +inf at SNR 0 (abar_t = 0): no eps error determines x there.

  Args:
    t: int32 [B] schedule indices.

  Returns:
    float32 [B].
  """
  diffusion.check_types(model_mean_type)
  _check_weighting(weighting, min_snr_gamma)
  if weighting == 'uniform':
    return jnp.ones(t.shape, jnp.float32)
  if model_mean_type == 'x0':
    return x0_loss_weight(schedule, t, weighting, min_snr_gamma)
  ratio = snr(schedule, t)
  inv_ratio = jnp.square(schedule.sqrt_recipm1_alphas_cumprod[t])  # 1 / SNR
  one_minus_abar = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[t])  # 1 / (SNR + 1)
  if weighting == 'min_snr':
    if model_mean_type == 'eps':
      return jnp.minimum(1.0, min_snr_gamma * inv_ratio)
    return jnp.minimum(ratio, min_snr_gamma) * one_minus_abar
  if weighting == 'truncated_snr':
    if model_mean_type == 'eps':
      return jnp.maximum(1.0, inv_ratio)
    return jnp.maximum(ratio, 1.0) * one_minus_abar
  # snr_plus_one
  if model_mean_type == 'eps':
    return 1.0 + inv_ratio
  return jnp.ones(t.shape, jnp.float32)


# --- Per-example training losses ----------------------------------------------------------------


def training_losses(model_fn: diffusion.ModelFn, schedule: Schedule, x_start: jax.Array,
                    t: jax.Array, noise: jax.Array, *, model_mean_type: str, model_var_type: str,
                    loss_type: str, cond: Optional[Mapping[str, Any]] = None
                    ) -> dict[str, jax.Array]:
  """Per-example training losses at x_t = q_sample(x_start, t, noise)  (`diffusion.q_sample`).

  mse:    the prediction's mean squared error against its target (eps: noise; x0: x_start;
          v: `diffusion.predict_v`), averaged over dimensions: L_simple  [DDPM eq. 14].
          With a learned variance, the variance output is trained by the VLB term on a
          stop-gradient copy of the prediction, loss = mse + vb (improved-diffusion's
          LossType.MSE).
  kl:     loss = vb, the single VLB term L_{t-1} (L_0 at t=0) in bits/dim, with gradient to
          the mean and the variance  [DDPM eq. 5]. E_t[loss] = L_vlb / T for uniform t.
  hybrid: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, with stop-gradient on the mean
          in the L_vlb term  [IDDPM sec. 3.1]. L_vlb = sum_t L_t is estimated by T L_t for the
          sampled t, so loss = mse + 0.001 T vb (improved-diffusion's RESCALED_MSE, which writes
          this as vb * T / 1000). L_simple is a per-dimension mean and vb is in bits/dim, as in
          improved-diffusion. With a fixed variance the vb term carries no gradient.

  The VLB terms use unclipped x_0-hat (clip_denoised=False), as in improved-diffusion.

  Args:
    model_fn: model_fn(x, t, cond) -> [B, H, W, C] or [B, H, W, 2C].
    x_start: x_0, [B, H, W, C] in [-1, 1].
    t: int32 [B] (uniform, or from `timesteps.loss_aware_sample`).
    noise: eps ~ N(0, I), [B, H, W, C].

  Returns:
    dict(loss=[B], mse=[B], and vb=[B] (bits/dim, unscaled) for kl, hybrid and learned
    variances). For kl, mse is reported but not part of the loss.
  """
  diffusion.check_types(model_mean_type, model_var_type, loss_type)
  x_start, noise = _float(x_start), _float(noise)
  x_t = diffusion.q_sample(schedule, x_start, t, noise)
  model_output = _float(diffusion.call_model(model_fn, schedule, x_t, t, cond))
  pred, var_values = diffusion.split_model_output(model_output, x_start.shape[-1],
                                                  model_var_type)
  if model_mean_type == 'eps':
    target = noise
  elif model_mean_type == 'x0':
    target = x_start
  else:  # v
    target = diffusion.predict_v(schedule, x_start, t, noise)
  terms = dict(mse=diffusion.mean_flat(jnp.square(target - pred)))
  vb_kwargs = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
                   clip_denoised=False)
  if loss_type == 'kl':
    terms['vb'] = likelihood.vb_terms_bpd_from_output(
        schedule, model_output, x_start, x_t, t, **vb_kwargs)['output']
    terms['loss'] = terms['vb']
  elif loss_type == 'hybrid' or var_values is not None:
    frozen = jax.lax.stop_gradient(pred)
    if var_values is not None:
      frozen = jnp.concatenate([frozen, var_values], axis=-1)
    terms['vb'] = likelihood.vb_terms_bpd_from_output(
        schedule, frozen, x_start, x_t, t, **vb_kwargs)['output']
    vb_weight = HYBRID_VLB_WEIGHT * schedule.num_timesteps if loss_type == 'hybrid' else 1.0
    terms['loss'] = terms['mse'] + vb_weight * terms['vb']
  else:
    terms['loss'] = terms['mse']
  return terms


# --- The denoising objective ---------------------------------------------------------------------


def _check_objective(schedule, model_mean_type, model_var_type, loss_type, weighting,
                     min_snr_gamma, timestep_sampler):
  diffusion.check_types(model_mean_type, model_var_type, loss_type)
  _check_weighting(weighting, min_snr_gamma)
  if loss_type == 'kl' and weighting != 'uniform':
    raise ValueError(f"weighting {weighting!r} weights the MSE term, and loss_type 'kl' has "
                     "none (its loss is the VLB term); use weighting='uniform' or loss_type "
                     "'mse' / 'hybrid'")
  return timestep_sampler or timesteps.uniform_timesteps(schedule.num_timesteps)


def denoising_objective(apply_fn: ApplyFn, schedule: Schedule, *, model_mean_type: str,
                        model_var_type: str, loss_type: str, weighting: str = 'uniform',
                        min_snr_gamma: float = 5.0,
                        timestep_sampler: Optional[timesteps.TimestepSampler] = None,
                        cond_spec: Optional[conditioning.Spec] = None,
                        cond_transform: Optional[Callable[[dict, jax.Array], dict]] = None
                        ) -> LossFn:
  """The denoising loss of DDPM / improved DDPM with the eps, x0 or v target and a weighting.

  Per example (`training_losses`, x_t = q_sample(x, t, eps)):

    L_i = w(t_i) mse_i + c vb_i,

  mse_i the MSE of the target (eps, x, or v = alpha eps - sigma x), w = `loss_weight` of the
  weighting, vb_i the VLB term in bits/dim, c = 0.001 T for 'hybrid' [IDDPM sec. 3.1], 1 for a
  learned variance under 'mse' (it trains the variance only), no vb term otherwise. The weighting
  acts on the MSE term only; the VLB term stays unweighted. loss_type 'kl' (L_i = vb_i) takes
  weighting='uniform' only (ValueError otherwise): its loss has no MSE term to weight.
  The batch loss is mean_i(s_i L_i), s_i the sampler's importance weights (1 when uniform).

  Randomness: key splits into (t_key, noise_key, dropout_key) = split(key, 3); t from
  timestep_sampler.sample(t_key, ...), eps = normal(noise_key, x.shape, float32), dropout_key
  goes to apply_fn. Conditioning dropout (classifier-free guidance training) draws from
  fold_in(key, 3): `conditioning.drop(batch['cond'], cond_spec, ...)` nulls each key with its
  kind's rate. Then cond_transform (e.g. the super-resolution input's noise-conditioning
  augmentation, `jaxddpm.diffusion.superres.train_augmentation`) draws from fold_in(key, 4).

  Args:
    apply_fn: apply_fn(params, x_t, t, cond, key) -> output, the network in training mode;
      t is the original timestep (schedule.timestep_map[t]), key its dropout key. The output is
      [B, ...] or [B, ..., 2C] for the learned variance types.
    schedule: the training schedule.
    model_mean_type, model_var_type, loss_type: see `diffusion.MEAN_TYPES`, `VAR_TYPES`,
      `LOSS_TYPES`.
    weighting: one of WEIGHTINGS (module docstring).
    min_snr_gamma: gamma of 'min_snr'.
    timestep_sampler: a `timesteps.TimestepSampler`; None is `timesteps.uniform_timesteps(T)`.
    cond_spec: the network's conditioning spec (`conditioning`, e.g. the U-Net config's
      `cond_spec()`); its kinds' dropout rates apply to batch['cond']. None: no dropout.
    cond_transform: cond_transform(cond, key) -> cond, applied after the dropout; None: none.

  Returns:
    loss_fn(params, batch, key, timestep_state=None) -> (loss, metrics), pure and jit-able.
    batch = {'x': [B, ...], 'cond': {...}}; timestep_state is the sampler's state (None for the
    uniform sampler). metrics: scalars 'loss', 'mse' (mean unweighted MSE), 'vb' (mean, when
    there is a VLB term); and per-example, for the sampler's update and not for logging:
    '_t' int32 [B], '_loss' float32 [B] (L_i, before importance weights, gradient stopped).
    After the step: timestep_state = timestep_sampler.update(timestep_state, metrics['_t'],
    metrics['_loss']).

  Raises:
    ValueError: for an unknown type or weighting, gamma <= 0, or a weighting with 'kl'.
  """
  sampler = _check_objective(schedule, model_mean_type, model_var_type, loss_type, weighting,
                             min_snr_gamma, timestep_sampler)
  types = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
               loss_type=loss_type)

  def loss_fn(params, batch, key, timestep_state=None):
    x_start = batch['x']
    batch_size = x_start.shape[0]
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    t, importance = sampler.sample(t_key, timestep_state, batch_size)
    noise = jax.random.normal(noise_key, x_start.shape, jnp.float32)
    cond = batch.get('cond', {})
    if cond_spec is not None:
      cond = conditioning.drop(cond, cond_spec, jax.random.fold_in(key, 3))
    if cond_transform is not None:
      cond = cond_transform(cond, jax.random.fold_in(key, 4))

    def model_fn(x_t, timesteps, c):
      return apply_fn(params, x_t, timesteps, c, dropout_key)

    terms = training_losses(model_fn, schedule, x_start, t, noise, cond=cond, **types)
    per_example = terms['loss']
    if weighting != 'uniform':
      weight = loss_weight(schedule, t, model_mean_type=model_mean_type, weighting=weighting,
                           min_snr_gamma=min_snr_gamma)
      per_example = weight * terms['mse']
      if 'vb' in terms:  # the VLB coefficient of `training_losses`
        vb_weight = (HYBRID_VLB_WEIGHT * schedule.num_timesteps
                     if loss_type == 'hybrid' else 1.0)
        per_example = per_example + vb_weight * terms['vb']
    loss = jnp.mean(per_example * importance)
    metrics = {'loss': loss, 'mse': jnp.mean(terms['mse']),
               '_t': t, '_loss': jax.lax.stop_gradient(per_example)}
    if 'vb' in terms:
      metrics['vb'] = jnp.mean(terms['vb'])
    return loss, metrics

  return loss_fn


# --- The noisy classifier's objective -----------------------------------------------------------


def classifier_objective(apply_fn: ApplyFn, schedule: Schedule, *, label_key: str = 'label',
                         timestep_sampler: Optional[timesteps.TimestepSampler] = None) -> LossFn:
  """Cross-entropy of a noisy classifier p_phi(y | x_t, t) (Dhariwal & Nichol 2021, sec. 4):

    L = E_{t, eps} [-log p_phi(y | x_t, t)],  x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,

  t uniform on {0..T-1} (guided-diffusion's classifier_train.py draws t from its uniform
  sampler over the whole schedule), so the classifier's gradient is defined at every noise
  level a guided sampler visits.

  Randomness: (t_key, noise_key, dropout_key) = split(key, 3), as `denoising_objective`.

  Args:
    apply_fn: apply_fn(params, x_t, t, cond, key) -> logits [B, K], the classifier in
      training mode; t is the original timestep (schedule.timestep_map[t]).
    schedule: the schedule the classifier's guided model was trained with.
    label_key: the key of y, int [B] in [0, K), in batch['cond'].
    timestep_sampler: None is `timesteps.uniform_timesteps(T)`.

  Returns:
    loss_fn(params, batch, key, timestep_state=None) -> (loss, metrics): 'loss' (mean
    cross-entropy, nats), 'accuracy' (argmax = y), and '_t', '_loss' per example for the
    sampler (as `denoising_objective`).
  """
  sampler = timestep_sampler or timesteps.uniform_timesteps(schedule.num_timesteps)

  def loss_fn(params, batch, key, timestep_state=None):
    cond = batch.get('cond', {})
    if label_key not in cond:
      raise ValueError(f'a classifier trains on labels: batch["cond"][{label_key!r}] is '
                       f'missing (cond has {sorted(cond) or "no keys"})')
    y = cond[label_key].astype(jnp.int32)
    x_start = _float(batch['x'])
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    t, importance = sampler.sample(t_key, timestep_state, x_start.shape[0])
    noise = jax.random.normal(noise_key, x_start.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, x_start, t, noise)
    logits = _float(apply_fn(params, x_t, schedule.timestep_map[t], {}, dropout_key))
    log_p = jax.nn.log_softmax(logits)
    per_example = -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
    loss = jnp.mean(per_example * importance)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return loss, {'loss': loss, 'accuracy': accuracy, '_t': t,
                  '_loss': jax.lax.stop_gradient(per_example)}

  return loss_fn
