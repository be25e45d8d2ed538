"""Input pipelines -> host-local NHWC float32 batches in [-1, 1].

Every data set is read through a *random-access source* (`len(source)`,
`source[i] -> (image, label)`, Grain's RandomAccessDataSource protocol), and
Grain defines the order (see `Pipeline`): the examples of step s are elements
[s * B, (s + 1) * B) of `MapDataset.source(source).shuffle(seed).repeat()`, a
new permutation every epoch, and the random flips are a Grain random map
seeded per element. A batch is therefore a pure function of (seed, step): a
resumed run sees exactly the batches an uninterrupted one would, with no replay
of skipped data; the global batch is the same whatever the number of processes
or Grain workers, and process p reads only rows [p * B_local, (p + 1) * B_local)
of it (its own slice of the files).

Sources:
  * `digits`: scikit-learn's bundled 8x8 digits (values 0..16 -> [-1, 1]),
    bilinearly resized to `data.image_size`; the last 297 images are the
    'test' split, the first 1500 'train'. Labels are the digit.
  * `folder`: PNG/JPEG files under `data.data_dir` (recursive, sorted),
    center-cropped to a square and resized with PIL (antialiased bicubic).
    With `model.num_classes > 0` the label is the index of the file's
    subfolder among the sorted subfolders.
  * any tensorflow-datasets name with an 'image' feature (`cifar10`,
    `celeb_a`, `lsun/bedroom`, ...): read through `tfds.data_source`, i.e. the
    ArrayRecord random-access format. A data set not yet in `data.data_dir` is
    downloaded and prepared in that format. Images are center-cropped to a
    square (when `data.center_crop`) and resized, as in DDPM's CelebA-HQ/LSUN
    setup; CIFAR-10 (already 32x32) is only scaled, x / 127.5 - 1.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np
from PIL import Image

DIGITS_NUM_TEST = 297  # last 297 of the 1797 images: the 'test' split
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


class DatasetError(ValueError):
  """A data configuration that cannot work (unknown data set, empty folder, ...)."""


# ---------------------------------------------------------------------------
# Per-example preprocessing (host, NumPy/PIL).


def center_crop_resize(image: np.ndarray, image_size: int, *, center_crop: bool = True) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [S, S, C]: central square crop, then PIL resize.

  PIL's bicubic filter widens its support when downsampling, i.e. it
  antialiases, which matters when LSUN/CelebA images shrink 4-8x.
  """
  h, w = image.shape[:2]
  if center_crop and h != w:
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((image_size, image_size), Image.BICUBIC))
  return out[..., None] if squeeze else out


def _match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 4 and channels == 3:
    return image[..., :3]
  if c in (3, 4) and channels == 1:
    # ITU-R 601-2 luma, as PIL's convert('L').
    rgb = image[..., :3].astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  raise DatasetError(f'Cannot convert a {c}-channel image to {channels} channels.')


def uint8_to_float(image: np.ndarray) -> np.ndarray:
  """uint8 {0..255} -> float32 [-1, 1]: x / 127.5 - 1 (DDPM, Sec. 3.3)."""
  return image.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------
# Random-access sources: len(source), source[i] -> (float32 [S, S, C] in [-1, 1], int label).


