"""Evaluation: bits/dim on held-out data, and FID / IS / KID of samples.

The numbers of the DDPM paper's Table 1 (CIFAR-10: FID 3.17, IS 9.46,
NLL <= 3.75 bits/dim), computed the way the community computes them:

- Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to
  features, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64 with
  pytorch-fid's numerical care for the matrix square root.
- Inception Score (Salimans et al. 2016), exp(E_x KL(p(y|x) || p(y))), mean and
  standard deviation over 10 splits.
- KID (Binkowski et al. 2018), the unbiased MMD^2 with the polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
- bits/dim: the full variational bound (prior + T terms incl. the decoder,
  `likelihood.calc_bpd_loop`) over a data split, sharded over devices, with a
  per-timestep breakdown (DDPM Table 2 / Fig. 5 rate-distortion view).

Features come from a `FeatureExtractor`: `InceptionExtractor` (FID Inception-v3,
`jaxddpm.models.inception`; needs the published weight file) or the offline
`DigitsExtractor` (`jaxddpm.digits_classifier`). Reference statistics of a
data set are computed once and cached as .npz.
"""

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.tree_util import Partial
import numpy as np
from scipy import linalg

from jaxddpm import data
from jaxddpm import images as images_lib
from jaxddpm.diffusion import likelihood
from jaxddpm import models
from jaxddpm import parallel
from jaxddpm import runs
from jaxddpm import runtime
from jaxddpm import sample
from jaxddpm.digits_classifier import DigitsExtractor
from jaxddpm.models import inception
from jaxddpm import factories

__all__ = [
    'frechet_distance', 'inception_score', 'kid', 'FeatureStats', 'feature_stats',
    'FeatureExtractor', 'InceptionExtractor', 'DigitsExtractor', 'EvaluationError',
    'InceptionWeightsError',
    'extractor_from_config', 'reference_stats', 'dataset_reference_stats', 'compute_metrics',
    'bits_per_dim', 'training_metrics', 'prepare_run_metrics', 'evaluate_run',
]

# ---------------------------------------------------------------------------
# Metrics of features (float64 NumPy).


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps=1e-6):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)  [Heusel et al. 2017, eq. 6].

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}).

  mu: [D]; sigma: [D, D]. In float64. As in pytorch-fid: when sqrtm of the
  (possibly singular) product is not finite, eps * I is added to both
  covariances; imaginary parts from round-off are dropped, and a large one
  (diagonal |imag| > 1e-3) raises.
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'mismatched statistics: {mu1.shape} vs {mu2.shape}, '
                     f'{sigma1.shape} vs {sigma2.shape}')
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # A singular product (e.g. dead ReLU features) is common and handled below.
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'sqrtm has a large imaginary component: '
                       f'{np.max(np.abs(covmean.imag)):.3g}')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, *, from_probs=False):
  """Inception Score exp(E_x KL(p(y|x) || p(y)))  [Salimans et al. 2016, sec. 4].

  logits: [N, K] (or probabilities with from_probs=True). The N rows are cut
  into `splits` consecutive parts of N // splits (the remainder is dropped, as
  in the original code); p(y) is the mean of p(y|x) within a part. Returns
  (mean, std) over the parts, in float64.
  """
  x = np.float64(logits)
  if from_probs:
    log_p = np.log(np.clip(x, 1e-300, None))
  else:
    log_p = x - np.max(x, axis=1, keepdims=True)
    log_p -= np.log(np.sum(np.exp(log_p), axis=1, keepdims=True))
  n = len(log_p) // splits
  if n < 1:
    raise ValueError(f'{len(log_p)} samples cannot make {splits} splits')
  scores = []
  for k in range(splits):
    part = log_p[k * n:(k + 1) * n]
    p = np.exp(part)
    log_py = np.log(np.mean(p, axis=0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_py), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def kid(feats1, feats2, *, num_subsets=100, subset_size=1000, seed=0):
  """Kernel Inception Distance  [Binkowski et al. 2018, eq. 3 with the kernel of sec. 3].

  The unbiased estimate of MMD^2 with k(x, y) = (x.y / d + 1)^3, d = feature
  dim, on `num_subsets` pairs of random subsets (without replacement) of
  m = min(subset_size, N1, N2) rows each, as in the KID paper and
  clean-fid / StyleGAN2-ADA:

    MMD^2 = sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.

  feats: [N, d]. Returns (mean, std) over subsets, in float64.
  """
  feats1, feats2 = np.float64(feats1), np.float64(feats2)
  d = feats1.shape[1]
  m = min(subset_size, len(feats1), len(feats2))
  if m < 2:
    raise ValueError('KID needs at least 2 feature vectors per set')
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = feats1[rng.choice(len(feats1), m, replace=False)]
    y = feats2[rng.choice(len(feats2), m, replace=False)]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    values.append(same - 2 * kxy.sum() / m**2)
  return float(np.mean(values)), float(np.std(values))


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Statistics of a feature set: the Gaussian fit (for FD) and a subset of rows (for KID).

  mu [D], sigma [D, D] float64 (sigma is the unbiased covariance, as np.cov);
  features [M, D] float32 (at most `max_features` random rows); num_images N;
  extractor: the name of the extractor that made them.
  """
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray
  num_images: int
  extractor: str

  def save(self, path):
    """Writes the statistics as .npz (atomically)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.npz'  # atomic: readers never see half a file
    np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features,
             num_images=self.num_images, extractor=self.extractor)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path):
    with np.load(os.fspath(path)) as f:
      return cls(mu=f['mu'], sigma=f['sigma'], features=f['features'],
                 num_images=int(f['num_images']), extractor=str(f['extractor']))


