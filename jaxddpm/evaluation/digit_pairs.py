"""Does a digit_pairs sample show the digits its prompt asked for, in the asked order?

Each canvas [H, 2H, 1] is cut into its left and right H x H halves, and the project's digits
classifier (`jaxddpm.digits_classifier.DigitsExtractor`, trained on the digits train split
and cached) names the digit of each. `pair_accuracy` gives the fractions of canvases whose
left digit, right digit, and both are right. Prompts come from
`jaxddpm.data.digit_pairs.caption`; on UNSEEN_PAIRS the `both` accuracy measures
compositional generalisation to ordered pairs no training canvas showed.
"""

from __future__ import annotations

import numpy as np

from jaxddpm.digits_classifier import DigitsExtractor


def halves(samples) -> tuple[np.ndarray, np.ndarray]:
  """[N, H, 2H, 1] canvases -> (left [N, H, H, 1], right [N, H, H, 1]), same dtype."""
  x = np.asarray(samples)
  if x.ndim != 4 or x.shape[-1] != 1 or x.shape[2] != 2 * x.shape[1]:
    raise ValueError(f'digit_pairs canvases are [N, H, 2H, 1], got {x.shape}')
  width = x.shape[1]
  return x[:, :, :width], x[:, :, width:]


def classify_halves(samples, extractor: DigitsExtractor | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The classifier's digits of each canvas's halves: (left int32 [N], right int32 [N]).

  samples: [N, H, 2H, 1] float in [-1, 1] or uint8. extractor: the digits classifier
  (default: `DigitsExtractor.load_or_train(image_size=H)`, from the cache).
  """
  left, right = halves(samples)
  if extractor is None:
    extractor = DigitsExtractor.load_or_train(image_size=left.shape[1])
  _, logits = extractor.features(np.concatenate([left, right]))
  predicted = np.argmax(logits, axis=-1).astype(np.int32)
  return predicted[:len(left)], predicted[len(left):]


def pair_accuracy(samples, left, right, extractor: DigitsExtractor | None = None
                  ) -> dict[str, float]:
  """Fractions of canvases whose digits the classifier reads as asked.

  Args:
    samples: [N, H, 2H, 1] float in [-1, 1] or uint8.
    left, right: the asked digits, ints or int arrays [N].
    extractor: the digits classifier (see `classify_halves`).

  Returns:
    {'both': both halves right, 'left': the left half right, 'right': the right half right}.
  """
  got_left, got_right = classify_halves(samples, extractor)
  ok_left = got_left == np.broadcast_to(np.asarray(left), got_left.shape)
  ok_right = got_right == np.broadcast_to(np.asarray(right), got_right.shape)
  return {'both': float(np.mean(ok_left & ok_right)), 'left': float(np.mean(ok_left)),
          'right': float(np.mean(ok_right))}
