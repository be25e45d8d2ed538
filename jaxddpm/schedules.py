"""Noise schedules: beta_t and every per-timestep coefficient derived from it.

All quantities are computed in float64 NumPy and stored as float32 arrays in a
`Schedule` pytree, which is passed to the diffusion math and the samplers as
data (never a global). Index t runs over 0..T-1; index t here is timestep t+1
in the DDPM paper's 1-based notation (Ho, Jain, Abbeel 2020).

Beta schedules (t = 0..T-1):

  linear    linspace(beta_start, beta_end, T)                      DDPM sec. 4
  quad      linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2     DDPM reference code
  warmup10  beta_end, the first 10% linspace(beta_start, beta_end)  DDPM reference code
  warmup50  beta_end, the first 50% linspace(beta_start, beta_end)  DDPM reference code
  const     beta_end                                               DDPM reference code
  jsd       1/T, 1/(T-1), ..., 1                                   DDPM reference code
                                                                   (Sohl-Dickstein et al. 2015)
  sigmoid   sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start
                                                                   DDIM reference code
  cosine    min(1 - abar((t+1)/T) / abar(t/T), max_beta),           improved DDPM eq. 17
            abar(u) = cos((u + s) / (1 + s) pi/2)^2, s = 0.008, max_beta = 0.999
"""

from typing import Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'cosine', 'quad', 'sigmoid', 'const', 'jsd', 'warmup10', 'warmup50')
SPACINGS = ('uniform', 'quad')


@flax.struct.dataclass
class Schedule:
  """Per-timestep coefficients of the forward process, float32 arrays of shape [T].

  With alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s (DDPM eq. 4):

  - betas: beta_t.
  - alphas_cumprod: abar_t; alphas_cumprod_prev: abar_{t-1} (1 at t=0);
    alphas_cumprod_next: abar_{t+1} (0 at t=T-1).
  - sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod:
    sqrt(abar_t), sqrt(1 - abar_t), log(1 - abar_t).
  - sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: sqrt(1/abar_t), sqrt(1/abar_t - 1).
  - posterior_variance: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7);
    0 at t=0.
  - posterior_log_variance_clipped: log beta~_t with beta~_0 replaced by beta~_1, as in the
    reference code, because beta~_0 = 0.
  - posterior_mean_coef1, posterior_mean_coef2: the weights of x_0 and x_t in the posterior
    mean mu~_t (DDPM eq. 7): sqrt(abar_{t-1}) beta_t / (1 - abar_t) and
    sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t).
  - timestep_map: int32 [T], the timestep of the original (unrespaced) process that index t
    stands for; arange(T) unless made by `respace`. `diffusion.p_mean_variance` and
    `diffusion.training_losses` call the model with timestep_map[t], so a respaced schedule
    needs no wrapping of the model function.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, static under jit (it is a shape)."""
    return self.betas.shape[0]


def _check_num_timesteps(num_timesteps):
  if (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer))
      or num_timesteps < 2):
    raise ValueError(f'num_timesteps must be an integer >= 2, got {num_timesteps!r}')


def _check_unit_interval(name, value):
  if not (isinstance(value, (int, float, np.floating, np.integer)) and 0.0 < value <= 1.0):
    raise ValueError(f'{name} must be in (0, 1], got {value!r}')


def _warmup_betas(beta_start, beta_end, num_timesteps, warmup_frac):
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
  """beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta) (improved DDPM eq. 17 and sec. 3.2).

  Args:
    num_timesteps: T.
    alpha_bar: float64 function of continuous time in [0, 1], abar(0) = 1.
    max_beta: clip that keeps the last betas away from 1 (0.999 in improved DDPM).

  Returns:
    float64 [T] betas.
  """
  t1 = np.arange(num_timesteps, dtype=np.float64) / num_timesteps
  t2 = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
  return np.minimum(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta)


def get_betas(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
              beta_end: float = 0.02, cosine_s: float = 0.008,
              max_beta: float = 0.999) -> np.ndarray:
  """float64 [T] betas of the named schedule (see the module docstring for the formulas).

  beta_start and beta_end are used by linear, quad, sigmoid, warmup10, warmup50 (and beta_end
  by const); cosine_s and max_beta by cosine (improved DDPM: s = 0.008, max beta 0.999).

  Raises:
    ValueError: naming the bad value, for an unknown name, T < 2, betas outside (0, 1].
  """
  if name not in SCHEDULES:
    raise ValueError(f'unknown beta schedule {name!r}; expected one of {SCHEDULES}')
  _check_num_timesteps(num_timesteps)
  _check_unit_interval('beta_start', beta_start)
  _check_unit_interval('beta_end', beta_end)
  t = num_timesteps
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
  elif name == 'quad':
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2
  elif name == 'sigmoid':
    x = np.linspace(-6.0, 6.0, t, dtype=np.float64)
    betas = (beta_end - beta_start) / (1.0 + np.exp(-x)) + beta_start
  elif name == 'const':
    betas = np.full(t, beta_end, dtype=np.float64)
  elif name == 'jsd':
    betas = 1.0 / np.linspace(t, 1, t, dtype=np.float64)
  elif name == 'warmup10':
    betas = _warmup_betas(beta_start, beta_end, t, 0.1)
  elif name == 'warmup50':
    betas = _warmup_betas(beta_start, beta_end, t, 0.5)
  else:  # cosine
    if not cosine_s > 0:
      raise ValueError(f'cosine_s must be > 0, got {cosine_s!r}')
    _check_unit_interval('max_beta', max_beta)
    betas = betas_for_alpha_bar(
        t, lambda u: np.cos((u + cosine_s) / (1.0 + cosine_s) * np.pi / 2) ** 2, max_beta)
  return betas


