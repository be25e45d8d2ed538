"""Samplers: ancestral DDPM, DDIM(eta), respaced steps, inpainting, guidance.

Every sampler here is one loop over a static *plan* of operations on a
(possibly respaced) schedule, run with `jax.lax.scan`:

- denoise at index t: x_t -> x_{t-1} with the model, either ancestrally
  (DDPM Algorithm 2, improved DDPM's learned variances) or with DDIM's
  update (Song et al. 2021, eq. 12);
- renoise to index t: x_{t-1} -> x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
  (only in RePaint's plans, Lugmayr et al. 2022);
- skip (padding, so every chunk of the plan has the same length).

Indices are 0-based as in `jaxddpm.schedules` (index t is the paper's t+1; index -1
is the data). Fewer steps than the model was trained with are taken on a
respaced schedule (improved DDPM sec. 4: betas recomputed from the kept
alphas_cumprod); the schedule's `timestep_map` makes the model see the original
timesteps.

The plan runs in chunks of a fixed length whose start index is a traced
argument, so a caller (e.g. a progress bar in the shell) can run it piece by
piece with one compilation:

  sampler = make_sampler(schedule, sampler='ddim', num_steps=50)
  state = sampler.init(key, (16, 32, 32, 3))
  run = jax.jit(run_chunk)  # model_fn a `Partial`, or pass static_argnums=1
  for start in sampler.chunk_starts:
    state, _ = run(sampler, model_fn, state, start)
  images = state.x

or all at once with `sample`. Only the current x is carried (memory is flat in
the number of steps) unless `intermediate_every` asks for every k-th x.

Randomness: the key in the state is never split along the way; operation k
draws its noise from fold_in(key, k), so results do not depend on how the plan
is chunked, and with a fixed key they are bitwise reproducible. On a sharded
batch the values do not depend on the number of devices (threefry is
partitionable).

`model_fn(x, t, cond) -> [B, H, W, C]` (or [B, H, W, 2C] for the
learned variances). Pass it as a `jax.tree_util.Partial` over the parameters
(e.g. `Partial(apply, params)`) so that under jit the parameters are arguments,
not constants baked into the program; plain functions work too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxddpm import conditioning
from jaxddpm import diffusion
from jaxddpm import schedules as schedules_lib

SAMPLERS = ('ddpm', 'ddim')

# Operation codes of a plan.
OP_SKIP = 0
OP_DENOISE = 1
OP_RENOISE = 2


@flax.struct.dataclass
class SamplerState:
  """What the plan carries from one operation to the next.

  x: [B, H, W, C] float32, the current sample (x_T at the start, x_0 at the end).
  key: PRNG key; operation k uses fold_in(key, k).
  cond: the conditioning pytree passed to the model, arrays with leading dim B (e.g.
    {'label': [B]}; {} when unconditional).
  known: [B, H, W, C] float32 in [-1, 1], inpainting reference, or None.
  mask: [B, H, W, C] float32, 1 where `known` is kept, or None.
  """
  x: jax.Array
  key: jax.Array
  cond: dict[str, jax.Array]
  known: jax.Array | None = None
  mask: jax.Array | None = None


@flax.struct.dataclass
class Sampler:
  """A sampling plan on a (respaced) schedule. Build with `make_sampler`.

  Array fields are pytree leaves (traced under jit, so e.g. eta can change without
  recompiling); the rest is static.

  schedule: the schedule the plan runs on, [S] arrays, S = number of kept timesteps.
  times: int32 [N_pad], the schedule index of each operation.
  ops: int32 [N_pad], OP_DENOISE / OP_RENOISE / OP_SKIP (padding at the end).
  eta: float32 scalar, DDIM's eta (eq. 16); unused by 'ddpm'.
  """
  schedule: schedules_lib.Schedule
  times: jax.Array
  ops: jax.Array
  eta: jax.Array
  kind: str = flax.struct.field(pytree_node=False)
  model_mean_type: str = flax.struct.field(pytree_node=False)
  model_var_type: str = flax.struct.field(pytree_node=False)
  clip_denoised: bool = flax.struct.field(pytree_node=False)
  num_ops: int = flax.struct.field(pytree_node=False)
  chunk_length: int = flax.struct.field(pytree_node=False)
  intermediate_every: int = flax.struct.field(pytree_node=False)
  has_renoise: bool = flax.struct.field(pytree_node=False)

  @property
  def num_chunks(self) -> int:
    return self.times.shape[0] // self.chunk_length

  @property
  def chunk_starts(self) -> range:
    """The `start` arguments of `run_chunk`, in order."""
    return range(0, self.times.shape[0], self.chunk_length)

  def init(self, key, shape=None, *, x_T=None, cond=None, known=None,
           mask=None) -> SamplerState:
    """The state before the first operation.

    Args:
      key: PRNG key; x_T ~ N(0, I) is drawn from it unless given.
      shape: (B, H, W, C) of the samples, when x_T is not given.
      x_T: [B, H, W, C] the starting noise (e.g. to test that DDIM(eta=0) is deterministic).
      cond: the conditioning pytree of [B, ...] arrays passed to the model at every step.
      known, mask: inpainting reference [B, H, W, C] in [-1, 1] and mask broadcastable to it
        (1 = keep). The known region of x_T is replaced by a draw of q(x_T | known).
    """
    init_key, key = jax.random.split(key)
    if x_T is None:
      if shape is None:
        raise ValueError('init needs shape or x_T')
      x_T = jax.random.normal(init_key, shape, jnp.float32)
    x = jnp.asarray(x_T, jnp.float32)
    if (known is None) != (mask is None):
      raise ValueError('inpainting needs both known and mask')
    if known is not None:
      known = jnp.broadcast_to(jnp.asarray(known, jnp.float32), x.shape)
      mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
      first = self.times[0]
      noisy = _q_sample_at(self.schedule, known, first, jax.random.fold_in(init_key, 1))
      x = mask * noisy + (1.0 - mask) * x
    return SamplerState(x=x, key=key, cond=dict(cond or {}),
                        known=known, mask=mask)


def repaint_plan(num_steps: int, jump_length: int = 10,
                 resample: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """RePaint's time schedule (Lugmayr et al. 2022, sec. 4.2 and Algorithm 1) as a plan.

  Going down from index num_steps-1 to 0, every `jump_length` indices (at j = 0,
  L, 2L, ... < num_steps - L) the plan jumps back up by L, renoising with
  q(x_t | x_{t-1}), and denoises the same stretch again, `resample - 1` times
  per jump point. resample=1 is the plain descending plan (the replacement method
  of inpainting; ordinary sampling).

  Returns:
    (times, ops): int32 arrays; op k denoises at index times[k] (x_t -> x_{t-1}) or renoises
    to index times[k] (x_{t-1} -> x_t).

  Raises:
    ValueError: an argument < 1, or resample > 1 with jump_length >= num_steps (no jump
      point: the plan would silently be plain replacement).
  """
  if num_steps < 1 or jump_length < 1 or resample < 1:
    raise ValueError(f'need num_steps, jump_length, resample >= 1, got '
                     f'{num_steps}, {jump_length}, {resample}')
  if resample > 1 and jump_length >= num_steps:
    raise ValueError(f'RePaint jump length {jump_length} >= {num_steps} steps never jumps '
                     f'back (it would be plain replacement); use a jump length below '
                     f'{num_steps}, or resample = 1')
  # The list of visited indices, as in the RePaint reference code (get_schedule_jump).
  jumps = {j: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t = num_steps
  visited = []
  while t >= 1:
    t -= 1
    visited.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        visited.append(t)
  times, ops = [], []
  last = visited[0] + 1
  for t in visited:
    if t < last:  # x_t -> x_{t-1}
      times.append(t)
      ops.append(OP_DENOISE)
    else:  # x_{last-1} -> x_last
      times.append(last)
      ops.append(OP_RENOISE)
    last = t
  return np.asarray(times, np.int32), np.asarray(ops, np.int32)


def make_sampler(schedule: schedules_lib.Schedule, *, sampler: str = 'ddpm',
                 num_steps: int | None = None, eta: float = 0.0,
                 timestep_spacing: str = 'uniform', model_mean_type: str = 'eps',
                 model_var_type: str = 'fixedlarge', clip_denoised: bool = True,
                 repaint_jump_length: int = 10, repaint_resample: int = 1,
                 num_chunks: int = 10, chunk_length: int | None = None,
                 intermediate_every: int = 0) -> Sampler:
  """Builds a sampling plan. Runs on the host (the arguments are static).

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    sampler: 'ddpm' (ancestral: DDPM Algorithm 2; x_{t-1} = mu_theta + sigma_t z with the
      variance of `model_var_type`, no noise at the last step) or 'ddim' (Song et al. 2021,
      eq. 12; sigma_t = eta sqrt((1 - abar_{t-1})/(1 - abar_t)) sqrt(1 - abar_t/abar_{t-1}),
      eq. 16).
    num_steps: number of denoising steps (default T). Fewer than T respaces the schedule
      (improved DDPM sec. 4) on `timestep_spacing`, a name in `schedules.SPACINGS`:
      'uniform' (improved-diffusion's), 'ddim', diffusers' 'leading' / 'trailing' /
      'linspace', or 'quad' (see `schedules.space_timesteps`).
    eta: DDIM's eta in [0, 1] (0: deterministic given x_T; 1: DDPM-like variance).
    model_mean_type, model_var_type, clip_denoised: as in `diffusion.p_mean_variance`
      (clip_denoised clips the predicted x_0 to [-1, 1]).
    repaint_jump_length, repaint_resample: RePaint's L and r (`repaint_plan`); r=1 is
      plain sampling (with inpainting: the replacement method); r > 1 needs L < num_steps.
    num_chunks: the plan is split into about this many equal chunks (for progress).
    chunk_length: or give the chunk length directly.
    intermediate_every: 0 keeps no trajectory; k > 0 makes `run_chunk` also return x after
      every k-th operation (chunk_length is rounded up to a multiple of k).

  Raises:
    ValueError: naming the bad argument.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; expected one of {SAMPLERS}')
  diffusion.check_types(model_mean_type, model_var_type)
  t_total = schedule.num_timesteps
  if num_steps is None:
    num_steps = t_total
  if not 1 <= num_steps <= t_total:
    raise ValueError(f'num_steps must be in [1, {t_total}] (the number of diffusion '
                     f'timesteps), got {num_steps}')
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f'eta must be in [0, 1], got {eta}')
  if intermediate_every < 0:
    raise ValueError(f'intermediate_every must be >= 0, got {intermediate_every}')
  if num_steps < t_total:
    use = schedules_lib.space_timesteps(t_total, num_steps, timestep_spacing)
    if use.size < 2:
      raise ValueError(f'{num_steps} step(s) with {timestep_spacing!r} spacing keep '
                       f'{use.size} timestep(s); need at least 2')
    schedule = schedules_lib.respace(schedule, use)
  times, ops = repaint_plan(schedule.num_timesteps, repaint_jump_length, repaint_resample)
  num_ops = times.shape[0]
  if chunk_length is None:
    chunk_length = math.ceil(num_ops / max(1, min(num_chunks, num_ops)))
  if intermediate_every:
    chunk_length = math.ceil(chunk_length / intermediate_every) * intermediate_every
  padded = math.ceil(num_ops / chunk_length) * chunk_length
  pad = padded - num_ops
  times = np.concatenate([times, np.zeros(pad, np.int32)])
  ops = np.concatenate([ops, np.full(pad, OP_SKIP, np.int32)])
  return Sampler(
      schedule=schedule, times=jnp.asarray(times), ops=jnp.asarray(ops),
      eta=jnp.asarray(eta, jnp.float32), kind=sampler, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=bool(clip_denoised), num_ops=num_ops,
      chunk_length=int(chunk_length), intermediate_every=int(intermediate_every),
      has_renoise=bool((ops == OP_RENOISE).any()))


