"""Metrics of super-resolution: PSNR, SSIM, consistency and sharpness, next to bicubic.

All on uint8 images [N, H, W, C] (what samples.npz and the PNGs hold), per image, then
averaged over the N images:

  psnr          10 log10(255^2 / MSE) against the high-resolution ground truth
                (`skimage.metrics.peak_signal_noise_ratio`);
  ssim          the structural similarity of Wang et al. 2004 with a 7 x 7 uniform window
                over each channel (`skimage.metrics.structural_similarity`, channel_axis=-1);
  consistency   the PSNR of the output shrunk back to the low-res size (the same
                antialiased bicubic resize that made the low-res input,
                `jaxddpm.data.transforms.bicubic_resize`) against that input (SR3 sec. 4.1);
  hf_share      the high-frequency share of the power spectrum: with P(f) = |FFT2(g - mean g)|^2
                of the image's gray level g (the mean over channels), the fraction of the
                total power at radial frequencies |f| > 0.5 / factor cycles per pixel, i.e.
                above the Nyquist frequency of the low-res input (factor = H / h). Bicubic
                upsampling leaves that band almost empty; a sharp output should carry as
                much power there as the ground truth does. `hf_gap` = mean |hf_share(out) -
                hf_share(ground truth)| (smaller is closer).

`sr_metrics` reports each for the model ('sr_...'), for bicubic upsampling of the same
low-res inputs ('bicubic_...'), and for the mean of several samples per input when given
('mean_...'; the posterior-mean estimate that PSNR favours).
"""

from __future__ import annotations

import numpy as np

from jaxddpm import images as images_lib
from jaxddpm.data import pipeline
from jaxddpm.data import transforms


def held_out_pairs(config, num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(high-res uint8 [N, H, W, C], low-res uint8 [N, h, w, C]): the first `num` (default all)
  examples of the eval split of a super-resolution config."""
  batches = list(pipeline.eval_batches(config, batch_size=64, num_examples=num))
  high = np.concatenate([b['x'] for b in batches])
  low = np.concatenate([b['cond']['low_res'] for b in batches])
  return images_lib.to_uint8(high), images_lib.to_uint8(low)


def bicubic_upsample(low_res: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, h, w, C] -> uint8 [N, size, size, C] by PIL's bicubic interpolation."""
  return np.stack([transforms.bicubic_resize(np.asarray(im), size) for im in low_res])


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """float64 [N]: PSNR in dB of uint8 images against uint8 references (data range 255)."""
  from skimage import metrics  # pylint: disable=g-import-not-at-top
  return np.array([metrics.peak_signal_noise_ratio(r, i, data_range=255)
                   for i, r in zip(_check(images), _check(reference))])


def ssim(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """float64 [N]: SSIM (7 x 7 window, per channel) of uint8 images against references."""
  from skimage import metrics  # pylint: disable=g-import-not-at-top
  return np.array([metrics.structural_similarity(r, i, data_range=255, channel_axis=-1)
                   for i, r in zip(_check(images), _check(reference))])


def consistency_psnr(images: np.ndarray, low_res: np.ndarray) -> np.ndarray:
  """float64 [N]: PSNR of the images shrunk to the low-res size against the low-res inputs."""
  size = low_res.shape[1]
  shrunk = np.stack([transforms.bicubic_resize(np.asarray(im), size) for im in _check(images)])
  return psnr(shrunk, low_res)


def hf_share(images: np.ndarray, factor: float) -> np.ndarray:
  """float64 [N]: the share of each image's spectral power above 0.5 / factor cycles/pixel."""
  gray = _check(images).astype(np.float64).mean(axis=-1)
  gray = gray - gray.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(gray)) ** 2
  fy = np.fft.fftfreq(gray.shape[1])[:, None]
  fx = np.fft.fftfreq(gray.shape[2])[None, :]
  high = np.sqrt(fx ** 2 + fy ** 2) > 0.5 / factor
  total = power.sum(axis=(1, 2))
  return np.where(total > 0, (power * high).sum(axis=(1, 2)) / np.maximum(total, 1e-30), 0.0)


def comparison_grid(low_res: np.ndarray, high_res: np.ndarray, samples: np.ndarray, *,
                    padding: int = 2) -> np.ndarray:
  """uint8 rows of [low-res enlarged by pixel repetition | bicubic | sample | ground truth],
  one row per input: [N (H + p) + p, 4 (W + p) + p, C]."""
  low_res, high_res, samples = _check(low_res), _check(high_res), _check(samples)
  factor = high_res.shape[1] // low_res.shape[1]
  nearest = low_res.repeat(factor, axis=1).repeat(factor, axis=2)
  panels = [nearest, bicubic_upsample(low_res, high_res.shape[1]), samples, high_res]
  n, h, w, c = high_res.shape
  grid = np.zeros((n * (h + padding) + padding, 4 * (w + padding) + padding, c), np.uint8)
  for col, panel in enumerate(panels):
    for row in range(n):
      top, left = padding + row * (h + padding), padding + col * (w + padding)
      grid[top:top + h, left:left + w] = panel[row]
  return grid


def _check(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}')
  return images


def _scores(prefix: str, images, high_res, low_res, factor, truth_hf) -> dict[str, float]:
  hf = hf_share(images, factor)
  return {f'{prefix}_psnr': float(psnr(images, high_res).mean()),
          f'{prefix}_ssim': float(ssim(images, high_res).mean()),
          f'{prefix}_consistency': float(consistency_psnr(images, low_res).mean()),
          f'{prefix}_hf_share': float(hf.mean()),
          f'{prefix}_hf_gap': float(np.abs(hf - truth_hf).mean())}


def sr_metrics(samples: np.ndarray, high_res: np.ndarray, low_res: np.ndarray
               ) -> dict[str, float]:
  """The SR metrics (module docstring) of the model, of bicubic and of the sample mean.

  Args:
    samples: uint8 [N, H, W, C] (one sample per input) or [K, N, H, W, C] (K samples per
      input: 'sr_' scores every sample, 'mean_' the rounded mean over K).
    high_res: uint8 [N, H, W, C] ground truth.
    low_res: uint8 [N, h, w, C] the inputs.

  Returns:
    {'sr_psnr', 'sr_ssim', 'sr_consistency', 'sr_hf_share', 'sr_hf_gap', the same with
    'bicubic_' (and 'mean_' for K samples), 'truth_hf_share'}.
  """
  high_res, low_res = _check(high_res), _check(low_res)
  samples = np.asarray(samples)
  stacked = samples if samples.ndim == 5 else samples[None]
  k, n = stacked.shape[:2]
  if n != len(high_res) or stacked.shape[2:] != high_res.shape[1:]:
    raise ValueError(f'samples {samples.shape} do not match the ground truth {high_res.shape}')
  factor = high_res.shape[1] / low_res.shape[1]
  truth_hf = hf_share(high_res, factor)
  tile = lambda a: np.concatenate([a] * k)
  out = _scores('sr', stacked.reshape((k * n,) + stacked.shape[2:]), tile(high_res),
                tile(low_res), factor, tile(truth_hf))
  out.update(_scores('bicubic', bicubic_upsample(low_res, high_res.shape[1]), high_res,
                     low_res, factor, truth_hf))
  if k > 1:
    mean = np.clip(np.round(stacked.astype(np.float64).mean(axis=0)), 0, 255).astype(np.uint8)
    out.update(_scores('mean', mean, high_res, low_res, factor, truth_hf))
  out['truth_hf_share'] = float(truth_hf.mean())
  return out
