"""Evaluation: FD / IS / KID against independent float64 references, Inception
parity with the PyTorch reference network, the digits classifier, bits/dim."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import cifar
from jaxddpm import evaluation
from jaxddpm import images as images_lib
from jaxddpm.diffusion import likelihood
from jaxddpm import parallel
from jaxddpm import schedules
from jaxddpm.models import inception
from jaxddpm import factories
from jaxddpm import models

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'inception_fixture.npz')


def _random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or 2 * d))
  return a @ a.T / a.shape[1]


def _psd_sqrt(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, s1, mu2, s2):
  """Tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})), a symmetric PSD matrix."""
  r = _psd_sqrt(s1)
  eig = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))


# --- Fréchet distance ----------------------------------------------------------------------


def test_frechet_distance_matches_eigenvalue_reference():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  got = evaluation.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _frechet_reference(mu1, s1, mu2, s2), rtol=1e-9)
  assert abs(evaluation.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_diagonal_closed_form():
  """Diagonal covariances: d^2 = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(1)
  a, b = rng.uniform(0.1, 3.0, 10), rng.uniform(0.1, 3.0, 10)
  mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_singular_covariances():
  """Fewer samples than dimensions (rank-deficient covariances) still gives the right value."""
  rng = np.random.default_rng(2)
  d = 32
  f1, f2 = rng.standard_normal((12, d)), rng.standard_normal((12, d)) + 0.5
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  got = evaluation.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, _frechet_reference(mu1, s1, mu2, s2), rtol=1e-4)


# --- Inception Score -----------------------------------------------------------------------


def test_inception_score_matches_scipy_entropy():
  rng = np.random.default_rng(3)
  logits = 3.0 * rng.standard_normal((100, 7))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in np.split(probs, 10):
    py = part.mean(0)
    scores.append(np.exp(np.mean([scipy.stats.entropy(p, py) for p in part])))
  mean, std = evaluation.inception_score(logits, splits=10)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  np.testing.assert_allclose(evaluation.inception_score(probs, splits=10, from_probs=True),
                             [mean, std], rtol=1e-9)


def test_inception_score_limits():
  """Confident, balanced predictions over K classes give IS = K; identical predictions give 1."""
  k = 5
  confident = 60.0 * np.eye(k)[np.arange(50) % k]
  np.testing.assert_allclose(evaluation.inception_score(confident, splits=10)[0], k, rtol=1e-6)
  same = np.tile(np.random.default_rng(4).standard_normal(k), (50, 1))
  np.testing.assert_allclose(evaluation.inception_score(same, splits=5)[0], 1.0, rtol=1e-12)


# --- KID -----------------------------------------------------------------------------------


def _mmd2_double_loop(x, y):
  m, d = len(x), x.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
  return xx + yy - 2 * xy


def test_kid_matches_double_loop():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((15, 4)), rng.standard_normal((15, 4)) + 0.3
  # Subsets of the full size are permutations of the sets: every subset gives the same MMD^2.
  mean, std = evaluation.kid(x, y, num_subsets=3, subset_size=100)
  np.testing.assert_allclose(mean, _mmd2_double_loop(x, y), rtol=1e-10)
  assert std < 1e-10


def test_kid_subsets():
  rng = np.random.default_rng(6)
  x, y = rng.standard_normal((40, 3)), rng.standard_normal((30, 3))
  mean, std = evaluation.kid(x, y, num_subsets=4, subset_size=10, seed=1)
  # The same subsets drawn independently: generator seeded 1, x rows then y rows per subset.
  draw = np.random.default_rng(1)
  values = []
  for _ in range(4):
    xs = x[draw.choice(40, 10, replace=False)]
    ys = y[draw.choice(30, 10, replace=False)]
    values.append(_mmd2_double_loop(xs, ys))
  np.testing.assert_allclose([mean, std], [np.mean(values), np.std(values)], rtol=1e-9)
  shifted, _ = evaluation.kid(x, y + 3.0, num_subsets=4, subset_size=10)
  assert shifted > 10 * abs(mean)


# --- Inception-v3 --------------------------------------------------------------------------


def test_inception_matches_pytorch_reference(tmp_path):
  """The Flax network, fed through the weight loader and the extractor, equals the PyTorch
  construction of pytorch-fid's FID Inception (tests/fixtures/make_inception_fixture.py)."""
  ref = np.load(FIXTURE)
  state_dict = inception.synthetic_state_dict(int(ref['seed']))
  path = tmp_path / 'pt_inception.npz'
  np.savez(path, **state_dict)
  extractor = evaluation.InceptionExtractor.from_weights(path, batch_size=2)
  pool3, logits = extractor.features(ref['images'])
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  np.testing.assert_allclose(pool3, ref['pool3'], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits, ref['logits_unbiased'], atol=1e-4, rtol=1e-4)
  # The biased logits of the module itself.
  out = inception.InceptionV3().apply(extractor.variables, ref['images'] / 255.0)
  np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-4, rtol=1e-4)