def _check_betas(betas):
  if betas.ndim != 1:
    raise ValueError(f'betas must be 1-D, got shape {betas.shape}')
  _check_num_timesteps(betas.shape[0])
  bad = ~((betas > 0) & (betas <= 1))  # also catches NaN
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f'betas must lie in (0, 1], got betas[{i}] = {float(betas[i])!r}')


def _schedule_from_betas64(betas, timestep_map):
  """Everything in float64, stored float32 (DDPM eqs. 4, 6, 7; reference-code conventions)."""
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
  with np.errstate(divide='ignore'):  # abar_t = 0 only for the jsd schedule's last step
    sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      alphas_cumprod_next=f32(alphas_cumprod_next),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      log_one_minus_alphas_cumprod=f32(np.log(1.0 - alphas_cumprod)),
      sqrt_recip_alphas_cumprod=f32(sqrt_recip_alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1_alphas_cumprod),
      posterior_variance=f32(posterior_variance),
      # beta~_0 = 0, so its log is replaced by log beta~_1 (improved-diffusion's convention).
      posterior_log_variance_clipped=f32(
          np.log(np.append(posterior_variance[1], posterior_variance[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
      posterior_mean_coef2=f32(
          (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
      timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
  )


def schedule_from_betas(betas) -> Schedule:
  """Builds a `Schedule` from betas [T] (converted to float64; all derived values in float64).

  Raises:
    ValueError: if betas is not 1-D, T < 2, or some beta is outside (0, 1].
  """
  betas = np.asarray(betas, dtype=np.float64)
  _check_betas(betas)
  return _schedule_from_betas64(betas, np.arange(betas.shape[0]))


def make_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02, **kw) -> Schedule:
  """The `Schedule` of a named beta schedule. `kw`: cosine_s, max_beta (see `get_betas`).

  Example: make_schedule('linear', 1000).alphas_cumprod[-1] ~= 4.04e-5 (DDPM's CIFAR-10 setting).

  Raises:
    ValueError: naming the bad value, for an unknown name, T < 2, or betas outside (0, 1].
  """
  return schedule_from_betas(
      get_betas(name, num_timesteps, beta_start=beta_start, beta_end=beta_end, **kw))


def schedule_from_config(config) -> Schedule:
  """The `Schedule` of a `config.diffusion` ConfigDict (num_timesteps, beta_schedule,
  beta_start, beta_end, and optionally cosine_s, max_beta)."""
  kw = {k: config[k] for k in ('cosine_s', 'max_beta') if k in config}
  return make_schedule(config.beta_schedule, config.num_timesteps,
                       beta_start=config.beta_start, beta_end=config.beta_end, **kw)


def space_timesteps(num_timesteps: int, num_steps: int, kind: str = 'uniform') -> np.ndarray:
  """Timesteps kept when sampling with fewer steps; sorted int64 array.

  - 'uniform': num_steps timesteps evenly spread over [0, T-1], both ends included, rounded to
    the nearest integer (improved-diffusion's `space_timesteps` with a single section).
  - 'quad': int(linspace(0, sqrt(0.8 T), num_steps)^2) (DDIM, Song et al. 2021, sec. D.2 and its
    reference code). Duplicates at small t are removed, so fewer than num_steps may be returned
    when num_steps is large relative to sqrt(0.8 T).

  Raises:
    ValueError: unknown kind, T < 2, or num_steps outside [1, T].
  """
  _check_num_timesteps(num_timesteps)
  if kind not in SPACINGS:
    raise ValueError(f'unknown timestep spacing {kind!r}; expected one of {SPACINGS}')
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_timesteps):
    raise ValueError(f'num_steps must be an integer in [1, {num_timesteps}], got {num_steps!r}')
  if kind == 'uniform':
    if num_steps == 1:
      return np.zeros(1, dtype=np.int64)
    stride = (num_timesteps - 1) / (num_steps - 1)
    steps = [round(i * stride) for i in range(num_steps)]
  else:
    steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
  return np.unique(np.asarray(steps, dtype=np.int64))


def respace(schedule: Schedule, use_timesteps: Iterable[int]) -> Schedule:
  """The schedule of the process that visits only `use_timesteps` (improved DDPM sec. 4).

  With kept timesteps S_0 < S_1 < ... < S_{K-1}, the new process has
  abar'_k = abar_{S_k} and beta'_k = 1 - abar_{S_k} / abar_{S_{k-1}} (abar_{S_{-1}} = 1); every
  other coefficient is rederived from beta' in float64. abar is recomputed in float64 from the
  stored betas, so spacing loses no precision to the float32 alphas_cumprod. The result's
  timestep_map[k] is the original timestep of S_k (composes when respacing twice).

  This runs on the host (not under jit): use_timesteps is a Python/NumPy collection.

  Args:
    schedule: a `Schedule` with concrete arrays.
    use_timesteps: iterable of distinct ints in [0, T), e.g. from `space_timesteps`.

  Raises:
    ValueError: a timestep outside [0, T), or fewer than 2 timesteps.
  """
  t = schedule.num_timesteps
  use = np.unique(np.asarray(sorted(int(s) for s in use_timesteps), dtype=np.int64))
  if use.size and (use[0] < 0 or use[-1] >= t):
    bad = use[0] if use[0] < 0 else use[-1]
    raise ValueError(f'use_timesteps must lie in [0, {t}), got {int(bad)}')
  if use.size < 2:
    raise ValueError(f'respace needs at least 2 timesteps, got {use.tolist()}')
  alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))[use]
  betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  _check_betas(betas)
  return _schedule_from_betas64(betas, np.asarray(schedule.timestep_map)[use])