class ArraySource:
  """An in-memory data set: images float32 [N, S, S, C] in [-1, 1], labels int32 [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images
    self.labels = np.zeros(len(images), np.int32) if labels is None else labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return self.images[i], int(self.labels[i])

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


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


class FolderSource:
  """PNG/JPEG files under `directory`, decoded, cropped and resized on access."""

  def __init__(self, directory: str, image_size: int, channels: int, *,
               center_crop: bool = True, with_labels: bool = False):
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
    self.files = files
    self.image_size = image_size
    self.channels = channels
    self.center_crop = center_crop
    if with_labels:
      classes = sorted({os.path.relpath(os.path.dirname(f), directory) for f in files})
      index = {c: i for i, c in enumerate(classes)}
      self.classes = classes
      self.labels = np.array(
          [index[os.path.relpath(os.path.dirname(f), directory)] for f in files], np.int32)
    else:
      self.classes = []
      self.labels = np.zeros(len(files), np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    with Image.open(self.files[i]) as pil:
      pil = pil.convert('L' if self.channels == 1 else 'RGB')
      image = np.asarray(pil)
    image = _match_channels(image, self.channels)
    image = center_crop_resize(image, self.image_size, center_crop=self.center_crop)
    return uint8_to_float(image), int(self.labels[i])


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
          f"Unknown dataset {name!r}: not 'digits', 'folder' or a tensorflow-datasets "
          f'name ({str(e).splitlines()[0]}).') from e
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
    self.image_size = image_size
    self.channels = channels
    self.center_crop = center_crop
    self.with_labels = with_labels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    example = self._source[int(i)]
    image = _match_channels(np.asarray(example['image']), self.channels)
    image = center_crop_resize(image, self.image_size, center_crop=self.center_crop)
    label = int(example['label']) if self.with_labels else 0
    return uint8_to_float(image), label


def create_source(data_config, *, split: str, num_classes: int = 0):
  """The random-access source named by `config.data` for `split`."""
  name = data_config.dataset
  size, channels = int(data_config.image_size), int(data_config.channels)
  with_labels = num_classes > 0
  if name == 'digits':
    return digits_source(split, size, channels)
  if name == 'folder':
    return FolderSource(data_config.data_dir, size, channels,
                        center_crop=data_config.center_crop, with_labels=with_labels)
  return TFDSSource(name, split, size, channels, data_dir=data_config.data_dir,
                    center_crop=data_config.center_crop, with_labels=with_labels)


# ---------------------------------------------------------------------------
# Batching, shuffling, sharding and prefetch: Grain.

# Tags that give the flips a stream of their own, never the shuffle's.
_FLIP_SEED_TAG = 0x5F11B


def default_num_workers() -> int:
  """Grain worker processes for `data.num_workers = -1`: min(4, cores - 1), 0 on one core.

  One core stays with the main process, which only feeds the devices.
  """
  return max(0, min(4, (os.cpu_count() or 1) - 1))


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Grain worker init: the worker exits soon after the main process dies.

  A SIGKILLed training process would otherwise leave its workers running, holding its
  stdout open and the host's memory; a resumed run starts its own.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name='jaxddpm-parent-watch').start()


def _as_example(element) -> dict[str, np.ndarray]:
  image, label = element
  return {'x': np.asarray(image, np.float32), 'label': np.int32(label)}


class _RandomFlip(grain.transforms.RandomMap):
  """Mirrors an image left-right with probability 1/2.

  Grain seeds `rng` from (seed, position in the stream), so a flip does not
  depend on which process or worker reads the example.
  """

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, x=element['x'][:, ::-1])
    return element


class _ToBatch(grain.transforms.Map):
  """{'x', 'label'} rows -> the training batch layout {'x', 'cond'}."""

  def __init__(self, with_labels: bool):
    self.with_labels = with_labels

  def map(self, element):
    x = np.ascontiguousarray(element['x'], np.float32)
    cond = {'label': np.asarray(element['label'], np.int32)} if self.with_labels else {}
    return {'x': x, 'cond': cond}


class Pipeline:
  """Host-local training batches as a pure function of (seed, step), defined by Grain.

  The stream is `MapDataset.source(source).shuffle(seed).repeat()`: every
  epoch a permutation of the N examples, reseeded by Grain with the epoch.
  Global batch b is elements [b * B, (b + 1) * B) of it, and process p of P
  reads rows [p * L, (p + 1) * L) (L = B / P): local batches of L consecutive
  elements, of which process p takes b * P + p. So the examples of a step,
  and their flips, do not depend on the number of processes or workers.

  `batch(step)` -> {'x': float32 [L, S, S, C] in [-1, 1],
  'cond': {'label': int32 [L]}} (cond {} unless `with_labels`), by random
  access; `iterate(start)` yields the same batches from `num_workers` Grain
  worker processes.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int,
               random_flip: bool = False, with_labels: bool = False,
               process_index: int = 0, process_count: int = 1,
               num_workers: int = 0):
    if global_batch_size % process_count:
      raise DatasetError(
          f'Global batch {global_batch_size} is not divisible by {process_count} processes.')
    if len(source) == 0:
      raise DatasetError('The data set is empty.')
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = int(seed)
    self.random_flip = random_flip
    self.with_labels = with_labels
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = default_num_workers() if num_workers < 0 else int(num_workers)
    stream = self._order(grain.MapDataset.source(source)).map(_as_example)
    if random_flip:
      stream = stream.random_map(_RandomFlip(), seed=(self.seed + _FLIP_SEED_TAG) % 2**32)
    local = stream.batch(self.local_batch_size, drop_remainder=True).map(_ToBatch(with_labels))
    # Local batch k holds rows [(k % P) * L, (k % P + 1) * L) of global batch k // P.
    self._batches = local[process_index::process_count]

  def _order(self, dataset: grain.MapDataset) -> grain.MapDataset:
    """The one definition of the example order: a fresh Grain shuffle every epoch."""
    return dataset.shuffle(seed=self.seed).repeat()

  def global_indices(self, step: int) -> np.ndarray:
    """Source indices of the global batch of `step`: int64 [B]."""
    b = self.global_batch_size
    order = self._order(grain.MapDataset.range(len(self.source)))
    return np.array([order[i] for i in range(step * b, (step + 1) * b)], np.int64)

  def batch(self, step: int) -> dict[str, Any]:
    return self._batches[step]

  def iterate(self, start_step: int, *, prefetch: int = 4) -> Iterator[dict[str, Any]]:
    """Batches of steps start_step, start_step + 1, ..., from Grain worker processes.

    Grain slices the batches among the workers and interleaves their outputs
    back in order, so the stream is `batch(step)` for any number of workers.
    """
    dataset = self._batches[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(4, prefetch)), prefetch_buffer_size=prefetch))
    if self.num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # Grain reads its absl flags when it starts workers; in a library call (tests,
        # notebooks) nobody parsed them, and their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.num_workers,
                                       per_worker_buffer_size=prefetch),
          worker_init_fn=_exit_with_parent)
    iterator = iter(dataset)
    try:
      yield from iterator
    finally:
      close = getattr(iterator, 'close', None)
      if close is not None:
        close()