def test_inception_state_dict_round_trip():
  sd = inception.synthetic_state_dict(1)
  variables = inception.params_from_state_dict(sd)
  conv = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']
  np.testing.assert_array_equal(conv, sd['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
                                sd['Mixed_7c.branch_pool.bn.running_var'])
  bad = dict(sd)
  del bad['fc.bias']
  with pytest.raises(KeyError, match='fc.bias'):
    inception.params_from_state_dict(bad)


def test_inception_metrics_without_weights_say_where_to_get_them(tmp_path):
  for path in ('', str(tmp_path / 'missing.pth')):
    with pytest.raises(evaluation.InceptionWeightsError) as e:
      evaluation.InceptionExtractor.from_weights(path)
    assert inception.FID_WEIGHTS_URL in str(e.value)
    assert '--inception_weights' in str(e.value)
  with pytest.raises(evaluation.InceptionWeightsError, match='pt_inception-2015-12-05-6726825d'):
    evaluation.extractor_from_config(cifar.get_config())


# --- Statistics, caching, compute_metrics ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LinearExtractor:
  """A cheap stand-in network: features and logits are fixed linear maps of the pixels."""
  name: str = 'linear'
  prefix: str = 'lin_'

  def features(self, images):
    x = images_lib.to_uint8(images).reshape(len(images), -1).astype(np.float64) / 255.0
    w = np.random.default_rng(0).standard_normal((x.shape[1], 6))
    return x @ w, x @ w[:, :4]


def test_compute_metrics_matches_direct_formulas(tmp_path):
  rng = np.random.default_rng(7)
  ref_images = rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
  samples = rng.uniform(-1, 1, (30, 4, 4, 1)).astype(np.float32)
  extractor = _LinearExtractor()
  cache = tmp_path / 'ref.npz'
  stats = evaluation.reference_stats(extractor, [ref_images[:25], ref_images[25:]],
                                     cache_path=cache)
  assert cache.exists() and stats.num_images == 40
  again = evaluation.reference_stats(extractor, None, cache_path=cache)  # read, not recomputed
  np.testing.assert_array_equal(again.sigma, stats.sigma)

  got = evaluation.compute_metrics(samples, stats, extractor=extractor, kid_subsets=5,
                                   kid_subset_size=20)
  fs, fl = extractor.features(samples)
  fr, _ = extractor.features(ref_images)
  expected_fid = _frechet_reference(fs.mean(0), np.cov(fs, rowvar=False), fr.mean(0),
                                    np.cov(fr, rowvar=False))
  np.testing.assert_allclose(got['lin_fid'], expected_fid, rtol=1e-6)
  # 30 samples: one IS split (parts of fewer than 50 samples are merged).
  np.testing.assert_allclose(got['lin_is'], evaluation.inception_score(fl, splits=1)[0],
                             rtol=1e-12)
  np.testing.assert_allclose(got['lin_kid'], evaluation.kid(fs, fr, num_subsets=5,
                                                            subset_size=20)[0], rtol=1e-6)
  assert set(got) == {'lin_fid', 'lin_is', 'lin_is_std', 'lin_kid', 'lin_kid_std'}

  other = dataclasses.replace(extractor, name='other')
  with pytest.raises(ValueError, match='linear'):
    evaluation.reference_stats(other, None, cache_path=cache)
  with pytest.raises(ValueError, match='unknown metrics'):
    evaluation.compute_metrics(samples, stats, extractor=extractor, metrics=('fid', 'bpd'))


# --- Digits classifier ---------------------------------------------------------------------


@pytest.fixture(scope='module')
def digits_cnn_cache(tmp_path_factory):
  """The digits classifier at 8x8, trained once for this module."""
  path = tmp_path_factory.mktemp('digits') / 'digits_cnn.npz'
  evaluation.DigitsExtractor.load_or_train(path, image_size=8)
  return path


def test_digits_classifier(digits_cnn_cache):
  """Trains in seconds to high accuracy; held-out digits are near the training digits in its
  feature space, noise is far."""
  from jaxddpm import digits_classifier  # pylint: disable=g-import-not-at-top
  cache = digits_cnn_cache
  extractor = evaluation.DigitsExtractor.load_or_train(cache, image_size=8)
  assert extractor.test_accuracy > 0.9
  train_x, _ = digits_classifier.load_digits_split('train', 8)
  test_x, test_y = digits_classifier.load_digits_split('test', 8)
  ref = evaluation.reference_stats(extractor, train_x)

  real = evaluation.compute_metrics(test_x, ref, extractor=extractor, kid_subsets=10,
                                    kid_subset_size=200)
  noise = np.random.default_rng(0).uniform(-1, 1, test_x.shape).astype(np.float32)
  fake = evaluation.compute_metrics(noise, ref, extractor=extractor, kid_subsets=10,
                                    kid_subset_size=200)
  assert real['digits_fid'] < 0.1 * fake['digits_fid']
  assert real['digits_kid'] < 0.1 * fake['digits_kid']
  assert real['digits_is'] > 5.0 > fake['digits_is']

  reloaded = evaluation.DigitsExtractor.load_or_train(cache, image_size=8)  # from the cache
  f1, l1 = extractor.features(test_x[:5])
  f2, l2 = reloaded.features(images_lib.to_uint8(test_x[:5]))
  np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-6)
  assert np.mean(np.argmax(l2, -1) == test_y[:5]) >= 0.8
  with pytest.raises(ValueError, match='8px'):
    evaluation.DigitsExtractor.load_or_train(cache, image_size=16)


