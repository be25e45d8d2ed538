"""Random-access sources (Grain's RandomAccessDataSource protocol): `len(source)`, `source[i]`.

`source[i]` is a *record*: cheap to read, decoded later by the Grain transformations in
`source.transforms` (in Grain's worker processes; see `jaxddpm.data.transforms`).

  * `digits`: scikit-learn's bundled 8x8 digits (values 0..16 -> [-1, 1]),
    bilinearly resized to `data.image_size`; the last 297 images are the
    'test' split, the first 1500 'train'. Labels are the digit. Records are
    ready examples {'x': float32 [S, S, 1], 'label'}; no transformations.
  * `photos`: the photographs bundled with scikit-image and scikit-learn, random crops
    for 'train' and tiles of three held-out photographs for 'test' (`jaxddpm.data.photos`).
  * `folder`: PNG/JPEG files under `data.data_dir` (recursive, sorted). Records
    are {'image': the file's bytes, 'label'}; decoded, center-cropped to a
    square and resized with PIL (antialiased bicubic). With `model.num_classes > 0`
    the label is the index of the file's subfolder among the sorted subfolders.
  * `array_record`: a folder converted by `python -m jaxddpm.data.prepare`
    (`data.data_dir` is the converter's output): the same records, read
    sequentially from a few ArrayRecord shards through Grain's
    `ArrayRecordDataSource`, so its batches equal the folder's.
  * any tensorflow-datasets name with an 'image' feature (`cifar10`,
    `celeb_a`, `lsun/bedroom`, ...): read through `tfds.data_source`, i.e. the
    ArrayRecord random-access format. A data set not yet in `data.data_dir` is
    downloaded and prepared in that format. Records are {'image': uint8
    [H, W, C], 'label'}, center-cropped to a square (when `data.center_crop`)
    and resized, as in DDPM's CelebA-HQ/LSUN setup; CIFAR-10 (already 32x32) is
    only scaled, x / 127.5 - 1.

The folder and array_record sources have no splits: every split is the whole set.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxddpm.data import photos
from jaxddpm.data import transforms
from jaxddpm.data.transforms import DatasetError

DIGITS_NUM_TEST = 297  # last 297 of the 1797 images: the 'test' split
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

# The converter's output folder: METADATA_FILE and the shards it names.
METADATA_FILE = 'metadata.json'
RECORD_FORMAT = 'jaxddpm.image_record.v1'
_LABEL = struct.Struct('<q')  # a record: int64 little-endian label, then the file's bytes


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


def list_image_files(directory: str) -> tuple[list[str], list[str], np.ndarray]:
  """The image files under `directory` in the order every folder reader uses.

  Returns (files: sorted paths, walking subfolders in sorted order; classes: the sorted
  subfolders that hold images, relative to `directory` ('.' for the folder itself);
  labels: int32 [N], each file's index in `classes`).

  Raises:
    DatasetError: `directory` is empty (as a name), missing, or holds no image files.
  """
  if not directory:
    raise DatasetError("data.dataset='folder' needs data.data_dir, the image folder.")
  if not os.path.isdir(directory):
    raise DatasetError(f'Image folder {directory!r} does not exist.')
  files = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DatasetError(
        f'Image folder {directory!r} holds no {"/".join(IMAGE_EXTENSIONS)} files.')
  folders = [os.path.relpath(os.path.dirname(f), directory) for f in files]
  classes = sorted(set(folders))
  index = {c: i for i, c in enumerate(classes)}
  return files, classes, np.array([index[c] for c in folders], np.int32)


class FolderSource:
  """PNG/JPEG files under `directory`: records {'image': file bytes, 'label'}."""

  def __init__(self, directory: str, image_size: int, channels: int, *,
               center_crop: bool = True, with_labels: bool = False):
    self.files, classes, labels = list_image_files(directory)
    self.classes = classes if with_labels else []
    self.labels = labels if with_labels else np.zeros(len(self.files), np.int32)
    self.transforms = transforms.image_transforms(image_size, channels, center_crop)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    with open(self.files[i], 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[i])}


def encode_record(image_bytes: bytes, label: int) -> bytes:
  """One ArrayRecord record of the converter: the label (int64 LE), then the file's bytes."""
  return _LABEL.pack(int(label)) + image_bytes


def decode_record(record: bytes) -> tuple[bytes, int]:
  """Inverse of `encode_record`: (image file bytes, label)."""
  (label,) = _LABEL.unpack_from(record)
  return record[_LABEL.size:], label


def read_metadata(directory: str) -> dict[str, Any]:
  """The converter's metadata.json of `directory`; DatasetError when it is absent or foreign."""
  path = os.path.join(directory, METADATA_FILE)
  if not directory or not os.path.isfile(path):
    raise DatasetError(
        f"data.dataset='array_record' reads a folder written by `python -m "
        f"jaxddpm.data.prepare`: no {METADATA_FILE} in data.data_dir={directory!r}.")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f'Cannot read {path}: {e}') from e
  if not isinstance(metadata, dict) or metadata.get('format') != RECORD_FORMAT:
    raise DatasetError(f'{path} is not a {RECORD_FORMAT} metadata file.')
  return metadata


