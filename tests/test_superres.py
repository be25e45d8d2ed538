"""Super-resolution: the augmentation's moments, the U-Net's low-res path, the pairs, the metrics."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxddpm import factories
from jaxddpm import models
from jaxddpm.data import photos
from jaxddpm.data import pipeline
from jaxddpm.data import sources
from jaxddpm.data import transforms
from jaxddpm.diffusion import superres
from jaxddpm.evaluation import superres as sr_eval


def sr_config(low_res_size=4, aug_max=0.5):
  config = tiny.get_config()
  config.data.low_res_size = low_res_size
  config.data.num_workers = 0
  config.diffusion.aug_max = aug_max
  return config


# --- q(z_s | low_res) --------------------------------------------------------------------------


def test_aug_coefficients_are_the_continuous_cosine():
  s = np.linspace(0.0, 1.0, 11)
  alpha, sigma = superres.aug_alpha_sigma(jnp.asarray(s))
  np.testing.assert_allclose(alpha, np.cos(np.pi * s / 2), atol=1e-7)
  np.testing.assert_allclose(sigma, np.sin(np.pi * s / 2), atol=1e-7)
  np.testing.assert_allclose(np.square(alpha) + np.square(sigma), 1.0, atol=1e-6)


def test_level_zero_leaves_the_low_res_input_unchanged():
  low = jax.random.uniform(jax.random.key(0), (3, 4, 4, 2), minval=-1, maxval=1)
  out = superres.augment({'low_res': low}, 0.0, jax.random.key(1))
  np.testing.assert_array_equal(out['low_res'], low)
  np.testing.assert_array_equal(out['aug_level'], np.zeros(3))
  clean = superres.train_augmentation(0.0)({'low_res': low}, jax.random.key(2))
  np.testing.assert_array_equal(clean['low_res'], low)


@pytest.mark.parametrize('s', [0.1, 0.5, 1.0])
def test_noised_low_res_has_the_moments_of_q(s):
  """E[z_s] = alpha(s) z and Var[z_s] = sigma(s)^2 over the noise (200k draws per pixel)."""
  z = jnp.asarray(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 2, 2, 2))
  keys = jax.random.split(jax.random.key(3), 200_000)
  draws = jax.vmap(lambda k: superres.augment({'low_res': z}, s, k)['low_res'][0])(keys)
  alpha, sigma = math.cos(math.pi * s / 2), math.sin(math.pi * s / 2)
  se = sigma / math.sqrt(len(keys))
  np.testing.assert_allclose(draws.mean(0), alpha * np.asarray(z[0]), atol=5 * se + 1e-6)
  np.testing.assert_allclose(draws.var(0), sigma ** 2, rtol=0.02, atol=1e-6)
  if s == 1.0:  # pure noise: the input is forgotten
    assert np.abs(draws.mean(0)).max() < 5 * se + 1e-6


def test_training_levels_are_uniform_below_the_bound():
  low = jnp.zeros((50_000, 1, 1, 1))
  out = superres.train_augmentation(0.4)({'low_res': low}, jax.random.key(4))
  levels = np.asarray(out['aug_level'])
  assert levels.min() >= 0.0 and levels.max() < 0.4
  np.testing.assert_allclose(levels.mean(), 0.2, atol=0.003)
  np.testing.assert_allclose(levels.var(), 0.4 ** 2 / 12, rtol=0.03)
  with pytest.raises(ValueError, match='in \\[0, 1\\]'):
    superres.train_augmentation(1.5)


def test_upsample_is_half_pixel_bilinear():
  """Against a NumPy derivation: output pixel i samples input coordinate (i + 0.5) / f - 0.5,
  clamped at the border."""
  rng = np.random.default_rng(0)
  low = rng.standard_normal((1, 3, 3, 1)).astype(np.float32)
  f = 4
  coords = np.clip((np.arange(3 * f) + 0.5) / f - 0.5, 0, 2)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, 2)
  w = coords - lo
  rows = low[0, lo, :, 0] * (1 - w)[:, None] + low[0, hi, :, 0] * w[:, None]
  ref = rows[:, lo] * (1 - w)[None] + rows[:, hi] * w[None]
  out = superres.upsample(jnp.asarray(low), (3 * f, 3 * f))
  np.testing.assert_allclose(out[0, ..., 0], ref, atol=1e-6)


# --- the U-Net's low-res path --------------------------------------------------------------------


def test_sr_unet_reads_the_upsampled_low_res_and_the_level():
  config = sr_config()
  model = factories.create_model(config)
  assert set(model.config.cond_spec()) == {'low_res', 'aug_level'}
  params = models.init_params(model, jax.random.key(0))
  # conv_in sees [x_t, upsampled low_res]: twice the image channels.
  assert params['conv_in']['kernel'].shape[2] == 2 * config.data.channels
  # A fresh U-Net's output layer is zero; random weights make every input matter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, a.shape)
                                        for k, a in zip(keys, leaves)])
  fn = models.make_model_fn(model, params)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  t = jnp.array([10, 50])
  low = jax.random.normal(jax.random.key(3), (2, 4, 4, 1))
  base = fn(x, t, {'low_res': low, 'aug_level': jnp.zeros(2)})
  np.testing.assert_array_equal(base, fn(x, t, {'low_res': low}))  # aug_level defaults to 0
  assert np.abs(base - fn(x, t, {'low_res': low + 0.5, 'aug_level': jnp.zeros(2)})).max() > 1e-3
  assert np.abs(base - fn(x, t, {'low_res': low, 'aug_level': jnp.full(2, 0.3)})).max() > 1e-3
  # Example 0 does not see example 1's low-res input.
  moved = fn(x, t, {'low_res': low.at[1].add(1.0)})
  np.testing.assert_allclose(moved[0], base[0], atol=1e-6)
  with pytest.raises(ValueError, match="needs cond\\['low_res'\\] of shape"):
    fn(x, t, {})
  with pytest.raises(ValueError, match="needs cond\\['low_res'\\] of shape"):
    fn(x, t, {'low_res': jnp.zeros((2, 2, 2, 1))})


def test_objective_augments_the_low_res_input_it_trains_on():
  """The loss the network sees: z_s for s ~ U[0, aug_max), drawn from fold_in(key, 4)."""
  config = sr_config(aug_max=0.5)
  seen = {}
  spec = factories.create_model(config).config.cond_spec()

  def apply_fn(params, x_t, t, cond, key):
    seen.update(cond)
    return jnp.zeros_like(x_t)

  from jaxddpm import objectives  # pylint: disable=g-import-not-at-top
  schedule = factories.schedule(config)
  loss_fn = objectives.denoising_objective(
      apply_fn, schedule, model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse',
      cond_spec=spec, cond_transform=superres.train_augmentation(0.5))
  low = jnp.full((4, 4, 4, 1), 0.5)
  key = jax.random.key(7)
  loss_fn(None, {'x': jnp.zeros((4, 8, 8, 1)), 'cond': {'low_res': low}}, key)
  expected = superres.train_augmentation(0.5)({'low_res': low}, jax.random.fold_in(key, 4))
  np.testing.assert_array_equal(seen['aug_level'], expected['aug_level'])
  np.testing.assert_array_equal(seen['low_res'], expected['low_res'])
  assert 0 < float(seen['aug_level'].min()) and float(seen['aug_level'].max()) < 0.5


# --- data: the pairs and the photos -----------------------------------------------------------


def test_pipeline_pairs_each_image_with_its_bicubic_shrink():
  config = sr_config()
  pipe = pipeline.create_train_pipeline(config)
  batch = pipe.batch(3)
  src = sources.create_source(config.data, split='train')
  for row, i in enumerate(pipe.global_indices(3)[:4]):
    x = src[int(i)]['x']
    np.testing.assert_allclose(batch['x'][row], x, atol=1e-6)
    np.testing.assert_allclose(batch['cond']['low_res'][row], transforms.bicubic_resize(x, 4),
                               atol=1e-6)
  assert batch['cond']['low_res'].shape == (16, 4, 4, 1)
  evals = next(pipeline.eval_batches(config, batch_size=5))
  assert evals['cond']['low_res'].shape == (5, 4, 4, 1)


def test_bicubic_resize_antialiases_and_keeps_uint8():
  """A pixel-level checkerboard has no content below Nyquist: an antialiased 4x shrink is
  flat mid-gray, while decimation would keep its extremes."""
  board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
  small = transforms.bicubic_resize(board, 8)
  assert small.dtype == np.uint8 and small.shape == (8, 8, 1)
  assert np.abs(small.astype(int) - 128).max() <= 2
  rgb = np.repeat(board, 3, axis=-1)
  np.testing.assert_array_equal(transforms.bicubic_resize(rgb, 8)[..., 1:2], small)


def test_photos_train_and_held_out_are_disjoint_whole_photographs():
  assert not set(photos.TRAIN_PHOTOS) & set(photos.TEST_PHOTOS)
  test = photos.photos_source('test', 64, 3, 128)
  assert len(test) == 18  # 2 x 3 tiles of each 128 x 192 held-out photograph
  tile = test[0]['x']
  assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
  scaled = photos.scaled_photo('chelsea', 128, 3)
  np.testing.assert_array_equal(tile, scaled[0:64, 0:64])
  train = photos.photos_source('train', 64, 3, 128)
  assert len(train) == len(photos.TRAIN_PHOTOS) * photos.CROPS_PER_PHOTO
  again = photos.photos_source('train', 64, 3, 128)
  np.testing.assert_array_equal(train[123]['x'], again[123]['x'])  # fixed crops
  for i in (0, 1, len(train) - 1):
    p, top, left = train.corners[i]
    h, w = train.photos[p].shape[:2]
    assert 0 <= top <= h - 64 and 0 <= left <= w - 64
  with pytest.raises(sources.DatasetError, match='larger than data.photo_size'):
    photos.photos_source('train', 256, 3, 128)


# --- metrics ---------------------------------------------------------------------------------


def test_psnr_ssim_and_consistency_match_their_definitions():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  noisy = np.clip(truth.astype(int) + rng.integers(-9, 10, truth.shape), 0, 255).astype(np.uint8)
  mse = ((noisy.astype(np.float64) - truth) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(sr_eval.psnr(noisy, truth), 10 * np.log10(255 ** 2 / mse))
  np.testing.assert_allclose(sr_eval.ssim(truth, truth), 1.0)
  assert (sr_eval.ssim(noisy, truth) < 1.0).all()
  low = np.stack([transforms.bicubic_resize(t, 4) for t in truth])
  assert np.isinf(sr_eval.consistency_psnr(truth, low)).all()  # the exact preimage


def test_hf_share_of_sinusoids():
  """A cosine above the low-res Nyquist frequency (0.5 / 4) is all high frequency, one
  below it none."""
  n = 32
  x = np.arange(n)
  for freq, share in ((6 / n, 1.0), (2 / n, 0.0)):
    wave = np.cos(2 * np.pi * freq * x)[None, :] * np.ones((n, 1))
    image = np.round(127.5 + 100 * wave).astype(np.uint8)[None, ..., None]
    np.testing.assert_allclose(sr_eval.hf_share(image, 4.0), share, atol=1e-3)


def test_sr_metrics_report_model_bicubic_and_sample_mean():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
  low = np.stack([transforms.bicubic_resize(t, 4) for t in truth])
  samples = np.stack([truth, truth])  # K = 2 perfect samples
  out = sr_eval.sr_metrics(samples, truth, low)
  assert math.isinf(out['sr_psnr']) and math.isinf(out['mean_psnr'])
  assert out['sr_hf_gap'] == 0.0 and out['bicubic_hf_gap'] > 0.0
  bicubic = sr_eval.bicubic_upsample(low, 16)
  np.testing.assert_allclose(out['bicubic_psnr'], sr_eval.psnr(bicubic, truth).mean())
  grid = sr_eval.comparison_grid(low, truth, truth)
  assert grid.shape == (2 * 18 + 2, 4 * 18 + 2, 1)
  np.testing.assert_array_equal(grid[2:18, 2 + 3 * 18:2 + 3 * 18 + 16], truth[0])
  with pytest.raises(ValueError, match='do not match'):
    sr_eval.sr_metrics(samples[:, :1], truth, low)


def test_one_trace_for_the_sr_train_step():
  """The SR objective compiles once for a fixed batch shape (no retracing per step)."""
  config = sr_config()
  model = factories.create_model(config)
  loss_fn, _ = factories.objective(config, model, factories.schedule(config))
  params = models.init_params(model, jax.random.key(0))
  batch = {'x': jnp.zeros((4, 8, 8, 1)), 'cond': {'low_res': jnp.zeros((4, 4, 4, 1))}}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, b, k):
    return jax.grad(lambda q: loss_fn(q, b, k)[0])(p)

  for i in range(2):
    grads = step(params, batch, jax.random.key(i))
  assert np.isfinite(np.asarray(grads['conv_in']['kernel'])).all()


def test_tiny_sr_run_trains_grids_and_evaluates(tmp_path):
  """train_and_evaluate on the tiny SR config: the pipeline's pairs, the augmented objective,
  a sample grid of held-out inputs and the SR metrics at the end."""
  import json  # pylint: disable=g-import-not-at-top
  from jaxddpm import train  # pylint: disable=g-import-not-at-top
  config = sr_config()
  config.training.sample_every = 8
  config.training.eval_every = 8
  config.training.num_sample_grid = 4
  config.eval.num_samples = 4
  config.eval.bpd_num_examples = 0
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['trained_steps'] == 8 and np.isfinite(result['loss'])
  assert (tmp_path / 'samples' / 'step_000008.png').exists()
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in rows if 'eval/sr_psnr' in r]
  assert len(evals) == 1 and evals[0]['step'] == 8
  for key in ('eval/sr_psnr', 'eval/bicubic_psnr', 'eval/sr_consistency', 'eval/sr_hf_gap'):
    assert np.isfinite(evals[0][key]), key


def _keys_cubic_upsample(low: np.ndarray, f: int) -> np.ndarray:
  """float64 [B, n, n, C] -> [B, n f, n f, C]: Keys' cubic kernel (a = -0.5) at the half-pixel
  coordinates (i + 0.5) / f - 0.5, its weights renormalised over the pixels inside the image."""
  a = -0.5
  n = low.shape[1]
  d = np.abs((np.arange(n * f) + 0.5)[:, None] / f - 0.5 - np.arange(n)[None])
  w = np.where(d <= 1, (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1,
               np.where(d < 2, a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a, 0.0))
  w /= w.sum(1, keepdims=True)
  return np.einsum('ik,bklc,jl->bijc', w, low, w)


def test_residual_base_is_keys_cubic_and_scores_like_pil_bicubic():
  low = np.random.default_rng(0).standard_normal((2, 5, 5, 1))
  out = superres.residual_base(jnp.asarray(low, jnp.float32), (20, 20))
  np.testing.assert_allclose(out, _keys_cubic_upsample(low, 4), atol=1e-5)
  # On the held-out photos the base is the bicubic baseline: within 0.05 dB of PIL's.
  from configs import photos_sr  # pylint: disable=g-import-not-at-top
  high, small = sr_eval.held_out_pairs(photos_sr.get_config())
  up = superres.residual_base(jnp.asarray(small, jnp.float32) / 127.5 - 1.0, (64, 64))
  up = np.clip(np.round((np.asarray(up) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  bicubic = sr_eval.bicubic_upsample(small, 64)
  assert abs(sr_eval.psnr(up, high).mean() - sr_eval.psnr(bicubic, high).mean()) < 0.05


def test_residual_target_and_its_inverse():
  """to_residual subtracts the bicubic upsampling of the clean low-res input from x, before
  any augmentation, and from_residual adds it back."""
  key = jax.random.key(0)
  x = jax.random.uniform(key, (2, 8, 8, 1), minval=-1, maxval=1)
  low = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1), minval=-1, maxval=1)
  batch = superres.to_residual({'x': x, 'cond': {'low_res': low}})
  reference = np.asarray(x, np.float64) - _keys_cubic_upsample(np.asarray(low, np.float64), 2)
  np.testing.assert_allclose(batch['x'], reference, atol=1e-5)
  np.testing.assert_array_equal(batch['cond']['low_res'], low)
  np.testing.assert_allclose(superres.from_residual(batch['x'], low), x, atol=1e-6)
  scaled = superres.to_residual({'x': x, 'cond': {'low_res': low}}, 3.0)['x']
  np.testing.assert_allclose(scaled, 3.0 * batch['x'], atol=1e-6)
  np.testing.assert_allclose(superres.from_residual(scaled, low, 3.0), x, atol=1e-6)

  config = sr_config()
  config.diffusion.sr_residual = True
  model = factories.create_model(config)
  params = models.init_params(model, jax.random.key(2))
  schedule = factories.schedule(config)
  loss_fn, _ = factories.objective(config, model, schedule)
  config.diffusion.sr_residual = False
  plain_fn, _ = factories.objective(config, model, schedule)
  raw = {'x': x, 'cond': {'low_res': low}}
  np.testing.assert_allclose(loss_fn(params, raw, key)[0],
                             plain_fn(params, superres.to_residual(raw), key)[0], rtol=1e-6)


def test_residual_samples_are_the_solver_output_plus_the_upsampled_input(tmp_path,
                                                                         make_sample_workdir):
  from jaxddpm import parallel  # pylint: disable=g-import-not-at-top
  from jaxddpm import runs  # pylint: disable=g-import-not-at-top
  from jaxddpm import sample  # pylint: disable=g-import-not-at-top
  config = sr_config()
  config.sampling.aug_level = 0.0
  plain, plain_params, _ = runs.load_run(make_sample_workdir(tmp_path / 'plain', config))
  config.diffusion.sr_residual = True
  residual, residual_params, _ = runs.load_run(make_sample_workdir(tmp_path / 'res', config))
  low = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  kw = dict(num_samples=3, steps=3, solver='ddim', low_res=low, seed=0,
            mesh=parallel.make_mesh(jax.devices()[:1]))
  a = sample.generate(plain, plain_params, **kw)['samples']
  b = sample.generate(residual, residual_params, **kw)['samples']
  up = _keys_cubic_upsample(low.astype(np.float64) / 127.5 - 1.0, 2)
  np.testing.assert_allclose(b, a + up, atol=1e-5)
