r"""Images/s of the input pipeline alone: JPEG decode + crop/resize + flip + batch.

  python benchmarks/input.py [--num_images=512] [--batch_size=32] [--workers=0,1,2,4]

Writes `--num_images` JPEGs of 320x288 (smooth random colour fields, so they
compress like photographs rather than like noise) to a temporary folder, reads
them as `data.dataset = 'folder'` at 256x256 with random flips, and times
`--batches` batches after the first (which pays for starting workers):

  - `threads N`: the thread-pool prefetcher the pipeline had before Grain, N
    threads each computing whole batches (`Pipeline.batch`); decoding holds
    the GIL for part of each image, which is what threads cannot get around;
  - `grain N`: `Pipeline.iterate` with N Grain worker processes (0: in the
    main process, with Grain's reading threads).

Prints one line per row: name, images/s, and the speed-up over `threads 2`.
"""

import concurrent.futures
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import data  # noqa: E402  pylint: disable=g-import-not-at-top

_NUM_IMAGES = flags.DEFINE_integer('num_images', 512, 'JPEGs written to the temp folder.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
_BATCHES = flags.DEFINE_integer('batches', 12, 'Timed batches per row (after one warm-up).')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2', '4'], 'Grain worker counts.')
_THREADS = flags.DEFINE_list('threads', ['2'], 'Thread-pool baseline thread counts.')


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


def images_per_second(batches, num_batches: int, batch_size: int) -> float:
  next(batches)  # warm-up: worker start, first reads
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, _NUM_IMAGES.value)
    source = data.FolderSource(folder, 256, 3)
    rows = []
    for threads in map(int, _THREADS.value):
      pipeline = data.Pipeline(source, global_batch_size=_BATCH.value, seed=0, random_flip=True)
      it = thread_batches(pipeline, threads)
      rows.append((f'threads {threads}', images_per_second(it, _BATCHES.value, _BATCH.value)))
      it.close()
    for workers in map(int, _WORKERS.value):
      pipeline = data.Pipeline(source, global_batch_size=_BATCH.value, seed=0,
                               random_flip=True, num_workers=workers)
      it = pipeline.iterate(0)
      rows.append((f'grain {workers}', images_per_second(it, _BATCHES.value, _BATCH.value)))
      it.close()
  baseline = dict(rows).get('threads 2', rows[0][1])
  print(f'# {os.cpu_count()} cores, {_BATCH.value} images of 256x256 per batch')
  for name, rate in rows:
    print(f'{name:<12} {rate:8.1f} images/s  {rate / baseline:5.2f}x')


if __name__ == '__main__':
  app.run(main)