def feature_stats(features, *, extractor='', max_features=10_000, seed=0):
  """features [N, D] -> FeatureStats (mean and covariance in float64)."""
  features = np.asarray(features)
  if len(features) < 2:
    raise ValueError('feature statistics need at least 2 images')
  f64 = np.float64(features)
  keep = features
  if len(features) > max_features:
    keep = features[np.sort(np.random.default_rng(seed).choice(len(features), max_features,
                                                                replace=False))]
  return FeatureStats(mu=f64.mean(axis=0), sigma=np.cov(f64, rowvar=False),
                      features=np.float32(keep), num_images=len(features), extractor=extractor)


# ---------------------------------------------------------------------------
# Feature extractors.


class FeatureExtractor(Protocol):
  """What the metrics need from a network.

  name: identifies the feature space (cached statistics are checked against it).
  prefix: prepended to metric names ('' for Inception: 'fid'; 'digits_' for the
    digits classifier: 'digits_fid').
  features(images): images [N, H, W, C] uint8 in [0, 255] or float in [-1, 1]
    -> (features [N, D], logits [N, K]) NumPy.
  """
  name: str
  prefix: str

  def features(self, images) -> tuple[np.ndarray, np.ndarray]:
    ...


class EvaluationError(ValueError):
  """Metrics that cannot be computed as asked (the message says why)."""


class InceptionWeightsError(EvaluationError):
  """Inception metrics were asked for without the weight file."""


def _missing_weights_message(path):
  where = f'No Inception weights at {path!r}. ' if path else 'No Inception weights given. '
  return (where + 'FID, IS and KID use the FID Inception-v3 (pt_inception-2015-12-05); '
          f'download {inception.FID_WEIGHTS_URL} and pass its path with '
          '--inception_weights=PATH (or config.eval.inception_weights). '
          'torch reads the .pth once and it is cached as .npz beside it. '
          'Digits runs need no download: without weights they use the digits classifier '
          '(digits_fid, digits_is, digits_kid).')


@jax.jit
def _inception_apply(variables, images_uint8):
  x = images_uint8.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # grayscale as RGB, as PIL's convert('RGB') does
  out = inception.InceptionV3().apply(variables, x)
  return out['pool3'], out['logits_unbiased']


