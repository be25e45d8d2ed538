"""Schedules against an independent float64 NumPy re-derivation of every coefficient."""

import dataclasses
import math
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import schedules

T = 1000


def reference_betas(name, n, beta_start=1e-4, beta_end=0.02):
  """float64 betas, written from the papers' definitions (loops where the paper has a loop)."""
  if name == 'linear':  # DDPM sec. 4
    return np.array([beta_start + (beta_end - beta_start) * i / (n - 1) for i in range(n)])
  if name == 'quad':
    return np.array([(math.sqrt(beta_start) + (math.sqrt(beta_end) - math.sqrt(beta_start))
                      * i / (n - 1)) ** 2 for i in range(n)])
  if name == 'sigmoid':
    return np.array([beta_start + (beta_end - beta_start) / (1 + math.exp(6 - 12 * i / (n - 1)))
                     for i in range(n)])
  if name == 'const':
    return np.full(n, beta_end)
  if name == 'jsd':
    return np.array([1.0 / (n - i) for i in range(n)])
  if name in ('warmup10', 'warmup50'):
    w = int(n * (0.1 if name == 'warmup10' else 0.5))
    ramp = [beta_start + (beta_end - beta_start) * i / (w - 1) for i in range(w)]
    return np.array(ramp + [beta_end] * (n - w))
  if name == 'cosine':  # improved DDPM eq. 17, betas clipped at 0.999
    f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)])
  raise AssertionError(name)


def reference_coefficients(betas):
  """DDPM eqs. 4, 6, 7 in float64, element by element."""
  n = len(betas)
  abar = np.empty(n)
  prod = 1.0
  for i, b in enumerate(betas):
    prod *= 1.0 - b
    abar[i] = prod
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  with np.errstate(divide='ignore'):
    recip = 1.0 / abar
  return dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      alphas_cumprod_next=np.concatenate([abar[1:], [0.0]]),
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
      log_one_minus_alphas_cumprod=np.log(1 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(recip),
      sqrt_recipm1_alphas_cumprod=np.sqrt(recip - 1),
      posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(np.where(np.arange(n) == 0, post_var[1], post_var)),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1 - abar),
      posterior_mean_coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
  )


@pytest.mark.parametrize('name', schedules.SCHEDULES)
def test_matches_float64_reference(name):
  schedule = schedules.make_schedule(name, T)
  ref = reference_coefficients(reference_betas(name, T))
  assert schedule.num_timesteps == T
  for field, want in ref.items():
    got = getattr(schedule, field)
    assert got.dtype == jnp.float32 and got.shape == (T,), field
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0,
                               err_msg=f'{name}.{field}')
  np.testing.assert_array_equal(schedule.timestep_map, np.arange(T))


def test_linear_alphas_cumprod_end():
  # DDPM's CIFAR-10 schedule: abar_T = prod(1 - linspace(1e-4, 0.02, 1000)) ~= 4.04e-5.
  assert float(schedules.make_schedule('linear', T).alphas_cumprod[-1]) == pytest.approx(
      4.04e-5, rel=2e-3)


