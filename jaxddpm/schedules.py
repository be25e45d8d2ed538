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

import dataclasses
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'cosine', 'quad', 'sigmoid', 'const', 'jsd', 'warmup10', 'warmup50')
SPACINGS = ('uniform', 'ddim', 'leading', 'trailing', 'linspace', 'quad')


class HostArray:
  """An immutable NumPy array usable as static pytree metadata (kept by jit, jax.tree.map and
  device_put, and part of the jit cache key, so hashable and compared by value): equal when
  dtype, shape and bytes are, hashed once here. `.array` is a read-only view of an immutable
  bytes buffer, so its WRITEABLE flag cannot be set either."""
  __slots__ = ('_key', '_hash', 'array')

  def __init__(self, array):
    array = np.asarray(array)
    key = (array.dtype.str, array.shape, array.tobytes())
    object.__setattr__(self, '_key', key)
    object.__setattr__(self, '_hash', hash(key))
    object.__setattr__(self, 'array', np.frombuffer(key[2], array.dtype).reshape(array.shape))

  def __setattr__(self, name, value):
    raise AttributeError(f'HostArray is immutable (cannot set {name!r})')

  def __eq__(self, other):
    return isinstance(other, HostArray) and self._key == other._key

  def __hash__(self):
    return self._hash

  def __reduce__(self):  # pickle and copy go through __init__, not the blocked __setattr__
    return HostArray, (self.array,)

  def __array__(self, dtype=None, copy=None):
    return np.array(self.array, dtype=dtype, copy=copy)

  def __repr__(self):
    return f'HostArray(dtype={self.array.dtype}, shape={self.array.shape})'


@dataclasses.dataclass(frozen=True)
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
    `objectives.training_losses` call the model with timestep_map[t], so a respaced schedule
    needs no wrapping of the model function.
  - alphas_cumprod64: `HostArray` of float64 [T] abar_t (a NumPy array given is wrapped), or
    None. Static pytree metadata, not a leaf: it stays on the host, survives jit, jax.tree.map
    and device_put, and is part of the jit cache key (equal schedules share a compilation,
    other abar retrace). The constructors here set it, so `respace` loses nothing to the
    float32 storage; a Schedule built by hand without it works, but `respace` then recomputes
    abar from the float32 betas.
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
  alphas_cumprod64: HostArray | None = dataclasses.field(default=None, repr=False,
                                                         compare=False)

  def __post_init__(self):
    if self.alphas_cumprod64 is not None and not isinstance(self.alphas_cumprod64, HostArray):
      # Frozen dataclass: the one sanctioned way to normalise a field.
      object.__setattr__(self, 'alphas_cumprod64', HostArray(self.alphas_cumprod64))

  @property
  def num_timesteps(self) -> int:
    """T, static under jit (it is a shape)."""
    return self.betas.shape[0]


# The float32 arrays are leaves; the host-side float64 abar is static metadata, so JAX
# transformations carry it through instead of dropping it (a dropped field would make
# `respace` silently fall back to the float32 betas).
jax.tree_util.register_dataclass(
    Schedule,
    data_fields=[f.name for f in dataclasses.fields(Schedule) if f.name != 'alphas_cumprod64'],
    meta_fields=['alphas_cumprod64'])


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


def _schedule_from_betas64(betas, timestep_map, alphas_cumprod=None):
  """Everything in float64, stored float32 (DDPM eqs. 4, 6, 7; reference-code conventions).

  alphas_cumprod: float64 abar when known exactly (`respace`); default cumprod(1 - betas).
  """
  alphas = 1.0 - betas
  if alphas_cumprod is None:
    alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
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
      alphas_cumprod64=HostArray(alphas_cumprod),
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


def _check_count(name, value, low, high):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or not low <= value <= high):
    raise ValueError(f'{name} must be an integer in [{low}, {high}], got {value!r}')


def _parse_steps(num_steps, spacing):
  """(spacing, num_steps or section counts) from `space_timesteps`' arguments."""
  if not isinstance(num_steps, str):
    return spacing, num_steps
  match = re.fullmatch(r'([a-z]+)(\d+)', num_steps)
  if match:
    if spacing != 'uniform' and spacing != match[1]:
      raise ValueError(f'num_steps {num_steps!r} names a spacing; got spacing={spacing!r} too')
    return match[1], int(match[2])
  try:
    return spacing, [int(c) for c in num_steps.split(',')]
  except ValueError:
    raise ValueError(f'cannot parse num_steps {num_steps!r}: expected an int, comma-separated '
                     f"section counts ('10,15,20') or a spacing name and a count "
                     f"('ddim50', 'trailing50')") from None


def _sections(num_timesteps, section_counts):
  """improved-diffusion's spacing: section i of the T timesteps (the first T mod n sections one
  longer) keeps section_counts[i] of its `size` timesteps at round(x_j), where x_0 = 0 and
  x_{j+1} = x_j + (size - 1) / (count - 1) accumulates the float stride by repeated addition
  and round() is Python's (ties to even). Computing x_j as j * stride instead rounds differently
  for 278 of the 1000 single-section counts at T = 1000."""
  counts = list(section_counts)
  if not counts:
    raise ValueError('section counts must not be empty')
  for c in counts:
    _check_count('a section count', c, 0, num_timesteps)
  if sum(counts) < 1:
    raise ValueError(f'section counts must keep at least one timestep, got {counts}')
  size_per, extra = divmod(num_timesteps, len(counts))
  steps, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f'cannot keep {count} timesteps of a section of {size} '
                       f'(section counts {counts}, T = {num_timesteps})')
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    x = 0.0
    for _ in range(count):
      steps.append(start + round(x))
      x += stride
    start += size
  return steps