@dataclasses.dataclass(frozen=True)
class InceptionExtractor:
  """FID Inception-v3 features: pool3 [N, 2048] and logits [N, 1008].

  The logits are those of the TF graph's final layer without its bias, the
  ones the original Inception Score code (and torch-fidelity, torchmetrics)
  uses. Images are resized to 299x299 as in pytorch-fid; batches are sharded
  over `mesh`'s 'data' axis when a mesh is given.
  """
  variables: Any
  batch_size: int = 200
  mesh: Any = None
  name: str = 'inception_v3_fid'
  prefix: str = ''

  @classmethod
  def from_weights(cls, path, *, batch_size=200, mesh=None):
    """Loads the published .pth (torch needed once; cached as .npz) or a converted .npz.

    Raises InceptionWeightsError, saying where to download the file, when
    `path` is empty or does not exist.
    """
    if not path or not os.path.exists(os.fspath(path)):
      raise InceptionWeightsError(_missing_weights_message(path))
    variables = inception.params_from_state_dict(inception.load_torch_state_dict(path))
    return cls(variables=variables, batch_size=batch_size, mesh=mesh)

  def features(self, images):
    images = images_lib.to_uint8(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f'images must be [N, H, W, 1 or 3], got {images.shape}')
    batch_size = _round_to_mesh(self.batch_size, self.mesh)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)  # one compile
      f, l = _inception_apply(self.variables, _put(padded, self.mesh))
      feats.append(parallel.fetch(f)[:len(chunk)])
      logits.append(parallel.fetch(l)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(logits)


def _iter_images(images):
  """An array [N, H, W, C], or an iterable of arrays / {'x': array} batches."""
  if isinstance(images, np.ndarray) or hasattr(images, 'shape'):
    yield np.asarray(images)
    return
  for batch in images:
    yield np.asarray(batch['x'] if isinstance(batch, dict) else batch)


def extract_features(extractor, images):
  """Features and logits of an array or an iterable of batches (see `_iter_images`)."""
  feats, logits = zip(*(extractor.features(b) for b in _iter_images(images)))
  return np.concatenate(feats), np.concatenate(logits)


def reference_stats(extractor, images, *, cache_path=None, max_features=10_000):
  """Feature statistics of a reference set, read from / written to `cache_path` (.npz).

  images: array or iterable of batches (only read when the cache is missing).
  A cache made by another extractor raises instead of silently mixing
  feature spaces.
  """
  if cache_path and os.path.exists(cache_path):
    stats = FeatureStats.load(cache_path)
    if stats.extractor != extractor.name:
      raise ValueError(f'{cache_path} holds {stats.extractor!r} statistics, '
                       f'not {extractor.name!r}; delete it or choose another path')
    return stats
  feats, _ = extract_features(extractor, images)
  stats = feature_stats(feats, extractor=extractor.name, max_features=max_features)
  if cache_path:
    stats.save(cache_path)
  return stats


def dataset_reference_stats(config, extractor, *, split=None, cache_dir=None,
                            num_examples=None, batch_size=500):
  """Reference statistics of the run's data set (`config.data`), cached in `cache_dir`.

  split: default config.data.split (the training set, the usual FID reference).
  The cache file is named after data set, split, size, count and extractor.
  """
  split = split or config.data.split
  cache_path = None
  if cache_dir:
    name = '_'.join([str(config.data.dataset).replace('/', '-'), split,
                     f'{int(config.data.image_size)}px', str(num_examples or 'all'),
                     extractor.name])
    cache_path = os.path.join(cache_dir, f'ref_stats_{name}.npz')
  batches = data.eval_batches(config, batch_size=batch_size, num_examples=num_examples,
                              split=split)
  return reference_stats(extractor, batches, cache_path=cache_path)


METRICS = ('fid', 'is', 'kid')


def compute_metrics(samples, reference, *, extractor, metrics=METRICS, is_splits=10,
                    kid_subsets=100, kid_subset_size=1000, seed=0):
  """FID / IS / KID of `samples` against `reference`, in `extractor`'s feature space.

  samples: images [N, H, W, C] (uint8, or float in [-1, 1]) or an iterable of batches.
  reference: FeatureStats (e.g. from `reference_stats`) or reference images.
  Returns {prefix + name: value}: 'fid', 'is' and 'is_std', 'kid' and
  'kid_std' (prefix '' for Inception, 'digits_' for the digits classifier).
  IS uses `is_splits` parts, fewer when a part would hold under 50 samples.
  """
  unknown = set(metrics) - set(METRICS)
  if unknown:
    raise ValueError(f'unknown metrics {sorted(unknown)}; choose from {METRICS}')
  if not isinstance(reference, FeatureStats):
    reference = reference_stats(extractor, reference)
  elif reference.extractor != extractor.name:
    raise ValueError(f'reference statistics are {reference.extractor!r} features, '
                     f'not {extractor.name!r}')
  feats, logits = extract_features(extractor, samples)
  out = {}
  pre = extractor.prefix
  if 'fid' in metrics:
    stats = feature_stats(feats)
    out[pre + 'fid'] = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
  if 'is' in metrics:
    # Fewer splits when parts would hold under 50 samples (IS of tiny parts is biased to 1).
    splits = max(1, min(is_splits, len(logits) // 50))
    out[pre + 'is'], out[pre + 'is_std'] = inception_score(logits, splits=splits)
  if 'kid' in metrics:
    out[pre + 'kid'], out[pre + 'kid_std'] = kid(
        feats, reference.features, num_subsets=kid_subsets, subset_size=kid_subset_size,
        seed=seed)
  return out


# ---------------------------------------------------------------------------
# Bits/dim.


def _bpd_batch_fn(model_fn, schedule, x, key, cond, *, model_mean_type, model_var_type,
                  clip_denoised):
  return likelihood.calc_bpd_loop(model_fn, schedule, x, key, model_mean_type=model_mean_type,
                                  model_var_type=model_var_type, clip_denoised=clip_denoised,
                                  cond=cond)


@functools.cache
def _bpd_batch():
  return jax.jit(_bpd_batch_fn, static_argnames=('model_mean_type', 'model_var_type', 'clip_denoised'),
                 compiler_options=runtime.step_compiler_options())


def quantize(images):
  """float [-1, 1] -> the 8-bit grid {2k/255 - 1}: the decoder's discretised likelihood
  (DDPM eq. 13) is a likelihood of 8-bit data, so bits/dim is of the quantised images."""
  return np.float32(images_lib.to_uint8(images)) / 127.5 - 1.0


def bits_per_dim(model_fn, schedule, images, key, *, model_mean_type, model_var_type,
                 clip_denoised=True, cond=None, batch_size=64, mesh=None):
  """Negative log-likelihood bound in bits/dim over a data set  [DDPM eq. 5, Table 2].

  -log p(x_0) <= L_T (prior) + sum_{t=2}^T L_{t-1} + L_0 (decoder), each term
  from `likelihood.calc_bpd_loop` (one x_t draw per term), averaged over images.

  Args:
    model_fn: model_fn(x, t, cond); pass a `jax.tree_util.Partial` over the
      parameters so the compiled loop takes them as arguments (and is reused).
    schedule: the run's Schedule (T terms).
    images: [N, H, W, C] uint8, or float in [-1, 1] (put on the 8-bit grid).
    key: PRNG key; batch i uses fold_in(key, i).
    cond: the images' conditioning pytree of [N, ...] arrays (e.g. {'label': [N]}), or None.
    batch_size: images per compiled call (rounded up to a multiple of the mesh).
    mesh: shard each batch over the mesh's 'data' axis (None: default device).

  Returns:
    dict of floats: bpd (mean total), bpd_stderr, prior_bpd (L_T), decoder_bpd
    (L_0), terms_bpd (sum_{t>=2} L_{t-1}), num_examples; and NumPy [T] arrays
    indexed by timestep index t: vb_per_t (L_t in bits/dim, t=0 the decoder),
    mse_per_t (eps MSE), xstart_mse_per_t (x_0 MSE).
  """
  images = quantize(images)
  n = len(images)
  if n == 0:
    raise ValueError('bits_per_dim needs at least one image')
  model_fn = model_fn if isinstance(model_fn, Partial) else Partial(model_fn)
  batch_size = _round_to_mesh(min(batch_size, n), mesh)
  results = []
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, min(start + batch_size, n))
    padded = np.pad(idx, (0, batch_size - len(idx)), mode='edge')  # one shape: one compile
    batch_cond = jax.tree.map(lambda a: _put(np.asarray(a)[padded], mesh), cond or {})
    out = _bpd_batch()(model_fn, schedule, _put(images[padded], mesh), jax.random.fold_in(key, i),
                     batch_cond, model_mean_type=model_mean_type, model_var_type=model_var_type,
                     clip_denoised=clip_denoised)
    results.append({k: parallel.fetch(v)[:len(idx)] for k, v in out.items()})
  r = {k: np.concatenate([b[k] for b in results]).astype(np.float64) for k in results[0]}
  total = r['total_bpd']
  return dict(
      bpd=float(total.mean()),
      bpd_stderr=float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
      prior_bpd=float(r['prior_bpd'].mean()),
      decoder_bpd=float(r['vb'][:, 0].mean()),
      terms_bpd=float(r['vb'][:, 1:].sum(axis=1).mean()),
      num_examples=n,
      vb_per_t=r['vb'].mean(axis=0),
      mse_per_t=r['mse'].mean(axis=0),
      xstart_mse_per_t=r['xstart_mse'].mean(axis=0))


def _round_to_mesh(batch_size, mesh):
  """batch_size rounded up to a multiple of the mesh size (so it splits over devices)."""
  return batch_size if mesh is None else -(-batch_size // mesh.size) * mesh.size


def _put(x, mesh):
  """Host array (the same on every process) -> array sharded on the mesh's 'data' axis."""
  if mesh is None:
    return x
  sharding = NamedSharding(mesh, P('data'))
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def scalars(metrics):
  """The float entries of a metrics dict (drops per-timestep arrays), e.g. for logging."""
  return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
          if np.ndim(v) == 0}




# ---------------------------------------------------------------------------
# Runs: evaluation during training and of sampled runs.


def eval_dir(workdir):
  """workdir/eval: the digits classifier and reference statistics of a run."""
  return os.path.join(workdir, 'eval')


def extractor_from_config(config, *, workdir=None, inception_weights=None, mesh=None,
                          required=True):
  """The extractor for a run's sample metrics, with its files cached in workdir/eval.

  Digits runs use the digits classifier unless Inception weights are given.
  Other data sets need Inception weights: without them this raises
  InceptionWeightsError, or returns None when `required` is False.
  """
  weights = inception_weights or config.eval.get('inception_weights', '')
  if config.data.dataset == 'digits' and not weights:
    size = int(config.data.image_size)
    cache = os.path.join(eval_dir(workdir), f'digits_classifier_{size}px.npz') if workdir else None
    return DigitsExtractor.load_or_train(cache, image_size=size)
  if not weights and not required:
    return None
  return InceptionExtractor.from_weights(weights, mesh=mesh)


def held_out_bits_per_dim(config, model_fn, schedule, key, *, num_examples=None, mesh=None):
  """bits_per_dim of the first `num_examples` images of config.data.eval_split."""
  batches = list(data.eval_batches(config, batch_size=1024, num_examples=num_examples))
  images = np.concatenate([b['x'] for b in batches])
  cond = jax.tree.map(lambda *a: np.concatenate(a), *[b['cond'] for b in batches])
  types = factories.diffusion_types(config)
  return bits_per_dim(model_fn, schedule, images, key, cond=cond,
                      batch_size=int(config.eval.get('batch_size', config.sampling.batch_size)),
                      mesh=mesh, model_mean_type=types['model_mean_type'],
                      model_var_type=types['model_var_type'],
                      clip_denoised=bool(config.sampling.clip_denoised))


_BPD_LOG_KEYS = ('bpd', 'prior_bpd', 'decoder_bpd', 'terms_bpd')


def training_metrics(config, model, schedule, params, mesh, *, step, workdir=None):
  """Metrics every config.training.eval_every steps, with the (EMA) `params`.

  - bits/dim on the first config.eval.bpd_num_examples held-out images;
  - FID / IS / KID of config.eval.num_samples samples against the training set:
    the digits classifier for digits, Inception when config.eval.inception_weights
    is set (otherwise skipped).
  Returns {name: float}. All processes must call it.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(config.seed)), 0xE7A1), step)
  bpd_key, sample_key = jax.random.split(key)
  model_fn = models.make_model_fn(model, params)
  out = {}
  if int(config.eval.bpd_num_examples) > 0:
    bpd = held_out_bits_per_dim(config, model_fn, schedule, bpd_key,
                                num_examples=int(config.eval.bpd_num_examples), mesh=mesh)
    out.update({k: bpd[k] for k in _BPD_LOG_KEYS})
  num_samples = int(config.eval.num_samples)
  extractor = extractor_from_config(config, workdir=workdir, mesh=mesh, required=False)
  if num_samples > 1 and extractor is not None:
    ref = dataset_reference_stats(config, extractor,
                                  cache_dir=eval_dir(workdir) if workdir else None)
    # config.sampling's solver, through the package's one sampling loop.
    samples = sample.generate(config, params, num_samples=num_samples, key=sample_key,
                              mesh=mesh)['samples']
    out.update(scalars(compute_metrics(samples, ref, extractor=extractor)))
  return out


RUN_METRICS = METRICS + ('bpd',)


def parse_metrics(names):
  """'fid,is,kid,bpd' (or a sequence) -> tuple of names; unknown names raise EvaluationError."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(',')]
  names = tuple(n for n in names if n)
  unknown = [n for n in names if n not in RUN_METRICS]
  if unknown:
    raise EvaluationError(f'unknown metrics {unknown}; choose from {",".join(RUN_METRICS)}')
  return names


def prepare_run_metrics(workdir, metrics, *, inception_weights=None, mesh=None):
  """Checks `metrics` for the run in `workdir` before any sampling; returns the extractor
  (None when only bpd is asked for). Raises EvaluationError / InceptionWeightsError."""
  metrics = parse_metrics(metrics)
  if not set(metrics) & set(METRICS):
    return None
  try:
    config = runs.read_config(workdir)
  except FileNotFoundError as e:
    raise EvaluationError(str(e)) from e
  return extractor_from_config(config, workdir=workdir, inception_weights=inception_weights,
                               mesh=mesh)


def evaluate_run(workdir, images, *, metrics, extractor=None, bpd_num_examples=None,
                 mesh=None, seed=0):
  """Metrics of a trained run: sample quality of `images` and held-out bits/dim.

  Args:
    workdir: the run directory (config.json + checkpoints; reference statistics
      and the digits classifier are cached in workdir/eval).
    images: samples [N, H, W, C] uint8 (or float in [-1, 1]); unused for bpd only.
    metrics: names from RUN_METRICS ('fid', 'is', 'kid', 'bpd').
    extractor: from `prepare_run_metrics` (needed for fid / is / kid).
    bpd_num_examples: held-out images for bpd (default config.eval.bpd_num_examples;
      0: the whole eval split).
    mesh: device mesh for bits/dim and Inception (default: all devices).
    seed: PRNG seed of the bits/dim x_t draws and the KID subsets.

  Returns:
    {name: float} plus, for bpd, per-timestep [T] arrays (vb_per_t, mse_per_t,
    xstart_mse_per_t).
  """
  metrics = parse_metrics(metrics)
  config = runs.read_config(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  out = {}
  sample_metrics = tuple(m for m in metrics if m in METRICS)
  if sample_metrics:
    if extractor is None:
      raise EvaluationError(f'{sample_metrics} need a feature extractor (prepare_run_metrics)')
    ref = dataset_reference_stats(config, extractor, cache_dir=eval_dir(workdir))
    out.update(compute_metrics(images, ref, extractor=extractor, metrics=sample_metrics,
                               seed=seed))
  if 'bpd' in metrics:
    config, params, _ = runs.load_run(workdir, ema=True)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    model_fn = models.make_model_fn(factories.create_model(config), params)
    n = int(config.eval.bpd_num_examples) if bpd_num_examples is None else bpd_num_examples
    schedule = factories.schedule(config)
    out.update(held_out_bits_per_dim(config, model_fn, schedule, jax.random.key(seed),
                                     num_examples=n or None, mesh=mesh))
  return out


def write_json(path, metrics):
  """Writes the metrics as one JSON object (per-timestep arrays as lists)."""
  with open(path, 'w') as f:
    json.dump({k: (np.asarray(v).tolist() if np.ndim(v) else v if isinstance(v, int) else float(v))
               for k, v in metrics.items()}, f, indent=2, sort_keys=True)
    f.write('\n')
