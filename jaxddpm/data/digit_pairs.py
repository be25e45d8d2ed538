"""`digit_pairs`: two of scikit-learn's digits side by side, with a caption, for text-to-image.

A canvas is S high and 2S wide, one channel (16 x 32 at data.image_size = 16,
data.image_width = 32): its left half is one image of the `digits` data set and its right half
another, each exactly as `digits` gives it at S x S (`digits.digits_source`: x / 8 - 1, then
a bilinear resize). Train canvases use only the `digits` train images (the first 1500), test
canvases only its test images (the last 297), so no digit image is in both.

The caption names both digits and their order, from one of TEMPLATES, the digits written as
numerals or as words: "a 3 on the left and a 7 on the right", "seven to the right of three",
"3 to the left of 7", "three, then seven", "3 and 7" (`caption`). With half_captions = p > 0
(data.half_captions), a fraction p of the training captions names one side only, "a 3 on the
left" or "a 7 on the right" (HALF_TEMPLATES, `half_caption`): a model trained so knows each
side's condition alone, which composing conditions (AND / NOT, `jaxddpm.solvers.composition`)
needs. The test split always names both.

Compositional generalisation is measured on the ten ordered pairs (left, right) that no
training canvas shows, UNSEEN_PAIRS = (0, 3), (1, 4), ..., (9, 2): (d, d + 3 mod 10), so every
digit is missing once on each side while each digit still appears on both sides in training.

  * train: the 90 SEEN_PAIRS x TRAIN_CANVASES_PER_PAIR (200) = 18000 canvases;
  * test: all 100 PAIRS x TEST_CANVASES_PER_PAIR (10) = 1000 canvases, seen and unseen.

Element i shows pair pairs[i % len(pairs)] (so any run of consecutive elements is balanced);
its two digit images and its template are drawn from a generator seeded with (split, i), so
the element is a pure function of (split, i). Elements are ready examples:

  {'x': float32 [S, 2S, 1] in [-1, 1], 'label': 10 * left + right (NUM_PAIR_CLASSES),
   'text': the caption (str), 'left': int, 'right': int}

Random left-right flips would swap the halves without swapping the caption: a captioned run
must not use data.random_flip.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxddpm.data import digits as digits_lib
from jaxddpm.data.transforms import DatasetError

NUM_DIGITS = 10
NUM_PAIR_CLASSES = NUM_DIGITS * NUM_DIGITS  # label = 10 * left + right
PAIRS = tuple((l, r) for l in range(NUM_DIGITS) for r in range(NUM_DIGITS))
UNSEEN_PAIRS = tuple((d, (d + 3) % NUM_DIGITS) for d in range(NUM_DIGITS))
SEEN_PAIRS = tuple(p for p in PAIRS if p not in UNSEEN_PAIRS)
TRAIN_CANVASES_PER_PAIR = 200
TEST_CANVASES_PER_PAIR = 10

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
# {left}/{right}: the digit; {a_left}/{a_right}: its article ('an' only before 8 and eight).
TEMPLATES = (
    '{a_left} {left} on the left and {a_right} {right} on the right',
    '{right} to the right of {left}',
    '{left} to the left of {right}',
    '{left}, then {right}',
    '{left} and {right}',
)
# One side only: the left digit, or the right one (half_captions).
HALF_TEMPLATES = ('{a_left} {left} on the left', '{a_right} {right} on the right')
_SEED = 0xD16175  # the draws of element i come from a generator seeded (_SEED, split, i)
_SPLITS = {'train': 0, 'test': 1}


def caption(left: int, right: int, template: int = 0, *, words: bool = False) -> str:
  """The caption of TEMPLATES[template] for the pair (left, right), digits as numerals
  ('3') or, with `words`, as words ('three')."""
  return _format(TEMPLATES[template], left=left, right=right, words=words)


def _format(template: str, *, left: int, right: int, words: bool) -> str:
  def name(d: int) -> str:
    if not 0 <= d < NUM_DIGITS:
      raise ValueError(f'a digit is 0..9, not {d}')
    return DIGIT_WORDS[d] if words else str(d)

  return template.format(
      left=name(left), right=name(right),
      a_left='an' if left == 8 else 'a', a_right='an' if right == 8 else 'a')


def half_caption(digit: int, side: str, *, words: bool = False) -> str:
  """The one-sided caption of HALF_TEMPLATES: "a 3 on the left" (side 'left') or "a 7 on
  the right" ('right'); with `words`, "a three on the left"."""
  if side not in ('left', 'right'):
    raise ValueError(f"side is 'left' or 'right', not {side!r}")
  return _format(HALF_TEMPLATES[0 if side == 'left' else 1], left=digit, right=digit,
                 words=words)


