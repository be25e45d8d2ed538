"""Images on the host: [-1, 1] floats <-> uint8, sample grids, PNG files.

The one place that converts samples to pixels, so what the metrics see, what
samples.npz holds and what the grids show are the same uint8 values.
"""

from __future__ import annotations

import math

import numpy as np


def quantize(images) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1] on the 8-bit grid {2k/255 - 1}.

  What a sample becomes when it is saved as a PNG: metrics and the decoder's discretised
  likelihood (DDPM eq. 13) see the same values whether the images come from the sampler or
  from files.
  """
  return np.float32(to_uint8(images)) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] (or uint8) images -> uint8 [0, 255]: round((x + 1) * 127.5), clipped."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, *, padding: int = 2) -> np.ndarray:
  """[N, H, W, C] images (floats in [-1, 1] or uint8) -> uint8 [rows*(H+p)+p, cols*(W+p)+p, C].

  cols = ceil(sqrt(N)); empty cells and padding are black.
  """
  pixels = to_uint8(images)
  n, h, w, c = pixels.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = padding + r * (h + padding), padding + q * (w + padding)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  """Writes one uint8 [H, W, C] image (C = 1 as grayscale) as a PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def save_image_grid(images, path: str) -> None:
  """Writes `image_grid(images)` as a PNG."""
  save_png(image_grid(images), path)
