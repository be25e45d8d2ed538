r"""Does a digit_pairs text-to-image run draw the digits its prompt names, in order?

  python benchmarks/digit_pairs.py --workdir=runs/digit_pairs [--num=500] [--scales=0,1,3,5]

For each classifier-free guidance scale w (eps~ = (1 + w) eps(x | prompt) - w eps(x | ""),
`jaxddpm.solvers.guidance`) it samples --num images for prompts over the 90 seen pairs
(`digit_pairs.SEEN_PAIRS`, cycled, so each pair is asked about equally often) and --num for
the ten pairs no training canvas shows (`digit_pairs.UNSEEN_PAIRS`). Each prompt's template,
and whether it writes the digits as numerals or words, is drawn from a generator seeded with
--seed, the same for every scale. The project's digits classifier reads each half of every
sample (`jaxddpm.evaluation.digit_pairs.pair_accuracy`); the table gives the fraction with
both digits right (and each side alone) and the wall time of sampling (compilation
included). --grid writes, for the best scale on the unseen pairs, a PNG of the first 100
unseen samples (10 x 10: column j asks for UNSEEN_PAIRS[j], (j, j + 3 mod 10)).
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxddpm import images  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import prompts as prompts_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.data import digit_pairs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.data import text as text_data  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.digits_classifier import DigitsExtractor  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm.evaluation import digit_pairs as pair_eval  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'A digit_pairs text-to-image run.')
_NUM = flags.DEFINE_integer('num', 500, 'Samples per set (seen, unseen) and scale.')
_SCALES = flags.DEFINE_list('scales', ['0', '1', '3', '5'], 'Guidance scales w.')
_STEPS = flags.DEFINE_integer('steps', None, 'Solver steps (default: the run\'s sampling).')
_SOLVER = flags.DEFINE_string('solver', None, 'Solver (default: the run\'s sampling).')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'Samples per compiled call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prompts and of every row\'s noise.')
_GRID = flags.DEFINE_string('grid', None, 'PNG of unseen-pair samples at the best scale.')
flags.mark_flags_as_required(['workdir'])


def pair_prompts(pairs, num: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(prompts, left [num], right [num]): pairs[i % len(pairs)] with a drawn template."""
  rng = np.random.default_rng(seed)
  chosen = [pairs[i % len(pairs)] for i in range(num)]
  templates = rng.integers(0, len(digit_pairs.TEMPLATES), num)
  words = rng.random(num) < 0.5
  texts = [digit_pairs.caption(l, r, int(t), words=bool(w))
           for (l, r), t, w in zip(chosen, templates, words)]
  left, right = (np.array(side, np.int32) for side in zip(*chosen))
  return texts, left, right


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config, params, _ = runs.load_run(workdir)
  if config.data.dataset != 'digit_pairs' or not prompts_lib.encoder(config):
    raise app.UsageError(f'{workdir!r} is not a digit_pairs text-to-image run')
  tokenizer = text_data.load_tokenizer(prompts_lib.tokenizer_path(config, workdir))
  extractor = DigitsExtractor.load_or_train(image_size=int(config.data.image_size))
  sets = {'seen': pair_prompts(digit_pairs.SEEN_PAIRS, _NUM.value, _SEED.value),
          'unseen': pair_prompts(digit_pairs.UNSEEN_PAIRS, _NUM.value, _SEED.value + 1)}

  print(f'| guidance w | seen: both right | seen: left / right | unseen: both right | '
        f'unseen: left / right | sampling {2 * _NUM.value} images (s) |')
  print('|---|---|---|---|---|---|')
  best = (-1.0, None)
  for scale in (float(s) for s in _SCALES.value):
    began = time.perf_counter()
    acc, unseen_images = {}, None
    for name, (texts, left, right) in sets.items():
      out = sample.generate(config, params, num_samples=_NUM.value, batch_size=_BATCH.value,
                            seed=_SEED.value, guidance_scale=scale, prompts=texts,
                            tokenizer=tokenizer, steps=_STEPS.value, solver=_SOLVER.value)
      acc[name] = pair_eval.pair_accuracy(out['samples'], left, right, extractor)
      if name == 'unseen':
        unseen_images = out['images']
    seconds = time.perf_counter() - began
    s, u = acc['seen'], acc['unseen']
    print(f'| {scale:g} | {s["both"]:.1%} | {s["left"]:.1%} / {s["right"]:.1%} | '
          f'{u["both"]:.1%} | {u["left"]:.1%} / {u["right"]:.1%} | {seconds:.0f} |', flush=True)
    if u['both'] > best[0]:
      best = (u['both'], unseen_images)
  if _GRID.value and best[1] is not None:
    images.save_image_grid(best[1][:100], _GRID.value)
    print(f'wrote {_GRID.value}')


if __name__ == '__main__':
  app.run(main)
