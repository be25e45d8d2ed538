"""Random-access sources (Grain's RandomAccessDataSource protocol): `len(source)`, `source[i]`.

`source[i]` is a *record*: cheap to read, decoded later by the Grain transformations in
`source.transforms` (in Grain's worker processes; see `jaxddpm.data.transforms`).

  * `digits`: scikit-learn's bundled 8x8 digits (values 0..16 -> [-1, 1]),
    bilinearly resized to `data.image_size`; the last 297 images are the
    'test' split, the first 1500 'train'. Labels are the digit. Records are
    ready examples {'x': float32 [S, S, 1], 'label'}; no transformations
    (`jaxddpm.data.digits`).
  * `digit_pairs`: two digits side by side on an S x 2S canvas (data.image_width = 2 *
    data.image_size) with a caption naming them, ten ordered pairs held out of training
    (`jaxddpm.data.digit_pairs`). Records are ready examples {'x', 'label', 'text', 'left',
    'right'}.
  * `photos`: the photographs bundled with scikit-image and scikit-learn, random crops
    for 'train' and tiles of three held-out photographs for 'test' (`jaxddpm.data.photos`).
  * `folder`: PNG/JPEG files under `data.data_dir` (recursive, sorted). Records
    are {'image': the file's bytes, 'label'}; decoded, center-cropped to a
    square and resized with PIL (antialiased bicubic). With `model.num_classes > 0`
    the label is the index of the file's subfolder among the sorted subfolders. A
    folder with Hugging Face `metadata.jsonl` files (lines {"file_name": path relative
    to the metadata file's folder, "text": caption}) is captioned: records add 'text',
    and every image must have exactly one caption line (`read_folder_captions`).
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
    only scaled, x / 127.5 - 1. A data set with a 'captions' feature (`coco_captions`:
    {'text': [5 strings]}) is captioned: records add 'captions', of which
    `transforms.ChooseCaption` keeps one as 'text', drawn anew each epoch.

The folder and array_record sources have no splits: every split is the whole set. The
captions of a folder are not carried into ArrayRecord shards by `jaxddpm.data.prepare`.

A captioned source has `captioned = True` and a `captions()` method listing every caption
of the split (`captions(source)`), from which the shell builds the tokenizer
(`jaxddpm.data.text`). Only 'digit_pairs' images are not square: every other source is
S x S, and data.image_width must be 0 (or S) for them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import grain
import numpy as np

from jaxddpm.data import digit_pairs
from jaxddpm.data import photos
from jaxddpm.data import transforms
from jaxddpm.data.digits import digits_source
from jaxddpm.data.transforms import DatasetError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

CAPTIONS_FILE = 'metadata.jsonl'  # a folder's captions, the Hugging Face imagefolder convention

# The converter's output folder: METADATA_FILE and the shards it names.
METADATA_FILE = 'metadata.json'
RECORD_FORMAT = 'jaxddpm.image_record.v1'
_LABEL = struct.Struct('<q')  # a record: int64 little-endian label, then the file's bytes


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


def _caption_lines(path: str) -> dict[str, str]:
  """{image path (normalised): caption} of one metadata.jsonl file."""
  folder = os.path.dirname(path)
  out = {}
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        name, text = entry['file_name'], entry['text']
      except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f'{path} line {number} is not a JSON object with "file_name" and '
                           f'"text" ({type(e).__name__}: {e}).') from e
      if not isinstance(text, str):
        raise DatasetError(f'{path} line {number}: "text" is not a string: {text!r}.')
      file = os.path.normpath(os.path.join(folder, name))
      if file in out:
        raise DatasetError(f'{path} line {number} captions {name!r} a second time.')
      out[file] = text
  return out


def read_folder_captions(directory: str, files: list[str]) -> list[str] | None:
  """The caption of each of `files` from the metadata.jsonl files under `directory`, or None
  when there is none (an uncaptioned folder).

  Raises:
    DatasetError: a caption line names a file that is not one of the folder's images, an
      image has no caption line, or a line is malformed.
  """
  texts = {}
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    if CAPTIONS_FILE in names:
      texts.update(_caption_lines(os.path.join(root, CAPTIONS_FILE)))
  if not texts:
    return None
  images = [os.path.normpath(f) for f in files]
  strays = sorted(set(texts) - set(images))
  if strays:
    raise DatasetError(f'{CAPTIONS_FILE} under {directory!r} captions {strays[0]!r}, which '
                       f'is not an image of the folder ({len(strays)} such line(s)).')
  uncaptioned = [f for f in images if f not in texts]
  if uncaptioned:
    raise DatasetError(f'Image {uncaptioned[0]!r} has no caption in the {CAPTIONS_FILE} files '
                       f'under {directory!r} ({len(uncaptioned)} image(s) without one).')
  return [texts[f] for f in images]


class FolderSource:
  """PNG/JPEG files under `directory`: records {'image': file bytes, 'label'}, and 'text'
  when the folder is captioned (`read_folder_captions`)."""

  def __init__(self, directory: str, image_size: int, channels: int, *,
               center_crop: bool = True, with_labels: bool = False):
    self.files, classes, labels = list_image_files(directory)
    self.classes = classes if with_labels else []
    self.labels = labels if with_labels else np.zeros(len(self.files), np.int32)
    self.texts = read_folder_captions(directory, self.files)
    self.captioned = self.texts is not None
    self.transforms = transforms.image_transforms(image_size, channels, center_crop)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    with open(self.files[i], 'rb') as f:
      record = {'image': f.read(), 'label': int(self.labels[i])}
    if self.texts is not None:
      record['text'] = self.texts[i]
    return record

  def captions(self) -> list[str]:
    return list(self.texts or ())


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
    # Not the builder: the source travels to Grain's workers, which need only the records.
    self._data_dir, self._split = data_dir or None, split
    self.captioned = 'captions' in features
    self.transforms = transforms.image_transforms(image_size, channels, center_crop)
    if self.captioned:
      self.transforms += (transforms.ChooseCaption(),)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    example = self._source[int(i)]
    label = int(example['label']) if self.with_labels else 0
    record = {'image': np.asarray(example['image']), 'label': label}
    if self.captioned:
      record['captions'] = _texts(example['captions']['text'])
    return record

  def captions(self) -> list[str]:
    """All captions of all images of the split, read without decoding the images."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not self.captioned:
      return []
    source = tfds.builder(self.name, data_dir=self._data_dir).as_data_source(
        split=self._split, decoders={'image': tfds.decode.SkipDecoding()})
    return [text for i in range(len(source)) for text in _texts(source[i]['captions']['text'])]


def _texts(values) -> tuple[str, ...]:
  """tfds strings (str or UTF-8 bytes) -> str."""
  return tuple(v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values)


def captions(source) -> list[str]:
  """Every caption of a captioned source's split (repeats kept), to build a tokenizer from."""
  if not getattr(source, 'captioned', False):
    raise DatasetError(f'{type(source).__name__} has no captions: text conditioning needs '
                       "'digit_pairs', a folder with metadata.jsonl or a tfds set with "
                       "'captions'.")
  return source.captions()


def create_source(data_config, *, split: str, num_classes: int = 0):
  """The random-access source named by `config.data` for `split` (data.dataset, image_size,
  image_width (default 0: square), channels, data_dir, center_crop, photo_size)."""
  name = data_config.dataset
  size, channels = int(data_config.image_size), int(data_config.channels)
  width = int(data_config.get('image_width', 0))
  with_labels = num_classes > 0
  if name == 'digit_pairs':
    return digit_pairs.digit_pairs_source(split, size, width, channels,
                                          float(data_config.get('half_captions', 0.0)))
  if width not in (0, size):
    raise DatasetError(f'data.image_width = {width}: only digit_pairs images are not square; '
                       f'set it to 0 for {name!r}.')
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