# --- Bits/dim ------------------------------------------------------------------------------


def _toy_model_fn(x, t, cond):
  """An analytic eps-predictor (depends on x, t and the label) standing in for a network."""
  scale = 0.1 + 0.01 * t.astype(jnp.float32)[:, None, None, None]
  out = scale * x
  if 'label' in cond:
    out = out + 0.05 * cond['label'].astype(jnp.float32)[:, None, None, None]
  return out


@pytest.mark.parametrize('with_labels', [False, True])
def test_bits_per_dim_sharded_equals_direct(with_labels):
  schedule = schedules.make_schedule('linear', 8, beta_start=1e-3, beta_end=0.2)
  rng = np.random.default_rng(8)
  images = rng.uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
  labels = np.arange(6) % 3 if with_labels else None
  key = jax.random.key(0)
  types = dict(model_mean_type='eps', model_var_type='fixedlarge')
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  got = evaluation.bits_per_dim(_toy_model_fn, schedule, images, key,
                                cond=None if labels is None else {'label': labels},
                                batch_size=4, mesh=mesh, **types)

  # Direct: the 8-bit images in two batches of 4 (the second padded by repeating its last
  # image), batch i with key fold_in(key, i).
  q = np.round((images + 1) * 127.5) / 127.5 - 1
  direct = []
  for i, idx in enumerate([[0, 1, 2, 3], [4, 5, 5, 5]]):
    cond = {'label': jnp.asarray(labels[idx])} if with_labels else None
    out = likelihood.calc_bpd_loop(_toy_model_fn, schedule, jnp.asarray(q[idx]),
                                  jax.random.fold_in(key, i), cond=cond, **types)
    direct.append({k: np.asarray(v)[:len(set(idx))] for k, v in out.items()})
  ref = {k: np.concatenate([d[k] for d in direct]) for k in direct[0]}
  np.testing.assert_allclose(got['bpd'], ref['total_bpd'].mean(), rtol=1e-5)
  np.testing.assert_allclose(got['prior_bpd'], ref['prior_bpd'].mean(), rtol=1e-5)
  np.testing.assert_allclose(got['vb_per_t'], ref['vb'].mean(0), rtol=1e-5)
  np.testing.assert_allclose(got['mse_per_t'], ref['mse'].mean(0), rtol=1e-5)
  np.testing.assert_allclose(got['xstart_mse_per_t'], ref['xstart_mse'].mean(0), rtol=1e-5)
  np.testing.assert_allclose(got['bpd'], got['prior_bpd'] + got['decoder_bpd'] + got['terms_bpd'],
                             rtol=1e-6)
  np.testing.assert_allclose(got['bpd_stderr'], ref['total_bpd'].std(ddof=1) / np.sqrt(6),
                             rtol=1e-4)
  assert got['num_examples'] == 6 and got['vb_per_t'].shape == (8,)

  if not with_labels:
    unsharded = evaluation.bits_per_dim(_toy_model_fn, schedule, images, key, batch_size=4,
                                        **types)
    np.testing.assert_allclose(unsharded['vb_per_t'], got['vb_per_t'], rtol=1e-5)


# --- Runs: run_sample.py --metrics ---------------------------------------------------------