def test_cosine_alpha_bar_and_clip():
  schedule = schedules.make_schedule('cosine', T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  # Before the clip bites, abar_t = f(t+1) / f(0) exactly (improved DDPM eq. 17).
  np.testing.assert_allclose(schedule.alphas_cumprod[:900], f(np.arange(1, 901)) / f(0),
                             rtol=1e-5)
  assert float(schedule.betas[-1]) == pytest.approx(0.999)
  assert float(schedule.betas.max()) <= 0.999 + 1e-7


def test_custom_beta_range_and_cosine_kwargs():
  schedule = schedules.make_schedule('linear', 10, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(schedule.betas, np.linspace(0.1, 0.2, 10), rtol=1e-6)
  capped = schedules.make_schedule('cosine', 50, max_beta=0.5)
  assert float(capped.betas.max()) == pytest.approx(0.5)


def test_schedule_is_a_pytree_and_jits():
  schedule = schedules.make_schedule('linear', 20)
  assert len(jax.tree.leaves(schedule)) == 14

  @jax.jit
  def total(s):
    return s.betas.sum() + s.num_timesteps

  assert float(total(schedule)) == pytest.approx(float(np.sum(schedule.betas)) + 20, rel=1e-6)


def test_schedule_from_betas_and_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from jaxddpm import factories  # pylint: disable=g-import-not-at-top
  schedule = factories.schedule(tiny.get_config())
  config = tiny.get_config().diffusion
  want = schedules.schedule_from_betas(
      np.linspace(config.beta_start, config.beta_end, config.num_timesteps))
  chex.assert_trees_all_close(schedule, want, rtol=1e-7)
  assert schedule.num_timesteps == config.num_timesteps


@pytest.mark.parametrize('kwargs, bad', [
    (dict(name='cosin', num_timesteps=10), "'cosin'"),
    (dict(name='linear', num_timesteps=1), '1'),
    (dict(name='linear', num_timesteps=0), '0'),
    (dict(name='linear', num_timesteps=2.5), '2.5'),
    (dict(name='linear', num_timesteps=10, beta_end=1.5), '1.5'),
    (dict(name='linear', num_timesteps=10, beta_start=0.0), 'beta_start'),
    (dict(name='quad', num_timesteps=10, beta_start=-0.1), '-0.1'),
])
def test_make_schedule_errors_name_the_bad_value(kwargs, bad):
  with pytest.raises(ValueError) as info:
    schedules.make_schedule(**kwargs)
  assert bad in str(info.value)


def test_schedule_from_betas_errors():
  with pytest.raises(ValueError, match=r'betas\[1\] = 0\.0'):
    schedules.schedule_from_betas([0.1, 0.0, 0.2])
  with pytest.raises(ValueError, match='1.2'):
    schedules.schedule_from_betas([0.1, 1.2])
  with pytest.raises(ValueError, match='num_timesteps'):
    schedules.schedule_from_betas([0.1])
  with pytest.raises(ValueError, match='1-D'):
    schedules.schedule_from_betas(np.full((2, 2), 0.1))


def improved_diffusion_spacing(num_timesteps, section_counts):
  """improved-diffusion's `space_timesteps` (respace.py), its arithmetic followed literally: the
  float stride is accumulated by repeated addition and rounded with Python's round()."""
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx, all_steps = 0, []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      all_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    start_idx += size
  return sorted(set(all_steps))


def test_space_timesteps_uniform_is_improved_diffusion_for_every_count():
  for k in range(1, T + 1):
    np.testing.assert_array_equal(schedules.space_timesteps(T, k),
                                  improved_diffusion_spacing(T, [k]), err_msg=f'k = {k}')


@pytest.mark.parametrize('k, index, want', [
    # Counts where round(i * stride) and the accumulated stride round a tie apart
    # (e.g. k = 21: 10 * 49.95 is 499.5 in i * stride, 499.4999... accumulated).
    (21, 10, 499), (31, 15, 500), (45, 22, 499), (121, 100, 833)])
def test_space_timesteps_uniform_ties(k, index, want):
  steps = schedules.space_timesteps(T, k)
  assert len(steps) == k and steps[index] == want


def test_space_timesteps_uniform():
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 10),
                                [0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
  np.testing.assert_array_equal(schedules.space_timesteps(10, 10), np.arange(10))
  np.testing.assert_array_equal(schedules.space_timesteps(100, 1), [0])
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 'uniform10'),
                                schedules.space_timesteps(1000, 10))


def test_space_timesteps_sections():
  # improved-diffusion's docstring example: T = 300 in sections of 10, 15 and 20 steps.
  for counts in ('10,15,20', [10, 15, 20]):
    np.testing.assert_array_equal(schedules.space_timesteps(300, counts),
                                  improved_diffusion_spacing(300, [10, 15, 20]))
  steps = schedules.space_timesteps(300, '10,15,20')
  assert len(steps) == 45 and steps[10:18].tolist() == [100, 107, 114, 121, 128, 135, 142, 149]
  for t, counts in [(1000, [3, 7]), (1001, [5, 0, 9]), (250, [1, 2, 3, 4])]:
    np.testing.assert_array_equal(schedules.space_timesteps(t, counts),
                                  improved_diffusion_spacing(t, counts))


def test_space_timesteps_ddim():
  # improved-diffusion's "ddimN": range(0, T, s) for the integer stride s giving N steps.
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 'ddim50'), range(0, 1000, 20))
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 50, 'ddim'), range(0, 1000, 20))
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 'ddim7'), range(0, 1000, 143))
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 'ddim1000'), range(1000))


