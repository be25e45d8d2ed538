r"""Quality and speed of a progressive distillation's students next to their teacher.

  python benchmarks/distill.py --workdir=runs/digits_pd [--num=1000]

Rows: the teacher with DDPM at 200 steps and with DDIM at each student's step count
(DDIM needs >= 2 steps), then every finished student (`run_sample.py --workdir=W --steps=N`'s
samples). Each row samples `--num` images from the same seed and scores them with the
run's metric against the training data: digits_fid / digits_is for digits runs (the offline
digits classifier), FID / IS with --inception_weights otherwise. Also the wall time of
sampling (compilation included) and of each round's distillation (from its metrics.jsonl).
Prints a markdown table; --students=4,2 limits the rows to those students (no teacher rows).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import distill_layout  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'A distillation workdir.')
_NUM = flags.DEFINE_integer('num', 1000, 'Samples per row.')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Samples per compiled call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every row.')
_INCEPTION = flags.DEFINE_string('inception_weights', None, 'Inception weights (non-digits).')
_STUDENTS = flags.DEFINE_list('students', None, 'Only these students (steps), no teacher rows.')
flags.mark_flags_as_required(['workdir'])


def _round_seconds(rdir: str) -> float:
  """Training wall time of a round: the sum of its logged intervals (steps / steps_per_sec)."""
  total, last = 0.0, 0
  with open(os.path.join(rdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'steps_per_sec' in row:
        total += (row['step'] - last) / row['steps_per_sec']
        last = row['step']
  return total


def _timed(config, params, **kw):
  """(samples, seconds), compilation included."""
  began = time.perf_counter()
  out = sample.generate(config, params, num_samples=_NUM.value, batch_size=_BATCH.value,
                        seed=_SEED.value, **kw)['samples']
  return out, time.perf_counter() - began


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config = runs.read_config(workdir)
  if 'distill' not in config:
    raise app.UsageError(f'{workdir!r} is not a distillation workdir')
  done = distill_layout.finished_rounds(workdir)
  teacher_dir = str(config.distill.teacher)
  t_config, t_params, _ = runs.load_run(teacher_dir)
  extractor = evaluation.extractor_from_config(t_config, workdir=teacher_dir,
                                               inception_weights=_INCEPTION.value, required=True)
  reference = evaluation.dataset_reference_stats(t_config, extractor)

  rows = []
  if _STUDENTS.value is None:
    rows.append(('teacher DDPM', 200, t_config, t_params, dict(sampler='ddpm', steps=200), None))
    for steps in sorted(done, reverse=True):
      if steps >= 2:
        rows.append(('teacher DDIM', steps, t_config, t_params,
                     dict(sampler='ddim', steps=steps), None))
  else:
    done = {int(n): done[int(n)] for n in _STUDENTS.value if int(n) in done}
  for steps in sorted(done, reverse=True):
    s_config, s_params, _ = runs.load_run(done[steps])
    rows.append(('student', steps, s_config, s_params, dict(steps=steps), done[steps]))

  pre = extractor.prefix
  print(f'| sampler | steps | {pre}fid | {pre}is | sampling {_NUM.value} images (s) | '
        'distillation of the round (s) |')
  print('|---|---|---|---|---|---|')
  for name, steps, cfg, params, kw, rdir in rows:
    images, seconds = _timed(cfg, params, **kw)
    metrics = evaluation.scalars(evaluation.compute_metrics(
        images, reference, extractor=extractor, metrics=('fid', 'is')))
    train_s = f'{_round_seconds(rdir):.0f}' if rdir else ''
    print(f'| {name} | {steps} | {metrics[pre + "fid"]:.2f} | {metrics[pre + "is"]:.2f} | '
          f'{seconds:.1f} | {train_s} |', flush=True)


if __name__ == '__main__':
  app.run(main)