def _tiny_run(workdir, digits_cnn_cache):
  """A run directory (config.json + untrained params) of the tiny digits config."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from jaxddpm import checkpoint  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.bpd_num_examples = 6
  os.makedirs(workdir / 'eval')
  with open(workdir / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  # Small random parameters of the right shapes (cheaper than compiling the initialiser).
  abstract = jax.eval_shape(models.init_params, factories.create_model(config), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: np.float32(0.05 * rng.standard_normal(a.shape)), abstract)
  checkpoint.save_params(str(workdir), params)
  shutil.copy(digits_cnn_cache, workdir / 'eval' / 'digits_classifier_8px.npz')
  return config


def test_training_hook_and_run_metrics(tmp_path, digits_cnn_cache):
  """train.evaluate (every eval_every steps) and evaluation.evaluate_run (run_sample.py
  --metrics) give held-out bits/dim with its per-timestep terms and the digits metrics,
  caching the classifier and reference statistics in workdir/eval."""
  from jaxddpm import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxddpm import train  # pylint: disable=g-import-not-at-top
  config = _tiny_run(tmp_path, digits_cnn_cache)
  config.eval.num_samples = 20
  config.sampling.num_steps = 4
  config.sampling.batch_size = 8
  model = factories.create_model(config)
  mesh = parallel.make_mesh()
  params = checkpoint.load_params(str(tmp_path))  # replicated as in training
  state = types.SimpleNamespace(step=jnp.int32(0),
                                ema_params=jax.device_put(params, parallel.replicated(mesh)))
  schedule = factories.schedule(config)
  r = train.evaluate(config, model, schedule, state, mesh, str(tmp_path))
  np.testing.assert_allclose(r['bpd'], r['prior_bpd'] + r['decoder_bpd'] + r['terms_bpd'],
                             rtol=1e-5)
  assert 1 < r['bpd'] < 30  # an untrained network: far from the data, finite
  assert r['digits_fid'] > 0 and 1 <= r['digits_is'] <= 10 and 'digits_kid' in r
  assert any(n.startswith('ref_stats_digits_train_8px') for n in os.listdir(tmp_path / 'eval'))

  extractor = evaluation.prepare_run_metrics(tmp_path, 'fid,is,kid,bpd')
  assert extractor.name == 'digits_cnn'
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  r = evaluation.evaluate_run(tmp_path, images, metrics='fid,is,kid,bpd', extractor=extractor)
  assert {'digits_fid', 'digits_is', 'digits_kid', 'bpd', 'prior_bpd'} <= set(r)
  assert r['num_examples'] == 6
  assert r['vb_per_t'].shape == (config.diffusion.num_timesteps,)
  np.testing.assert_allclose(r['bpd'], r['prior_bpd'] + r['vb_per_t'].sum(), rtol=1e-5)
  evaluation.write_json(tmp_path / 'metrics.json', r)
  with open(tmp_path / 'metrics.json') as f:
    saved = json.load(f)
  assert saved['digits_fid'] == r['digits_fid'] and len(saved['vb_per_t']) == 100

  with pytest.raises(evaluation.EvaluationError, match='unknown metrics'):
    evaluation.prepare_run_metrics(tmp_path, 'fid,nll')
  with pytest.raises(evaluation.InceptionWeightsError, match='pt_inception'):
    evaluation.prepare_run_metrics(tmp_path, 'fid', inception_weights=str(tmp_path / 'no.pth'))


def test_training_metrics_score_what_the_sample_fn_returns(tmp_path, digits_cnn_cache):
  """The evaluator samples only through the sample_fn it is given (DESIGN.md): one call for
  config.eval.num_samples images, whose metrics are those of `compute_metrics`."""
  from jaxddpm import checkpoint  # pylint: disable=g-import-not-at-top
  config = _tiny_run(tmp_path, digits_cnn_cache)
  config.eval.num_samples = 20
  config.eval.bpd_num_examples = 0
  images = np.random.default_rng(1).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  calls = []

  def sample_fn(num_samples, key):
    calls.append((num_samples, key))
    return images

  got = evaluation.training_metrics(
      config, factories.create_model(config), factories.schedule(config),
      checkpoint.load_params(str(tmp_path)), parallel.make_mesh(), step=3, sample_fn=sample_fn,
      workdir=str(tmp_path))
  assert len(calls) == 1 and calls[0][0] == 20
  extractor = evaluation.extractor_from_config(config, workdir=str(tmp_path))
  ref = evaluation.dataset_reference_stats(config, extractor,
                                           cache_dir=evaluation.eval_dir(str(tmp_path)))
  assert got == evaluation.scalars(evaluation.compute_metrics(images, ref, extractor=extractor))
  assert 'bpd' not in got


def test_run_sample_without_inception_weights_fails_before_sampling(tmp_path):
  from configs import cifar as cifar_config  # pylint: disable=g-import-not-at-top
  config = cifar_config.get_config()
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, os.path.join(root, 'run_sample.py'), f'--workdir={tmp_path}',
       '--metrics=fid,kid'], capture_output=True, text=True, timeout=300, cwd=root)
  assert proc.returncode == 1, proc.stderr
  assert inception.FID_WEIGHTS_URL in proc.stderr and '--inception_weights' in proc.stderr