@pytest.mark.parametrize('t, n, spacing, want', [
    # diffusers DDIMScheduler / DDPMScheduler.set_timesteps, timestep_spacing=..., steps_offset=0:
    # leading arange(N) * (T // N); trailing round(arange(T, 0, -T / N)) - 1;
    # linspace round(linspace(0, T - 1, N)) (NumPy's round: 24.5 -> 24).
    (1000, 10, 'leading', [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
    (1000, 10, 'trailing', [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
    (1000, 10, 'linspace', [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
    (50, 7, 'leading', [0, 7, 14, 21, 28, 35, 42]),
    (50, 7, 'trailing', [6, 13, 20, 28, 35, 42, 49]),
    (50, 7, 'linspace', [0, 8, 16, 24, 33, 41, 49]),
    # DDIM's skip_type 'quad': int(linspace(0, sqrt(0.8 T), N) ** 2).
    (1000, 10, 'quad', [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]),
])
def test_space_timesteps_named(t, n, spacing, want):
  np.testing.assert_array_equal(schedules.space_timesteps(t, n, spacing), want)
  np.testing.assert_array_equal(schedules.space_timesteps(t, f'{spacing}{n}'), want)


def test_space_timesteps_leading_offset_and_trailing_length():
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 10, 'leading', steps_offset=1),
                                np.arange(10) * 100 + 1)
  # arange(1000, 0, -1000 / 61) has 62 elements (float round-off), the last rounding to -1.
  steps = schedules.space_timesteps(1000, 61, 'trailing')
  assert len(steps) == 61 and steps[0] == 15 and steps[-1] == 999
  for spacing in ('uniform', 'ddim', 'leading', 'trailing', 'linspace'):
    np.testing.assert_array_equal(schedules.space_timesteps(100, 100, spacing), np.arange(100))


def test_space_timesteps_quad():
  # DDIM's quadratic skip: int(linspace(0, sqrt(0.8 T), K) ** 2).
  want = [int(v ** 2) for v in np.linspace(0, math.sqrt(800), 10)]
  np.testing.assert_array_equal(schedules.space_timesteps(1000, 10, 'quad'), want)
  steps = schedules.space_timesteps(1000, 100, 'quad')  # duplicates at small t are removed
  assert len(steps) == len(set(steps.tolist())) < 100
  assert np.all(np.diff(steps) > 0)


@pytest.mark.parametrize('args, kwargs, bad', [
    ((1000, 0), {}, '0'), ((1000, 1001), {}, '1001'), ((1000, 10, 'cubic'), {}, "'cubic'"),
    ((1, 1), {}, '1'), ((1000, 'ddim999'), {}, '999'), ((1000, 'ddim1'), {}, 'exactly 1'),
    ((1000, '600,600'), {}, '600'), ((1000, 'ddim50', 'trailing'), {}, 'trailing'),
    ((1000, 'cubic5'), {}, "'cubic'"), ((1000, '5 steps'), {}, "'5 steps'"),
    ((1000, 10, 'trailing'), dict(steps_offset=1), "'trailing'"),
    ((1000, 10, 'leading'), dict(steps_offset=-1), '-1')])
def test_space_timesteps_errors(args, kwargs, bad):
  with pytest.raises(ValueError) as info:
    schedules.space_timesteps(*args, **kwargs)
  assert bad in str(info.value)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_respace_all_timesteps_is_identity(name):
  schedule = schedules.make_schedule(name, 100)
  chex.assert_trees_all_equal(schedules.respace(schedule, range(100)), schedule)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
@pytest.mark.parametrize('spacing, num_steps', [
    ('uniform', 10), ('uniform', 50), ('uniform', 999), ('ddim', 100), ('trailing', 25),
    ('quad', 40)])
def test_respaced_alphas_cumprod_is_exact(name, spacing, num_steps):
  # abar'_k = abar_{S_k} in float64 (improved DDPM sec. 4); float32 storage alone rounds by
  # <= 2^-24 ~ 6e-8. Cosine's clipped betas (0.999) once cost 1.3e-5 here.
  abar = np.cumprod(1 - reference_betas(name, T))
  use = schedules.space_timesteps(T, num_steps, spacing)
  spaced = schedules.respace(schedules.make_schedule(name, T), use)
  np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod, np.float64), abar[use],
                             rtol=1e-7, atol=0)
  np.testing.assert_allclose(spaced.alphas_cumprod64, abar[use], rtol=1e-12, atol=0)
  twice = schedules.respace(spaced, [0, 3, 7])
  np.testing.assert_allclose(np.asarray(twice.alphas_cumprod, np.float64), abar[use[[0, 3, 7]]],
                             rtol=1e-7, atol=0)


@pytest.mark.parametrize('transform', [
    lambda s: jax.tree.map(lambda a: a, s), jax.jit(lambda s: s), jax.device_put],
    ids=['tree_map', 'jit', 'device_put'])
def test_float64_alphas_cumprod_survives_jax_transformations(transform):
  # The float64 abar is static metadata, not a leaf: JAX rebuilds the Schedule with it, so
  # respacing stays exact. Losing it costs ~1e-5 relative at cosine's clipped last steps.
  schedule = schedules.make_schedule('cosine', T)
  assert len(jax.tree.leaves(schedule)) == 14
  moved = transform(schedule)
  assert moved.alphas_cumprod64 == schedule.alphas_cumprod64
  abar = np.cumprod(1 - reference_betas('cosine', T))
  for num_steps in (50, 10):
    use = schedules.space_timesteps(T, num_steps)
    spaced = schedules.respace(moved, use)
    np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod, np.float64), abar[use],
                               rtol=1e-7, atol=0, err_msg=f'{num_steps} steps')


