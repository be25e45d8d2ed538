r"""Reference points for the digits metrics, at equal sample counts.

  python benchmarks/digits_reference.py [--workdir=runs/digits] [--num=297]

digits_fid / digits_is / digits_kid (the offline digits classifier's feature
space, against the 1500 training digits, as the quickstart's evaluation
computes them) of:

  - the held-out split's real digits. They come from other writers than the
    training digits (scikit-learn's digits are ordered by writer), so they
    score worse than a model that learnt the training distribution well;
  - a random subset of the training digits (part of the reference itself:
    what a model that reproduced its training data would score);
  - uniform noise (the ceiling);
  - with --workdir, the run's DDIM-50 samples (EMA parameters).

FID's small-sample bias grows as the count shrinks, so every row uses the
same `--num` images; the held-out split has 297, which is the default.
Prints one JSON line per row.
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import data  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'A digits run to sample from (optional).')
_NUM = flags.DEFINE_integer('num', data.DIGITS_NUM_TEST, 'Images per row (at most 297).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the noise and of the samples.')


def main(argv):
  del argv
  num = _NUM.value
  if not 1 < num <= data.DIGITS_NUM_TEST:
    raise app.UsageError(f'--num must be in [2, {data.DIGITS_NUM_TEST}]')
  config = digits.get_config() if _WORKDIR.value is None else runs.read_config(_WORKDIR.value)
  # With a workdir, the classifier its evaluations used (cached in WORKDIR/eval).
  extractor = evaluation.extractor_from_config(config, workdir=_WORKDIR.value, required=True)
  reference = evaluation.dataset_reference_stats(config, extractor)
  held_out = np.concatenate([b['x'] for b in data.eval_batches(
      config, batch_size=num, num_examples=num, split=config.data.eval_split)])
  size, channels = int(config.data.image_size), int(config.data.channels)
  noise = np.random.default_rng(_SEED.value).uniform(-1, 1, (num, size, size, channels))
  source = data.create_source(config.data, split=config.data.split)
  # A random subset: the digits are ordered by writer, so a contiguous block is not iid.
  picked = np.random.default_rng(_SEED.value).choice(len(source), num, replace=False)
  train = source.images[np.sort(picked)]  # the digits: an in-memory ArraySource
  rows = {'held-out real digits': held_out, 'random training digits': train,
          'uniform noise': noise.astype(np.float32)}
  if _WORKDIR.value is not None:
    _, params, _ = runs.load_run(_WORKDIR.value)
    rows['DDIM-50 samples'] = sample.generate(config, params, num_samples=num, sampler='ddim',
                                              steps=50, seed=_SEED.value)['samples']
  for name, images in rows.items():
    metrics = evaluation.scalars(evaluation.compute_metrics(images, reference,
                                                            extractor=extractor))
    print(json.dumps({'images': name, 'num': num, **metrics}, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