def all_captions(pairs=SEEN_PAIRS, *, half: bool = False) -> list[str]:
  """Every caption of `pairs`: each pair with each template, in numerals and in words; with
  `half`, also every one-sided caption of their digits."""
  out = [caption(l, r, t, words=w) for l, r in pairs
         for t in range(len(TEMPLATES)) for w in (False, True)]
  if half:
    out += [half_caption(d, side, words=w) for side, digits in
            (('left', sorted({l for l, _ in pairs})), ('right', sorted({r for _, r in pairs})))
            for d in digits for w in (False, True)]
  return out


class DigitPairsSource:
  """Random-access digit-pair canvases (module docstring) made from one digits split.

  images: float32 [N, S, S, 1] digit images, labels: int32 [N] their digits; pairs: the
  ordered pairs shown; canvases_per_pair; split: the seed's name ('train' or 'test').
  """

  transforms = ()
  captioned = True

  def __init__(self, images: np.ndarray, labels: np.ndarray, pairs, canvases_per_pair: int,
               split: str, half_captions: float = 0.0):
    if not 0.0 <= half_captions <= 1.0:
      raise DatasetError(f'data.half_captions = {half_captions} must be in [0, 1].')
    self.images = images
    self.half_captions = float(half_captions)
    self.pairs = tuple(tuple(int(d) for d in p) for p in pairs)
    self.canvases_per_pair = int(canvases_per_pair)
    self._split = _SPLITS[split]
    # The images of each digit, so a draw picks one of them by index.
    self._by_digit = [np.flatnonzero(labels == d) for d in range(NUM_DIGITS)]
    missing = [d for d in {d for p in self.pairs for d in p} if not len(self._by_digit[d])]
    if missing:
      raise DatasetError(f'digit_pairs: the {split} digits hold no image of {missing}.')

  def __len__(self) -> int:
    return len(self.pairs) * self.canvases_per_pair

  def pair(self, i: int) -> tuple[int, int]:
    """(left, right) of element i, without making the canvas."""
    return self.pairs[int(i) % len(self.pairs)]

  def _draws(self, i: int) -> tuple[int, int, int, bool, str]:
    """Element i's (left image, right image, template, words, half): a pure function of
    (split, i); half is '' (both digits named), 'left' or 'right'. The first four draws
    are those of a source without half captions (a generator's stream is sequential)."""
    left, right = self.pair(i)
    u = np.random.default_rng((_SEED, self._split, int(i))).random(6)
    a = self._by_digit[left][int(u[0] * len(self._by_digit[left]))]
    b = self._by_digit[right][int(u[1] * len(self._by_digit[right]))]
    half = '' if u[4] >= self.half_captions else ('left' if u[5] < 0.5 else 'right')
    return int(a), int(b), int(u[2] * len(TEMPLATES)), bool(u[3] < 0.5), half

  def image_indices(self, i: int) -> tuple[int, int]:
    """Indices into `images` of element i's left and right halves."""
    return self._draws(i)[:2]

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= int(i) < len(self):
      raise IndexError(f'digit_pairs has {len(self)} elements, not index {i}')
    a, b, template, words, half = self._draws(i)
    left, right = self.pair(i)
    if half:
      text = half_caption(left if half == 'left' else right, half, words=words)
    else:
      text = caption(left, right, template, words=words)
    return {'x': np.concatenate([self.images[a], self.images[b]], axis=1),
            'label': NUM_DIGITS * left + right,
            'text': text,
            'left': left, 'right': right}

  def captions(self) -> list[str]:
    """Every caption an element of this source can carry (its pairs' `all_captions`)."""
    return all_captions(self.pairs, half=self.half_captions > 0)


def digit_pairs_source(split: str, image_size: int, image_width: int,
                       channels: int, half_captions: float = 0.0) -> DigitPairsSource:
  """The `digit_pairs` canvases of `split` ('train' or 'test'): [S, 2S, 1], S = image_size;
  the train split with a fraction `half_captions` of one-sided captions.

  Raises:
    DatasetError: image_width is not 2 * image_size, channels is not 1, or another split.
  """
  if image_width != 2 * image_size:
    raise DatasetError(
        f'digit_pairs canvases are two square digits side by side: data.image_width must be '
        f'2 * data.image_size = {2 * image_size}, got {image_width}.')
  if split not in _SPLITS:
    raise DatasetError(f"digit_pairs has splits 'train' and 'test', not {split!r}.")
  digits = digits_lib.digits_source(split, image_size, channels)
  if split == 'train':
    pairs, per_pair = SEEN_PAIRS, TRAIN_CANVASES_PER_PAIR
  else:
    pairs, per_pair, half_captions = PAIRS, TEST_CANVASES_PER_PAIR, 0.0
  return DigitPairsSource(digits.images, digits.labels, pairs, per_pair, split, half_captions)
