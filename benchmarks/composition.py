r"""Composing text conditions on a digit_pairs run: AND of the two sides, NOT a digit.

  python benchmarks/composition.py --workdir=runs/digit_pairs_compose [--num=500] \
      [--and_weights=1,3] [--not_weights=1,3]

Composable Diffusion (Liu et al. 2022), eps~ = eps(x | "") + sum_i w_i (eps(x | c_i) -
eps(x | "")), all conditions in one batched model call per step (`jaxddpm.control`):

  AND  "a L on the left" (w) AND "a R on the right" (w): the fraction of --num samples whose
       left half the digits classifier reads as L and right half as R;
  NOT  "a D on the left" (-w) AND "a D on the right" (-w): the fraction of samples with a D
       in either half (and in the left half alone), next to the unguided run's (w = 0).

The pair (--left, --right) and the digit --digit default to the README's 3 / 7 and 3. The
digits classifier (`jaxddpm.evaluation.digit_pairs`) reads each 16 x 16 half; it reads both
halves of real test canvases right in 92.9% of them.
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import prompts as prompts_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.data import digit_pairs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.digits_classifier import DigitsExtractor  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.evaluation import digit_pairs as pair_eval  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'A digit_pairs run with one-sided captions.')
_NUM = flags.DEFINE_integer('num', 500, 'Samples per row.')
_LEFT = flags.DEFINE_integer('left', 3, 'AND: the left digit.')
_RIGHT = flags.DEFINE_integer('right', 7, 'AND: the right digit.')
_DIGIT = flags.DEFINE_integer('digit', 3, 'NOT: the digit to avoid.')
_AND = flags.DEFINE_list('and_weights', ['1', '3'], 'AND rows: the weight w of each side.')
_NOT = flags.DEFINE_list('not_weights', ['1', '3'], 'NOT rows: the weight -w of each side.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'Samples per compiled call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every row\'s noise.')
_GRID = flags.DEFINE_string('grid', None, 'PNG: the first 50 samples of the last AND row, '
                            'then 50 of the last NOT row.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  config, params, _ = runs.load_run(_WORKDIR.value)
  if config.data.dataset != 'digit_pairs' or not prompts_lib.encoder(config):
    raise app.UsageError(f'{_WORKDIR.value!r} is not a digit_pairs text-to-image run')
  tokenizer = prompts_lib.load_tokenizer(config, _WORKDIR.value)
  extractor = DigitsExtractor.load_or_train(image_size=int(config.data.image_size))

  def draw(texts, weights):
    began = time.perf_counter()
    out = sample.generate(config, params, num_samples=_NUM.value, batch_size=_BATCH.value,
                          seed=_SEED.value, prompts=texts, tokenizer=tokenizer,
                          control=dict(prompt_weights=weights))
    left, right = pair_eval.classify_halves(out['samples'], extractor)
    return out['images'], left, right, time.perf_counter() - began

  side = lambda d, s: digit_pairs.half_caption(d, s)
  grids = []
  print('| composition | weights | both as asked | left / right as asked | '
        f'sampling {_NUM.value} images (s) |')
  print('|---|---|---|---|---|')
  texts = [side(_LEFT.value, 'left'), side(_RIGHT.value, 'right')]
  for w in (float(v) for v in _AND.value):
    images, left, right, seconds = draw(texts, [w, w])
    ok_l, ok_r = left == _LEFT.value, right == _RIGHT.value
    print(f'| "{texts[0]}" AND "{texts[1]}" | {w:g}, {w:g} | {np.mean(ok_l & ok_r):.1%} | '
          f'{np.mean(ok_l):.1%} / {np.mean(ok_r):.1%} | {seconds:.0f} |', flush=True)
  grids.append(images[:50])

  d = _DIGIT.value
  texts = [side(d, 'left'), side(d, 'right')]
  print(f'\n| composition | weights | a {d} in either half | a {d} on the left | '
        f'sampling {_NUM.value} images (s) |')
  print('|---|---|---|---|---|')
  for w in [0.0] + [float(v) for v in _NOT.value]:
    images, left, right, seconds = draw(texts, [-w, -w])
    name = 'unguided (w = 0)' if w == 0 else f'NOT "{texts[0]}" AND NOT "{texts[1]}"'
    print(f'| {name} | {-w:g}, {-w:g} | {np.mean((left == d) | (right == d)):.1%} | '
          f'{np.mean(left == d):.1%} | {seconds:.0f} |', flush=True)
  grids.append(images[:50])
  if _GRID.value:
    from jaxddpm import images as images_lib  # pylint: disable=g-import-not-at-top
    images_lib.save_image_grid(np.concatenate(grids), _GRID.value)
    print(f'wrote {_GRID.value}')


if __name__ == '__main__':
  app.run(main)
