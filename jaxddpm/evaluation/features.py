"""Feature extractors, reference statistics, and FID / IS / KID of images.

Features come from a `FeatureExtractor`: `InceptionExtractor` (FID Inception-v3,
`jaxddpm.models.inception`; needs the published weight file) or the offline
`DigitsExtractor` (`jaxddpm.digits_classifier`). Reference statistics of a
data set are computed once and cached as .npz; `compute_metrics` compares
images to them with the metrics of `jaxddpm.evaluation.metrics`.
"""

import dataclasses
import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import data
from jaxddpm import images as images_lib
from jaxddpm import parallel
from jaxddpm.digits_classifier import DigitsExtractor
from jaxddpm.evaluation import metrics as metrics_lib
from jaxddpm.models import inception


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
    batch_size = parallel.round_to_mesh(self.batch_size, self.mesh)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)  # one compile
      f, l = _inception_apply(self.variables, parallel.host_array_to_global(padded, self.mesh))
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
    stats = metrics_lib.FeatureStats.load(cache_path)
    if stats.extractor != extractor.name:
      raise ValueError(f'{cache_path} holds {stats.extractor!r} statistics, '
                       f'not {extractor.name!r}; delete it or choose another path')
    return stats
  feats, _ = extract_features(extractor, images)
  stats = metrics_lib.feature_stats(feats, extractor=extractor.name, max_features=max_features)
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
  if not isinstance(reference, metrics_lib.FeatureStats):
    reference = reference_stats(extractor, reference)
  elif reference.extractor != extractor.name:
    raise ValueError(f'reference statistics are {reference.extractor!r} features, '
                     f'not {extractor.name!r}')
  feats, logits = extract_features(extractor, samples)
  out = {}
  pre = extractor.prefix
  if 'fid' in metrics:
    stats = metrics_lib.feature_stats(feats)
    out[pre + 'fid'] = metrics_lib.frechet_distance(stats.mu, stats.sigma, reference.mu,
                                                    reference.sigma)
  if 'is' in metrics:
    # Fewer splits when parts would hold under 50 samples (IS of tiny parts is biased to 1).
    splits = max(1, min(is_splits, len(logits) // 50))
    out[pre + 'is'], out[pre + 'is_std'] = metrics_lib.inception_score(logits, splits=splits)
  if 'kid' in metrics:
    out[pre + 'kid'], out[pre + 'kid_std'] = metrics_lib.kid(
        feats, reference.features, num_subsets=kid_subsets, subset_size=kid_subset_size,
        seed=seed)
  return out


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
