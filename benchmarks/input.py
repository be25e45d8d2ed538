r"""Images/s of the input pipeline alone: JPEG decode + crop/resize + flip + batch.

  python benchmarks/input.py [--num_images=512] [--batch_size=32] [--workers=0,1,2,4]
                             [--repeats=5] [--profile]

Writes `--num_images` JPEGs of 320x288 (smooth random colour fields, so they
compress like photographs rather than like noise) to a temporary folder, reads
them as `data.dataset = 'folder'` at 256x256 with random flips, and times
`--batches` batches after the first (which pays for starting workers). Rows:

  - `threads N`: the thread-pool prefetcher the pipeline had before Grain, N
    threads each computing whole batches (`Pipeline.batch`); decoding holds
    the GIL for part of each image, which is what threads cannot get around;
  - `grain N`: `Pipeline.iterate` with N Grain worker processes (0: in the
    main process, with Grain's reading threads), the images shipped as uint8
    and converted to float in the main process;
  - `grain N float32`: the same, but converted to float32 in the workers (as
    before the uint8 change), so 4x the bytes cross the processes.

Every row runs once per repeat, the rows of a repeat one after the other, so a
slow spell of a shared machine falls on all of them; it prints the median
images/s over the repeats, their range, and the median's speed-up over
`threads 2`. `--profile` adds the time of each stage for one image (and one
batch) in one thread, the ceiling that puts on any pipeline with all cores
busy, and cProfile's top functions of the in-process pipeline.
"""

import concurrent.futures
import cProfile
import copy
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import grain
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import data  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.data import transforms  # noqa: E402  pylint: disable=g-import-not-at-top