def _q_sample_at(schedule, x_start, t, key):
  """x_t ~ q(x_t | x_0) (DDPM eq. 4) at a scalar index t for the whole batch."""
  tb = jnp.full((x_start.shape[0],), t, jnp.int32)
  noise = jax.random.normal(key, x_start.shape, x_start.dtype)
  return diffusion.q_sample(schedule, x_start, tb, noise)


def _denoise(sampler: Sampler, model_fn, state: SamplerState, t, key):
  """One reverse step x_t -> x_{t-1} at scalar index t; the known region is then put back."""
  x = state.x
  schedule = sampler.schedule
  noise_key, known_key = jax.random.split(key)
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  out = diffusion.p_mean_variance(
      model_fn, schedule, x, tb, model_mean_type=sampler.model_mean_type,
      model_var_type=sampler.model_var_type, clip_denoised=sampler.clip_denoised,
      cond=state.cond)
  noise = jax.random.normal(noise_key, x.shape, x.dtype)
  not_last = (t > 0).astype(x.dtype)  # no noise when producing x_0
  if sampler.kind == 'ddpm':
    x_prev = out['mean'] + not_last * jnp.exp(0.5 * out['log_variance']) * noise
  else:
    # DDIM eq. 12; pred_eps is consistent with the (possibly clipped) x_0 prediction.
    pred_xstart, eps = out['pred_xstart'], out['pred_eps']
    abar = schedule.alphas_cumprod[t]
    abar_prev = schedule.alphas_cumprod_prev[t]
    sigma = (sampler.eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar))
             * jnp.sqrt(1.0 - abar / abar_prev))
    dir_xt = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
    x_prev = jnp.sqrt(abar_prev) * pred_xstart + dir_xt + not_last * sigma * noise
  if state.known is not None:
    # Replacement (and RePaint Algorithm 1, line 5): the known region of x_{t-1} is a draw of
    # q(x_{t-1} | x_0), exactly x_0 at the last step.
    noisy = _q_sample_at(schedule, state.known, jnp.maximum(t - 1, 0), known_key)
    known_prev = jnp.where(t > 0, noisy, state.known)
    x_prev = state.mask * known_prev + (1.0 - state.mask) * x_prev
  return x_prev


