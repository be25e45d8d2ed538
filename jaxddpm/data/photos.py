"""`photos`: the photographs that ship inside scikit-image and scikit-learn, for offline runs.

Real photographs of many kinds (a portrait, animals, objects, street and space scenes,
microscopy, textures), on disk with the two packages, so a super-resolution model trains
and is evaluated without a download.

  train (15):  skimage.data astronaut, rocket, stereo_motorcycle (left and right views),
               retina, hubble_deep_field, immunohistochemistry, camera, brick, grass,
               gravel, coins, moon, page; sklearn.datasets.load_sample_images china
  test (3):    skimage.data chelsea, coffee; sklearn load_sample_images flower

The held-out photographs are whole photographs no training crop comes from. Every photograph
is first scaled so its short side is `data.photo_size` pixels (PIL's antialiased bicubic),
converted to `data.channels` (gray ones repeated to RGB; RGB to luma for 1 channel). Then:

  * train: CROPS_PER_PHOTO crops of image_size x image_size per photograph, at positions drawn
    once from a fixed seed (record i is crop i // n of photograph i % n), so the records
    are random crops and still a pure function of the index (Grain shuffles and flips them);
  * test: each held-out photograph cut into the grid of non-overlapping image_size tiles
    centred on it (photo_size 128, image_size 64: 2 x 3 tiles of each, 18 in all).

Records are ready examples {'x': uint8 [S, S, C], 'label': 0}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxddpm.data import transforms
from jaxddpm.data.transforms import DatasetError

TRAIN_PHOTOS = ('astronaut', 'rocket', 'stereo_motorcycle_left', 'stereo_motorcycle_right',
                'retina', 'hubble_deep_field', 'immunohistochemistry', 'camera', 'brick',
                'grass', 'gravel', 'coins', 'moon', 'page', 'china')
TEST_PHOTOS = ('chelsea', 'coffee', 'flower')
CROPS_PER_PHOTO = 1024
_CROP_SEED = 0x5EED


def load_photo(name: str) -> np.ndarray:
  """The bundled photograph `name` (TRAIN_PHOTOS or TEST_PHOTOS) as uint8 [H, W] or [H, W, 3]."""
  if name in ('china', 'flower'):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    bunch = datasets.load_sample_images()
    files = [f.rsplit('/', 1)[-1] for f in bunch.filenames]
    return np.asarray(bunch.images[files.index(f'{name}.jpg')])
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetError(f'the photos data set needs scikit-image: pip install scikit-image ({e})'
                       ) from None
  if name.startswith('stereo_motorcycle_'):
    left, right, _ = data.stereo_motorcycle()
    return np.asarray(left if name.endswith('left') else right)
  if name not in TRAIN_PHOTOS + TEST_PHOTOS:
    raise DatasetError(f'unknown photograph {name!r}')
  return np.asarray(getattr(data, name)())


def scaled_photo(name: str, photo_size: int, channels: int) -> np.ndarray:
  """`load_photo(name)` with its short side scaled to photo_size: uint8 [h, w, channels]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = transforms.match_channels(load_photo(name), channels)
  h, w = image.shape[:2]
  scale = photo_size / min(h, w)
  size = (max(photo_size, round(w * scale)), max(photo_size, round(h * scale)))
  squeeze = channels == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image).resize(size, Image.BICUBIC)
  out = np.asarray(pil)
  return out[..., None] if squeeze else out


def tile_corners(shape: tuple[int, ...], size: int) -> list[tuple[int, int]]:
  """(top, left) of the non-overlapping size x size tiles of the grid centred on an image of
  `shape` [h, w, ...], row by row."""
  h, w = shape[:2]
  rows, cols = h // size, w // size
  top, left = (h - rows * size) // 2, (w - cols * size) // 2
  return [(top + r * size, left + c * size) for r in range(rows) for c in range(cols)]


class PhotoCrops:
  """Random-access size x size crops of a few photographs; crop i is at corners[i] =
  (photograph, top, left)."""

  transforms = ()

  def __init__(self, photos: list[np.ndarray], size: int, corners: np.ndarray):
    self.photos, self.size = photos, size
    self.corners = np.asarray(corners, np.int64).reshape(-1, 3)

  def __len__(self) -> int:
    return len(self.corners)

  def __getitem__(self, i: int) -> dict[str, Any]:
    p, top, left = self.corners[int(i)]
    image = self.photos[p][top:top + self.size, left:left + self.size]
    return {'x': np.ascontiguousarray(image), 'label': 0}


def random_corners(photos: list[np.ndarray], size: int, crops_per_photo: int,
                   seed: int) -> np.ndarray:
  """int64 [crops_per_photo * n, 3]: row i a uniform crop position of photograph i % n."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(crops_per_photo):
    for p, photo in enumerate(photos):
      rows.append((p, rng.integers(0, photo.shape[0] - size + 1),
                   rng.integers(0, photo.shape[1] - size + 1)))
  return np.array(rows, np.int64)


def photos_source(split: str, image_size: int, channels: int, photo_size: int) -> PhotoCrops:
  """The `photos` records of `split` ('train' or 'test'; module docstring)."""
  if channels not in (1, 3):
    raise DatasetError(f'photos have 1 or 3 channels, not data.channels = {channels}.')
  if image_size > photo_size:
    raise DatasetError(f'data.image_size = {image_size} is larger than data.photo_size = '
                       f'{photo_size} (the photographs\' short side); lower it or raise '
                       'data.photo_size.')
  if split not in ('train', 'test'):
    raise DatasetError(f"photos has splits 'train' and 'test', not {split!r}.")
  names = TRAIN_PHOTOS if split == 'train' else TEST_PHOTOS
  photos = [scaled_photo(n, photo_size, channels) for n in names]
  if split == 'train':
    return PhotoCrops(photos, image_size,
                      random_corners(photos, image_size, CROPS_PER_PHOTO, _CROP_SEED))
  corners = [(p, top, left) for p, photo in enumerate(photos)
             for top, left in tile_corners(photo.shape, image_size)]
  return PhotoCrops(photos, image_size, np.array(corners))
