"""Training and evaluation batches from a source, by Grain.

The examples of training step s are elements [s * B, (s + 1) * B) of
`MapDataset.source(source).shuffle(seed).repeat()` (`Pipeline._order`, the one
definition of the order), a new permutation every epoch; the source's
transformations (decode, crop/resize, the choice of one of an image's captions) and the
random flips, Grain random maps seeded per element of the stream, follow; with a
tokenizer, each caption becomes its tokens (`text.Tokenize`); Grain batches and hands
process p its rows. A batch is therefore a pure function of (seed, step): a resumed run
sees exactly the batches an uninterrupted one would, with no replay of skipped data, and
the global batch is the same whatever the number of processes or Grain workers.
Evaluation reads the source in its own order, unshuffled (`eval_batches`).
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

from jaxddpm.data import sources
from jaxddpm.data import text
from jaxddpm.data import transforms
from jaxddpm.data.transforms import DatasetError

# Tags that give the flips and the sources' random maps (caption choice) streams of their
# own, never the shuffle's nor each other's.
_FLIP_SEED_TAG = 0x5F11B
_SOURCE_SEED_TAG = 0xCA971


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


def examples(dataset: grain.MapDataset, source, *, seed: int = 0) -> grain.MapDataset:
  """`dataset` (of `source`'s records) with the source's transformations applied:
  elements {'x': uint8 (float32 for in-memory sets) [H, W, C], 'label': int}, with 'text'
  (str) for captioned sources and the sources' other keys (digit_pairs' 'left', 'right').

  Random transformations (`transforms.ChooseCaption`) are seeded from `seed` and the
  element's position in `dataset`, so a repeated stream draws anew each epoch.
  """
  for transform in source.transforms:
    if isinstance(transform, grain.transforms.RandomMap):
      dataset = dataset.random_map(transform, seed=(int(seed) + _SOURCE_SEED_TAG) % 2**32)
    else:
      dataset = dataset.map(transform)
  return dataset


def _tokenized(dataset: grain.MapDataset, source, tokenizer, max_length: int) -> grain.MapDataset:
  """Elements with 'tokens' int32 [max_length] for their 'text' (`text.Tokenize`)."""
  if not getattr(source, 'captioned', False):
    raise DatasetError(f'A tokenizer was given, but {type(source).__name__} has no captions.')
  if max_length < 2:
    raise DatasetError(f'data.max_text_length must be >= 2 (BOS and EOS), got {max_length}.')
  return dataset.map(text.Tokenize(tokenizer, max_length))


def _read(dataset: grain.MapDataset, *, num_workers: int, prefetch: int) -> grain.IterDataset:
  """`dataset` as an iterator dataset read by Grain's threads, or by `num_workers` worker
  processes, which Grain interleaves back into the dataset's order."""
  out = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, min(4, prefetch)), prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when it starts workers; in a library call (tests,
      # notebooks) nobody parsed them, and their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
        worker_init_fn=_exit_with_parent)
  return out


