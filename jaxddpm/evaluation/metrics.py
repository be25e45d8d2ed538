"""Metrics of feature sets, in float64 NumPy, and `FeatureStats`, their cached Gaussian fit.

The sample-quality numbers of the DDPM paper's Table 1 (CIFAR-10: FID 3.17,
IS 9.46), computed the way the community computes them:

- Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to
  features, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64 with
  pytorch-fid's numerical care for the matrix square root.
- Inception Score (Salimans et al. 2016), exp(E_x KL(p(y|x) || p(y))), mean and
  standard deviation over 10 splits.
- KID (Binkowski et al. 2018), the unbiased MMD^2 with the polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""

import dataclasses
import os
import warnings

import numpy as np
from scipy import linalg


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
