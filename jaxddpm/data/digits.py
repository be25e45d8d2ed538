"""`digits`: scikit-learn's bundled 8x8 digits, and `ArraySource`, an in-memory data set.

The 1797 images (values 0..16) become x / 8 - 1 in [-1, 1] and are bilinearly resized to
`data.image_size`; the last DIGITS_NUM_TEST = 297 are the 'test' split, the first 1500
'train'. Labels are the digit. Records are ready examples {'x': float32 [S, S, 1], 'label'}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from jaxddpm.data.transforms import DatasetError

DIGITS_NUM_TEST = 297  # last 297 of the 1797 images: the 'test' split


class ArraySource:
  """An in-memory data set: images float32 [N, S, S, C] in [-1, 1], labels int32 [N]."""

  transforms = ()

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images
    self.labels = np.zeros(len(images), np.int32) if labels is None else labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {'x': self.images[i], 'label': int(self.labels[i])}


def digits_source(split: str, image_size: int, channels: int) -> ArraySource:
  """scikit-learn's 8x8 digits: values 0..16 -> x / 8 - 1, bilinear resize to image_size."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  if channels != 1:
    raise DatasetError(f'digits are grayscale: data.channels must be 1, got {channels}.')
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 8.0 - 1.0  # [1797, 8, 8] in [-1, 1]
  labels = digits.target.astype(np.int32)
  num_train = len(images) - DIGITS_NUM_TEST
  if split == 'train':
    images, labels = images[:num_train], labels[:num_train]
  elif split == 'test':
    images, labels = images[num_train:], labels[num_train:]
  elif split != 'all':
    raise DatasetError(f"digits has splits 'train', 'test' and 'all', not {split!r}.")
  if image_size != images.shape[1]:
    # Mode 'F' keeps the float values; bilinear interpolation cannot leave [-1, 1].
    images = np.stack([
        np.asarray(Image.fromarray(im, mode='F').resize((image_size, image_size), Image.BILINEAR))
        for im in images])
  return ArraySource(images[..., None].astype(np.float32), labels)