def _renoise(sampler: Sampler, state: SamplerState, t, key):
  """x_{t-1} -> x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (RePaint Algorithm 1, line 13)."""
  beta = sampler.schedule.betas[t]
  noise = jax.random.normal(key, state.x.shape, state.x.dtype)
  return jnp.sqrt(1.0 - beta) * state.x + jnp.sqrt(beta) * noise


def _as_pytree(model_fn):
  return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


def run_chunk(sampler: Sampler, model_fn: Callable[..., jax.Array], state: SamplerState,
              start) -> tuple[SamplerState, jax.Array | None]:
  """Runs operations start .. start + chunk_length - 1 of the plan (pure; jit it).

  Args:
    sampler: from `make_sampler`.
    model_fn: model_fn(x, t, state.cond) -> model output (see module docstring).
    state: from `Sampler.init` or the previous chunk.
    start: int32 scalar, may be traced (one of `sampler.chunk_starts`).

  Returns:
    (state, intermediates): intermediates is [chunk_length // k, B, H, W, C], x after
    operations start + k - 1, start + 2k - 1, ... (k = intermediate_every), else None.
    Past the end of the plan x does not change.
  """
  # Every operation a denoising step (no RePaint, no padding): no lax.switch, whose
  # branch XLA:CPU runs some 5% slower than the same U-Net outside a conditional.
  only_denoise = not sampler.has_renoise and sampler.num_ops == sampler.times.shape[0]

  def op(x, k):
    s = state.replace(x=x)
    key = jax.random.fold_in(state.key, k)
    t = sampler.times[k]
    if only_denoise:
      return _denoise(sampler, model_fn, s, t, key), None
    branches = [lambda: x, lambda: _denoise(sampler, model_fn, s, t, key)]
    if sampler.has_renoise:
      branches.append(lambda: _renoise(sampler, s, t, key))
    return jax.lax.switch(sampler.ops[k], branches), None

  start = jnp.asarray(start, jnp.int32)
  every = sampler.intermediate_every
  if not every:
    x, _ = jax.lax.scan(op, state.x, start + jnp.arange(sampler.chunk_length))
    return state.replace(x=x), None

  def outer(x, ks):
    x, _ = jax.lax.scan(op, x, ks)
    return x, x

  ks = start + jnp.arange(sampler.chunk_length).reshape(-1, every)
  x, xs = jax.lax.scan(outer, state.x, ks)
  return state.replace(x=x), xs