def test_schedule_without_float64_alphas_cumprod_falls_back_to_float32_betas():
  schedule = schedules.make_schedule('cosine', T)
  by_hand = dataclasses.replace(schedule, alphas_cumprod64=None)
  use = schedules.space_timesteps(T, 10)
  abar = np.cumprod(1 - reference_betas('cosine', T))[use]
  fallback = np.asarray(schedules.respace(by_hand, use).alphas_cumprod, np.float64)
  # Still a valid schedule, but no longer float32-exact (hence the float64 copy).
  np.testing.assert_allclose(fallback, abar, rtol=1e-4, atol=0)
  assert np.max(np.abs(fallback / abar - 1)) > 1e-6


def test_equal_schedules_share_one_jit_trace():
  traces = []

  @jax.jit
  def total(s):
    traces.append(None)
    return s.betas.sum()

  total(schedules.make_schedule('cosine', T))
  total(schedules.make_schedule('cosine', T))  # a new but equal Schedule: a cache hit
  assert len(traces) == 1
  # The float64 abar is part of the cache key: same shapes, other values retrace.
  total(schedules.make_schedule('linear', T))
  assert len(traces) == 2


def test_host_array_is_immutable_and_compares_by_value():
  a = np.linspace(0.0, 1.0, 5)
  held = schedules.HostArray(a)
  assert held == schedules.HostArray(a.copy()) and hash(held) == hash(schedules.HostArray(a))
  assert held != schedules.HostArray(a.astype(np.float32))
  assert held != schedules.HostArray(a[:, None])
  assert held != schedules.HostArray(a + 1e-16)
  np.testing.assert_array_equal(np.asarray(held), a)
  a[0] = 9.0  # the holder took a copy
  assert held.array[0] == 0.0
  with pytest.raises(ValueError):
    held.array[0] = 1.0
  with pytest.raises(AttributeError):
    held.array = a
  assert pickle.loads(pickle.dumps(held)) == held


def test_respace_matches_improved_ddpm():
  base_betas = reference_betas('linear', T)
  base_abar = np.cumprod(1 - base_betas)
  use = schedules.space_timesteps(T, 25)
  spaced = schedules.respace(schedules.make_schedule('linear', T), set(use.tolist()))
  # Improved DDPM sec. 4: beta'_k = 1 - abar_{S_k} / abar_{S_{k-1}}.
  want_betas, last = [], 1.0
  for s in use:
    want_betas.append(1 - base_abar[s] / last)
    last = base_abar[s]
  ref = reference_coefficients(np.array(want_betas))
  for field, want in ref.items():
    np.testing.assert_allclose(np.asarray(getattr(spaced, field), np.float64), want, rtol=1e-5,
                               err_msg=field)
  np.testing.assert_allclose(spaced.alphas_cumprod, base_abar[use], rtol=1e-6)
  np.testing.assert_array_equal(spaced.timestep_map, use)
  # Respacing a respaced schedule composes the timestep maps.
  twice = schedules.respace(spaced, [0, 5, 24])
  np.testing.assert_array_equal(twice.timestep_map, use[[0, 5, 24]])
  np.testing.assert_allclose(twice.alphas_cumprod, base_abar[use[[0, 5, 24]]], rtol=1e-5)


def test_respace_errors():
  schedule = schedules.make_schedule('linear', 10)
  with pytest.raises(ValueError, match='10'):
    schedules.respace(schedule, [0, 10])
  with pytest.raises(ValueError, match='-1'):
    schedules.respace(schedule, [-1, 3])
  with pytest.raises(ValueError, match=r'\[4\]'):
    schedules.respace(schedule, [4])