_NUM_IMAGES = flags.DEFINE_integer('num_images', 512, 'JPEGs written to the temp folder.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
_BATCHES = flags.DEFINE_integer('batches', 24, 'Timed batches per row (after one warm-up).')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2', '4'], 'Grain worker counts.')
_FLOAT_WORKERS = flags.DEFINE_list('float_workers', ['2'],
                                   'Worker counts of the float32-through-workers rows.')
_THREADS = flags.DEFINE_list('threads', ['2'], 'Thread-pool baseline thread counts.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Times each row runs; medians are reported.')
_PROFILE = flags.DEFINE_bool('profile', False, 'Also time each stage and run cProfile.')


def write_jpegs(directory: str, n: int) -> None:
  """n smooth 320x288 RGB JPEGs (quality 90): upsampled low-resolution noise."""
  rng = np.random.default_rng(0)
  for i in range(n):
    small = rng.integers(0, 256, (9, 10, 3), np.uint8)
    image = Image.fromarray(small).resize((320, 288), Image.BICUBIC)
    image.save(os.path.join(directory, f'{i:06d}.jpg'), quality=90)


def thread_batches(pipeline: data.Pipeline, num_threads: int, prefetch: int = 4):
  """The pre-Grain prefetcher: `batch(step)` for steps 0, 1, ... computed ahead in threads."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = [pool.submit(pipeline.batch, s) for s in range(prefetch)]
    step = prefetch
    while True:
      out = pending.pop(0).result()
      pending.append(pool.submit(pipeline.batch, step))
      step += 1
      yield out


class _ToFloat(grain.transforms.Map):
  """uint8 -> float32 [-1, 1] in the workers: the pipeline before batches crossed as uint8."""

  def map(self, element):
    return dict(element, x=transforms.uint8_to_float(element['x']))


def images_per_second(batches, num_batches: int, batch_size: int) -> float:
  next(batches)  # warm-up: worker start, first reads
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start)


def _rows(source):
  """(name, () -> a fresh batch iterator) for every row of the table."""
  def pipeline(src, workers=0):
    return data.Pipeline(src, global_batch_size=_BATCH.value, seed=0, random_flip=True,
                         num_workers=workers)
  float_source = copy.copy(source)
  float_source.transforms = (*source.transforms, _ToFloat())
  rows = [(f'threads {n}', lambda n=n: thread_batches(pipeline(source), n))
          for n in map(int, _THREADS.value)]
  rows += [(f'grain {n}', lambda n=n: pipeline(source, n).iterate(0))
           for n in map(int, _WORKERS.value)]
  rows += [(f'grain {n} float32', lambda n=n: pipeline(float_source, n).iterate(0))
           for n in map(int, _FLOAT_WORKERS.value)]
  return rows


def _stage_times(source, reps: int = 64) -> list[tuple[str, float]]:
  """Milliseconds of each stage, in one thread: per image, and per batch for the last ones."""
  decode, crop = source.transforms
  flip = transforms.RandomFlip()
  rng = np.random.default_rng(0)
  records = [source[i % len(source)] for i in range(reps)]

  def per_call(fn, items):
    start = time.perf_counter()
    out = [fn(item) for item in items]
    return out, (time.perf_counter() - start) * 1e3 / len(items)

  _, t_read = per_call(lambda i: source[i % len(source)], range(reps))
  decoded, t_decode = per_call(decode.map, records)
  cropped, t_crop = per_call(crop.map, decoded)
  flipped, t_flip = per_call(lambda e: flip.random_map(e, rng), cropped)
  b = _BATCH.value
  groups = [flipped[i:i + b] for i in range(0, len(flipped) - b + 1, b)] * 4
  stacked, t_stack = per_call(lambda g: np.stack([e['x'] for e in g]), groups)
  floats, t_float = per_call(transforms.uint8_to_float, stacked)
  _, t_copy_u8 = per_call(np.copy, stacked)
  _, t_copy_f32 = per_call(np.copy, floats)
  return [('read the file (per image)', t_read), ('decode, PIL (per image)', t_decode),
          ('crop + resize to 256, PIL (per image)', t_crop), ('flip (per image)', t_flip),
          (f'stack {b} images (per batch)', t_stack),
          ('uint8 -> float32 (per batch, main process)', t_float),
          (f'copy a uint8 batch, {stacked[0].nbytes >> 20} MiB (per batch)', t_copy_u8),
          (f'copy a float32 batch, {floats[0].nbytes >> 20} MiB (per batch)', t_copy_f32)]


def _profile(source) -> str:
  pipeline = data.Pipeline(source, global_batch_size=_BATCH.value, seed=0, random_flip=True)
  profiler = cProfile.Profile()
  profiler.enable()
  for step in range(_BATCHES.value):
    pipeline.batch(step)
  profiler.disable()
  out = io.StringIO()
  pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(12)
  return out.getvalue()


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, _NUM_IMAGES.value)
    source = data.FolderSource(folder, 256, 3)
    rows = _rows(source)
    rates = {name: [] for name, _ in rows}
    for _ in range(_REPEATS.value):
      for name, make in rows:
        it = make()
        rates[name].append(images_per_second(it, _BATCHES.value, _BATCH.value))
        it.close()
    if _PROFILE.value:
      stages = _stage_times(source)
      profile = _profile(source)
  load = os.getloadavg()
  print(f'# {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; '
        f'{_BATCH.value} images of 256x256 per batch; medians of {_REPEATS.value} repeats')
  medians = {name: statistics.median(r) for name, r in rates.items()}
  baseline = medians.get('threads 2', next(iter(medians.values())))
  for name, r in rates.items():
    print(f'{name:<16} {medians[name]:8.1f} images/s  ({min(r):6.1f} - {max(r):6.1f})  '
          f'{medians[name] / baseline:5.2f}x')
  if _PROFILE.value:
    print('\n# one thread, ms')
    for name, ms in stages:
      print(f'{name:<44} {ms:7.3f}')
    # The work of one image in any pipeline: its stages, and its share of a batch's stacking
    # (in the workers) and conversion (in the main process).
    per_image = sum(ms for _, ms in stages[:4]) + sum(ms for _, ms in stages[4:6]) / _BATCH.value
    cores = os.cpu_count()
    print(f'one image, all stages: {per_image:.2f} ms of CPU, so at most '
          f'{cores * 1e3 / per_image:.0f} images/s on {cores} fully used cores')
    print(f'\n# cProfile of Pipeline.batch over {_BATCHES.value} batches, in process')
    print(profile)


if __name__ == '__main__':
  app.run(main)