def _ddim_stride(num_timesteps, num_steps):
  """range(0, T, s) for the integer stride s in [1, T) with exactly num_steps elements."""
  for stride in range(1, num_timesteps):
    if len(range(0, num_timesteps, stride)) == num_steps:
      return list(range(0, num_timesteps, stride))
  raise ValueError(f'no integer stride gives exactly {num_steps} timesteps of '
                   f'{num_timesteps} (ddim spacing)')


def space_timesteps(num_timesteps: int, num_steps, spacing: str = 'uniform', *,
                    steps_offset: int = 0) -> np.ndarray:
  """Timesteps kept when sampling with fewer steps (for `respace`); sorted unique int64 array.

  `num_steps` is an int N in [1, T], or a string: a spacing name and N ('ddim50', 'trailing25';
  then `spacing` is that name), or improved-diffusion's comma-separated section counts
  ('10,15,20'; a list of ints also works; 'uniform' only). With T = num_timesteps, `spacing`:

  - 'uniform' (default): improved-diffusion's `space_timesteps` with one section (or the given
    sections): N timesteps evenly spread over [0, T-1], both ends included, rounded as
    improved-diffusion does (see `_sections`). Equal to it for every N and section string.
  - 'ddim': improved-diffusion's "ddimN", the DDIM paper's {0, s, 2s, ...} = range(0, T, s)
    with the integer stride s giving exactly N timesteps ('ddim50' at T = 1000: 0, 20, ..., 980);
    ValueError if no stride does.
  - 'leading': diffusers' timestep_spacing='leading': arange(N) * (T // N) + steps_offset
    (diffusers' default steps_offset is 0; Stable Diffusion's scheduler configs use 1).
  - 'trailing': diffusers' 'trailing' (Lin et al. 2024, Table 2): round(arange(T, 0, -T/N)) - 1
    with NumPy's round (ties to even), so T-1 is always kept. For some N (61 at T = 1000) float
    round-off makes that arange one element longer, ending in -1; only its first N are used.
  - 'linspace': diffusers' 'linspace': round(linspace(0, T-1, N)) with NumPy's round.
  - 'quad': int(linspace(0, sqrt(0.8 T), N)^2) (DDIM, Song et al. 2021, sec. D.2 and its
    reference code's skip_type 'quad'). Duplicates at small t are removed, so fewer than N may
    be returned when N is large relative to sqrt(0.8 T).

  Returned ascending (diffusers lists its timesteps descending; the set is the same).

  Raises:
    ValueError: naming the bad value: unknown spacing, T < 2, N outside [1, T], sections that
      do not fit, a 'ddim' count no integer stride gives, timesteps outside [0, T).
  """
  _check_num_timesteps(num_timesteps)
  spacing, num_steps = _parse_steps(num_steps, spacing)
  if spacing not in SPACINGS:
    raise ValueError(f'unknown timestep spacing {spacing!r}; expected one of {SPACINGS}')
  _check_count('steps_offset', steps_offset, 0, num_timesteps - 1)
  if steps_offset and spacing != 'leading':
    raise ValueError(f"steps_offset applies to 'leading' spacing only, got {spacing!r}")
  t = num_timesteps
  if spacing == 'uniform' and not isinstance(num_steps, (int, np.integer)):
    return np.unique(np.asarray(_sections(t, num_steps), dtype=np.int64))
  _check_count('num_steps', num_steps, 1, t)
  n = int(num_steps)
  if spacing == 'uniform':
    steps = _sections(t, [n])
  elif spacing == 'ddim':
    steps = _ddim_stride(t, n)
  elif spacing == 'leading':
    steps = np.arange(n) * (t // n) + steps_offset
  elif spacing == 'trailing':
    steps = np.round(np.arange(t, 0, -t / n))[:n] - 1
  elif spacing == 'linspace':
    steps = np.round(np.linspace(0, t - 1, n))
  else:  # quad
    steps = np.linspace(0, np.sqrt(t * 0.8), n) ** 2
  steps = np.unique(np.asarray(steps).astype(np.int64))
  if steps[0] < 0 or steps[-1] >= t:
    raise ValueError(f'{spacing!r} spacing of {n} steps (steps_offset {steps_offset}) leaves '
                     f'[0, {t}): {steps[0]}..{steps[-1]}')
  return steps


def respace(schedule: Schedule, use_timesteps: Iterable[int]) -> Schedule:
  """The schedule of the process that visits only `use_timesteps` (improved DDPM sec. 4).

  With kept timesteps S_0 < S_1 < ... < S_{K-1}, the new process has
  abar'_k = abar_{S_k} and beta'_k = 1 - abar_{S_k} / abar_{S_{k-1}} (abar_{S_{-1}} = 1); every
  other coefficient is rederived in float64. abar is the schedule's float64
  `alphas_cumprod64`, so respacing is exact (the stored float32 abar' is the float32 rounding
  of the float64 abar_{S_k}); it survives jit, jax.tree.map and device_put. A Schedule built by
  hand without it (alphas_cumprod64=None) falls back to abar recomputed from the float32 betas,
  off by up to ~1e-5 relative where beta is near 1 (cosine's clipped last steps). The result's
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
  if schedule.alphas_cumprod64 is not None:
    alphas_cumprod = schedule.alphas_cumprod64.array[use]
  else:
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))[use]
  betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
  _check_betas(betas)
  return _schedule_from_betas64(betas, np.asarray(schedule.timestep_map)[use], alphas_cumprod)
