r"""Classifier guidance of an unconditional run: does the sample show the class asked for?

  python benchmarks/classifier_guidance.py --workdir=runs/digits \
      --classifier_workdir=runs/digits_clf [--num=500] [--scales=0,1,2,4,8]

For each guidance scale s it draws --num samples of the unconditional run, each steered
toward a class drawn uniformly (`jaxddpm.control`: the eps shift for DDIM and the ODE
solvers, the mean shift for --solver=ddpm), from seed --seed, the same noise and classes for
every scale. The project's digits classifier (`jaxddpm.digits_classifier`, trained on clean
digits and independent of the noisy classifier that guides) reads every sample; the table
gives the fraction it reads as the class asked for, digits_fid / digits_is of the samples
against the training digits, and the wall time of sampling (compilation included).
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'The (unconditional) run to guide.')
_CLASSIFIER = flags.DEFINE_string('classifier_workdir', None, 'The noisy classifier run.')
_NUM = flags.DEFINE_integer('num', 500, 'Samples per scale.')
_SCALES = flags.DEFINE_list('scales', ['0', '1', '2', '4', '8'], 'Guidance scales s.')
_SOLVER = flags.DEFINE_string('solver', None, 'Solver (default: the run\'s sampling).')
_STEPS = flags.DEFINE_integer('steps', None, 'Solver steps (default: the run\'s sampling).')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'Samples per compiled call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every row\'s noise and classes.')
flags.mark_flags_as_required(['workdir', 'classifier_workdir'])


def main(argv):
  del argv
  config, params, _ = runs.load_run(_WORKDIR.value)
  extractor = evaluation.extractor_from_config(config, workdir=_WORKDIR.value, required=True)
  reference = evaluation.dataset_reference_stats(config, extractor)
  pre = extractor.prefix
  print(f'| scale s | label agreement | {pre}fid | {pre}is | sampling {_NUM.value} images (s) |')
  print('|---|---|---|---|---|')
  for scale in (float(s) for s in _SCALES.value):
    began = time.perf_counter()
    out = sample.generate(config, params, num_samples=_NUM.value, batch_size=_BATCH.value,
                          seed=_SEED.value, solver=_SOLVER.value, steps=_STEPS.value,
                          control=dict(classifier_workdir=_CLASSIFIER.value,
                                       classifier_scale=scale))
    seconds = time.perf_counter() - began
    _, logits = extractor.features(out['samples'])
    agree = float(np.mean(np.argmax(logits, axis=-1) == out['labels']))
    metrics = evaluation.scalars(evaluation.compute_metrics(
        out['samples'], reference, extractor=extractor, metrics=('fid', 'is')))
    print(f'| {scale:g} | {agree:.1%} | {metrics[pre + "fid"]:.2f} | {metrics[pre + "is"]:.2f} '
          f'| {seconds:.0f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