class ArrayRecordSource:
  """An image folder converted to ArrayRecord shards: the `FolderSource` records, in order."""

  def __init__(self, directory: str, image_size: int, channels: int, *,
               center_crop: bool = True, with_labels: bool = False):
    metadata = read_metadata(directory)
    paths = [os.path.join(directory, name) for name in metadata['shards']]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise DatasetError(f'ArrayRecord shard {missing[0]} named in {METADATA_FILE} is missing.')
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != metadata['num_examples']:
      raise DatasetError(f'{directory!r} holds {len(self._records)} records, its '
                         f'{METADATA_FILE} says {metadata["num_examples"]}.')
    self.classes = list(metadata['classes']) if with_labels else []
    self.with_labels = with_labels
    self.transforms = transforms.image_transforms(image_size, channels, center_crop)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    image, label = decode_record(self._records[int(i)])
    return {'image': image, 'label': label if self.with_labels else 0}


class TFDSSource:
  """A tensorflow-datasets split read by index (`tfds.data_source`, ArrayRecord)."""

  def __init__(self, name: str, split: str, image_size: int, channels: int, *,
               data_dir: str | None = None, center_crop: bool = True,
               with_labels: bool = False, download: bool = True):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DatasetError(
          f"data.dataset = {name!r} is read with tensorflow-datasets, which is not installed "
          "(it is optional): pip install -e '.[tfds]'. The bundled 'digits' and image "
          "'folder' sources need no TensorFlow.") from e
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises several types for unknown names
      raise DatasetError(
          f"Unknown dataset {name!r}: not 'digits', 'folder', 'array_record' or a "
          f'tensorflow-datasets name ({str(e).splitlines()[0]}).') from e
    features = builder.info.features
    if 'image' not in features:
      raise DatasetError(f'tfds dataset {name!r} has no "image" feature.')
    if with_labels and 'label' not in features:
      raise DatasetError(
          f'model.num_classes > 0 but tfds dataset {name!r} has no "label" feature.')
    if download and not builder.is_prepared():
      # ArrayRecord gives the random access that exact resumption relies on.
      builder.download_and_prepare(file_format='array_record')
    try:
      self._source = builder.as_data_source(split=split)
    except Exception as e:
      raise DatasetError(
          f'Cannot read {name!r} split {split!r} by index ({type(e).__name__}: {e}). '
          'jaxddpm reads tfds data sets in the ArrayRecord format: prepare it with '
          f'`tfds build {name} --file_format=array_record` or point data.data_dir '
          'at an empty folder to download it again.') from e
    self.name = name
    self.with_labels = with_labels
    self.transforms = transforms.image_transforms(image_size, channels, center_crop)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    example = self._source[int(i)]
    label = int(example['label']) if self.with_labels else 0
    return {'image': np.asarray(example['image']), 'label': label}


def create_source(data_config, *, split: str, num_classes: int = 0):
  """The random-access source named by `config.data` for `split`."""
  name = data_config.dataset
  size, channels = int(data_config.image_size), int(data_config.channels)
  with_labels = num_classes > 0
  if name == 'digits':
    return digits_source(split, size, channels)
  if name == 'photos':
    return photos.photos_source(split, size, channels, int(data_config.get('photo_size', 128)))
  if name in ('folder', 'array_record'):
    source_class = FolderSource if name == 'folder' else ArrayRecordSource
    return source_class(data_config.data_dir, size, channels,
                        center_crop=data_config.center_crop, with_labels=with_labels)
  return TFDSSource(name, split, size, channels, data_dir=data_config.data_dir,
                    center_crop=data_config.center_crop, with_labels=with_labels)