def create_train_pipeline(config, *, process_index: int = 0,
                          process_count: int = 1) -> Pipeline:
  """The training pipeline of `config` (data.split, batch size, seed, flips, labels, workers)."""
  num_classes = int(config.model.num_classes)
  source = create_source(config.data, split=config.data.split, num_classes=num_classes)
  return Pipeline(
      source,
      global_batch_size=int(config.training.batch_size),
      seed=int(config.seed),
      random_flip=bool(config.data.random_flip),
      with_labels=num_classes > 0,
      process_index=process_index,
      process_count=process_count,
      num_workers=int(config.data.get('num_workers', -1)))


def eval_batches(config, *, batch_size: int, num_examples: int | None = None,
                 split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The first `num_examples` images of the eval split in order, no flips.

  Yields {'x': [b, S, S, C], 'cond': {'label': [b]}} ({} without labels), b <= batch_size (the last
  batch may be short). Not sharded across processes.
  """
  num_classes = int(config.model.num_classes)
  source = create_source(config.data, split=split or config.data.eval_split,
                         num_classes=num_classes)
  n = len(source) if num_examples is None else min(num_examples, len(source))
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    if isinstance(source, ArraySource):
      images, labels = source.get_batch(idx)
    else:
      examples = [source[int(i)] for i in idx]
      images = np.stack([e[0] for e in examples])
      labels = np.array([e[1] for e in examples], np.int32)
    cond = {'label': np.asarray(labels, np.int32)} if num_classes > 0 else {}
    yield {'x': np.asarray(images, np.float32), 'cond': cond}


def stack_batches(batches: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """k batches (pytrees of [B, ...]) -> one of [k, B, ...] (for several train steps per call)."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *batches)