class Pipeline:
  """Host-local training batches as a pure function of (seed, step), defined by Grain.

  Global batch b is elements [b * B, (b + 1) * B) of the stream (see the module
  docstring), and process p of P reads rows [p * L, (p + 1) * L) (L = B / P):
  local batches of L consecutive elements, of which process p takes b * P + p.
  So the examples of a step, and their flips, do not depend on the number of
  processes or workers.

  `batch(step)` -> {'x': float32 [L, H, W, C] in [-1, 1],
  'cond': {'label': int32 [L]}} (no 'label' unless `with_labels`), by random
  access; `iterate(start)` yields the same batches from `num_workers` Grain
  worker processes, which ship the images as uint8. With a `tokenizer` (a
  `tokenizers.Tokenizer`, `jaxddpm.data.text`) the source must be captioned, and cond
  holds 'tokens' int32 [L, max_text_length], the tokens of each example's caption.

  Random flips mirror the whole image, not its caption ("a 3 on the left ..."): a
  captioned run should train without them.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int,
               random_flip: bool = False, with_labels: bool = False,
               process_index: int = 0, process_count: int = 1,
               num_workers: int = 0, low_res_size: int = 0,
               tokenizer=None, max_text_length: int = 0):
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
    self.low_res_size = int(low_res_size)
    self.tokenizer = tokenizer
    self.max_text_length = int(max_text_length) if tokenizer is not None else 0
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = default_num_workers() if num_workers < 0 else int(num_workers)
    stream = examples(self._order(grain.MapDataset.source(source)), source, seed=self.seed)
    if random_flip:
      stream = stream.random_map(transforms.RandomFlip(),
                                 seed=(self.seed + _FLIP_SEED_TAG) % 2**32)
    if self.low_res_size:  # after the flips: the pair is of the flipped image
      stream = stream.map(transforms.LowRes(self.low_res_size))
    if tokenizer is not None:
      stream = _tokenized(stream, source, tokenizer, self.max_text_length)
    local = stream.batch(self.local_batch_size, drop_remainder=True)
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

  def order_key(self) -> dict[str, Any]:
    """What the stream of batches depends on (besides the data itself and the tokenizer's
    vocabulary): seed, number of examples, global batch size, flips, labels, and the token
    length when there are tokens."""
    key = {'seed': self.seed, 'num_examples': len(self.source),
           'global_batch_size': self.global_batch_size,
           'random_flip': bool(self.random_flip), 'with_labels': bool(self.with_labels)}
    if self.tokenizer is not None:  # only then, so that older checkpoints still resume
      key['max_text_length'] = self.max_text_length
    return key

  def batch(self, step: int) -> dict[str, Any]:
    return transforms.to_model_batch(self._batches[step], self.with_labels)

  def iterate(self, start_step: int, *, prefetch: int = 4) -> BatchIterator:
    """`batch(step)` for steps start_step, start_step + 1, ..., from Grain worker processes
    (`BatchIterator`, whose state goes into checkpoints)."""
    return BatchIterator(self, start_step, prefetch=prefetch)

  def grain_dataset(self, start_step: int, *, prefetch: int = 4) -> grain.IterDataset:
    """Grain's batches of steps start_step, ... before `to_model_batch` (uint8 images), read
    by `num_workers` worker processes."""
    return _read(self._batches[start_step:], num_workers=self.num_workers, prefetch=prefetch)


class BatchIterator(grain.DatasetIterator):
  """`Pipeline.batch(step)` for step = start, start + 1, ..., read by Grain.

  Grain slices the batches among the workers and interleaves their outputs back in
  order, so the stream is the same for any number of workers. The Grain iterator
  starts on the first `next` (or `start_prefetch`), so a `set_state` right after
  creation costs nothing.

  The state (`get_state`; saved with each checkpoint through Grain's Orbax handler) is
  {'next_step': the step of the next batch, **`Pipeline.order_key()`}. Its Grain
  iterator's own state would name the worker count and each worker's position; this one
  does not, since the pipeline is random access: a run may resume on other workers or
  processes. `set_state` moves the stream to the saved step after checking that the saved
  order key is this pipeline's; otherwise (e.g. the image folder lost files, or the seed
  changed) the saved data order cannot be continued and it raises DatasetError.
  """

  def __init__(self, pipeline: Pipeline, start_step: int, *, prefetch: int = 4):
    super().__init__()
    self.pipeline = pipeline  # what it reads: `Pipeline.batch(step)` for each step
    self._prefetch = prefetch
    self._step = int(start_step)
    self._iterator = None

  @property
  def step(self) -> int:
    """The step of the batch that `next` returns."""
    return self._step

  def start_prefetch(self) -> None:
    if self._iterator is None:
      self._assert_not_closed()
      self._iterator = iter(self.pipeline.grain_dataset(self._step, prefetch=self._prefetch))

  def __next__(self) -> dict[str, Any]:
    self.start_prefetch()
    batch = next(self._iterator)
    self._step += 1
    return transforms.to_model_batch(batch, self.pipeline.with_labels)

  def get_state(self) -> dict[str, Any]:
    return {'next_step': self._step, **self.pipeline.order_key()}

  def set_state(self, state: dict[str, Any]) -> None:
    key = self.pipeline.order_key()
    diffs = [f'{name} {state.get(name)!r} (saved) vs {value!r}'
             for name, value in key.items() if state.get(name) != value]
    if diffs or not isinstance(state.get('next_step'), int):
      raise DatasetError(
          'The data order saved with the checkpoint is not this pipeline\'s: '
          + ('; '.join(diffs) or f'no next_step in {state!r}')
          + '. Resume with the data it was trained on, or train in a new workdir.')
    self._stop()
    self._step = state['next_step']

  def _stop(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self) -> None:
    """Stops Grain's threads and worker processes."""
    self._stop()
    super().close()


def text_length(config) -> int:
  """config.data.max_text_length, the token length L of cond['tokens'] (default 16)."""
  return int(config.data.get('max_text_length', 16))


def create_train_pipeline(config, *, process_index: int = 0, process_count: int = 1,
                          tokenizer=None) -> Pipeline:
  """The training pipeline of `config` (data.split, batch size, seed, flips, labels, workers;
  with a `tokenizer`, tokens of data.max_text_length)."""
  num_classes = int(config.model.num_classes)
  source = sources.create_source(config.data, split=config.data.split, num_classes=num_classes)
  return Pipeline(
      source,
      global_batch_size=int(config.training.batch_size),
      seed=int(config.seed),
      random_flip=bool(config.data.random_flip),
      with_labels=num_classes > 0,
      process_index=process_index,
      process_count=process_count,
      num_workers=int(config.data.get('num_workers', -1)),
      low_res_size=int(config.data.get('low_res_size', 0)),
      tokenizer=tokenizer,
      max_text_length=text_length(config))


def eval_batches(config, *, batch_size: int, num_examples: int | None = None,
                 split: str | None = None, tokenizer=None) -> Iterator[dict[str, np.ndarray]]:
  """The first `num_examples` examples of the eval split in the source's order, no flips.

  Yields {'x': float32 [b, H, W, C] in [-1, 1], 'cond': {'label': int32 [b]}} (no 'label'
  without labels; with 'low_res' [b, s, s, C] for super-resolution configs; with 'tokens'
  int32 [b, data.max_text_length] given a `tokenizer`), b <= batch_size (the last batch may
  be short). A captioned tfds set's caption of each image is drawn with seed 0. Not sharded
  across processes; decoded by Grain's reading threads in this process.
  """
  num_classes = int(config.model.num_classes)
  source = sources.create_source(config.data, split=split or config.data.eval_split,
                                 num_classes=num_classes)
  n = len(source) if num_examples is None else min(num_examples, len(source))
  dataset = examples(grain.MapDataset.source(source)[:n], source)
  low_res_size = int(config.data.get('low_res_size', 0))
  if low_res_size:
    dataset = dataset.map(transforms.LowRes(low_res_size))
  if tokenizer is not None:
    dataset = _tokenized(dataset, source, tokenizer, text_length(config))
  dataset = dataset.batch(batch_size)
  for batch in _read(dataset, num_workers=0, prefetch=4):
    yield transforms.to_model_batch(batch, num_classes > 0)


def stack_batches(batches: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """k batches (pytrees of [B, ...]) -> one of [k, B, ...] (for several train steps per call)."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *batches)