@functools.cache
def _run_chunk_jit(compiler_options: tuple[tuple[str, Any], ...]):
  # No donation: the state holds the caller's arrays (x_T, labels, inpainting reference).
  return jax.jit(run_chunk, compiler_options=dict(compiler_options) or None)


def sample(model_fn, sampler: Sampler, key, shape=None, *, x_T=None, cond=None,
           known=None, mask=None, return_intermediates: bool = False,
           compiler_options: dict[str, Any] | None = None):
  """Runs the whole plan (jit-compiled once per sampler structure and shape).

  Args:
    model_fn: see module docstring; a `Partial` keeps parameters out of the compiled program.
    sampler: from `make_sampler`.
    key, shape, x_T, cond, known, mask: as in `Sampler.init`.
    return_intermediates: also return x after every `sampler.intermediate_every`-th operation.
    compiler_options: XLA options of the compiled chunk (the shell passes its CPU tuning,
      `jaxddpm.runtime.step_compiler_options()`).

  Returns:
    x_0 [B, H, W, C] float32 (not clipped), and with return_intermediates
    [num_ops // intermediate_every, B, H, W, C].
  """
  model_fn = _as_pytree(model_fn)
  state = sampler.init(key, shape, x_T=x_T, cond=cond, known=known, mask=mask)
  chunks = []
  for start in sampler.chunk_starts:
    state, xs = _run_chunk_jit(tuple(sorted((compiler_options or {}).items())))(
        sampler, model_fn, state, start)
    chunks.append(xs)
  if not return_intermediates:
    return state.x
  if not sampler.intermediate_every:
    raise ValueError('return_intermediates needs make_sampler(..., intermediate_every=k)')
  xs = jnp.concatenate(chunks)
  return state.x, xs[:sampler.num_ops // sampler.intermediate_every]


@dataclasses.dataclass(frozen=True)
class _Guided:
  """The guided model function; the spec is static (hashable), model_fn and w are leaves."""
  spec: tuple[tuple[str, Any], ...]

  def __call__(self, model_fn, guidance_scale, x, t, cond=None):
    cond = {} if cond is None else cond
    batch = x.shape[0]
    both = conditioning.concat(cond, conditioning.null(cond, dict(self.spec)))
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = out[:batch], out[batch:]
    c = x.shape[-1]
    guided = (1.0 + guidance_scale) * cond_out[..., :c] - guidance_scale * uncond_out[..., :c]
    # A learned variance (channels c:) is taken from the conditional prediction, as in GLIDE.
    return jnp.concatenate([guided, cond_out[..., c:]], axis=-1)


def classifier_free_guidance(model_fn, guidance_scale, cond_spec: conditioning.Spec) -> Partial:
  """Classifier-free guidance as a model function (Ho & Salimans 2022, eq. 6).

  eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null(c)), with w = guidance_scale and
  null(c) = `conditioning.null(c, cond_spec)`: the guided keys (labels, text) at their null
  value, the others (a super-resolution input) kept. Both predictions come from one model
  call on the doubled batch. The combination is affine with weights summing to 1, so it is
  applied to the first C output channels whatever the model predicts (eps, x_0 or v); extra
  channels (learned variance) come from the conditional prediction.

  Args:
    model_fn: model_fn(x, t, cond).
    guidance_scale: w >= 0 (0 is the conditional model).
    cond_spec: the model's conditioning spec (e.g. `UNetConfig.cond_spec()`).

  Returns:
    model_fn(x, t, cond) -> [B, H, W, C or 2C], a `Partial` (a pytree: under jit the wrapped
    parameters and w are arguments, so a new w does not recompile).
  """
  return Partial(_Guided(tuple(sorted(cond_spec.items()))), _as_pytree(model_fn),
                 jnp.asarray(guidance_scale, jnp.float32))


def masked_psnr(x, reference, mask, *, data_range: float = 2.0) -> jax.Array:
  """PSNR of the filled (mask == 0) region: 10 log10(data_range^2 / MSE), per image.

  Args:
    x, reference: [B, H, W, C] images on the same scale ([-1, 1] -> data_range 2;
      uint8 values -> 255).
    mask: broadcastable to x, 1 = known region (excluded).

  Returns:
    [B] float32 PSNR in dB (inf where the filled region matches exactly).
  """
  x = jnp.asarray(x, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  fill = 1.0 - jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  axes = tuple(range(1, x.ndim))
  mse = jnp.sum(fill * (x - reference) ** 2, axes) / jnp.maximum(jnp.sum(fill, axes), 1.0)
  return 10.0 * jnp.log10(data_range ** 2 / mse)

