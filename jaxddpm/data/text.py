"""Captions -> token ids: a word-level tokenizer built from the training captions, and `encode`.

`build_word_tokenizer` makes a Hugging Face `tokenizers.Tokenizer`: a `WordLevel` model whose
vocabulary is every word of the captions (most frequent first, ties alphabetical, so the ids
are a function of the captions' multiset), a lowercase normaliser, a whitespace and
punctuation pre-tokenizer ("3, then 7" -> 3 , then 7), and a post-processor that frames each
text as [BOS] ... [EOS]. The special tokens come first: [PAD] = 0, [UNK] = 1, [BOS] = 2,
[EOS] = 3; a word the captions never had is [UNK]. It is saved as a `tokenizer.json`
(`save_tokenizer`; the training shell writes it into the run's workdir, TOKENIZER_FILE) and
read back with `load_tokenizer`.

`encode(tokenizer, texts, L)` -> int32 [N, L]: the ids, truncated to L keeping the closing
special token (EOS) last, padded with the pad id. It works for any `tokenizers.Tokenizer`
whose post-processor closes a text with a special token and that has a pad id (its padding
setting, else a [PAD] token), e.g. a pretrained CLIP tokenizer.json with padding enabled. The
empty prompt "" encodes to [BOS, EOS, PAD, ...]: `null_tokens`, the null value of
`conditioning.Tokens` for classifier-free guidance.

`Tokenize` is the Grain map that gives each element 'tokens' int32 [L] from its 'text'.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import grain
import numpy as np
import tokenizers
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

from jaxddpm.data.transforms import DatasetError

PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
TOKENIZER_FILE = 'tokenizer.json'


def build_word_tokenizer(captions: Iterable[str], *, min_frequency: int = 1,
                         vocab_size: int | None = None) -> tokenizers.Tokenizer:
  """A word-level tokenizer of `captions` (module docstring).

  Args:
    captions: the training captions (repeats count towards a word's frequency).
    min_frequency: words seen fewer times are left out (they encode as [UNK]).
    vocab_size: at most this many ids, special tokens included (None: every word).
  """
  tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
  tokenizer.normalizer = normalizers.Lowercase()
  # Whitespace splits off runs of punctuation; Punctuation isolates each mark.
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
  trainer = trainers.WordLevelTrainer(
      vocab_size=vocab_size or 2**31 - 1, min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tokenizer.train_from_iterator(captions, trainer)
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A {EOS}', special_tokens=[(t, tokenizer.token_to_id(t)) for t in (BOS, EOS)])
  return tokenizer


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str) -> None:
  """Writes `tokenizer` to `path` in the tokenizer.json format, atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  tokenizer.save(tmp)
  os.replace(tmp, path)


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """The tokenizer saved at `path` (a tokenizer.json file, or a folder holding one)."""
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise DatasetError(f'No tokenizer at {path!r}.')
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust side raises plain Exceptions
    raise DatasetError(f'{path} is not a tokenizer.json file ({e}).') from e


def pad_id(tokenizer: tokenizers.Tokenizer) -> int:
  """The id `encode` pads with: the tokenizer's padding id, else its [PAD] token's."""
  if tokenizer.padding is not None:
    return int(tokenizer.padding['pad_id'])
  token = tokenizer.token_to_id(PAD)
  if token is None:
    raise ValueError('the tokenizer has neither padding enabled nor a [PAD] token to pad with')
  return int(token)


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
  """Texts -> token ids int32 [N, max_length]: truncated keeping the closing special token
  (EOS) last, then padded with `pad_id(tokenizer)`. The tokenizer's own padding is removed
  first (by its attention mask), so a tokenizer that pads to 77 gives the same ids here."""
  if isinstance(texts, str):
    raise TypeError('encode takes a sequence of texts; wrap a single text in a list')
  if max_length < 2:
    raise ValueError(f'max_length must hold BOS and EOS (>= 2), got {max_length}')
  out = np.full((len(texts), max_length), pad_id(tokenizer), np.int32)
  for row, e in enumerate(tokenizer.encode_batch(list(texts))):
    kept = [(i, s) for i, s, m in zip(e.ids, e.special_tokens_mask, e.attention_mask) if m]
    ids = [i for i, _ in kept]
    if len(ids) > max_length:
      closing = kept[-1][1] == 1  # the text ends with EOS: keep it as the last token
      ids = ids[:max_length - 1] + ids[-1:] if closing else ids[:max_length]
    out[row, :len(ids)] = ids
  return out


def null_tokens(tokenizer: tokenizers.Tokenizer, max_length: int) -> tuple[int, ...]:
  """The ids of the empty prompt "" ([BOS, EOS, PAD, ...]): `conditioning.Tokens.null_tokens`."""
  return tuple(int(i) for i in encode(tokenizer, [''], max_length)[0])


class Tokenize(grain.transforms.Map):
  """{'text': str, ...} -> {'tokens': int32 [max_length], ...} (`encode`; 'text' is dropped)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int):
    self.tokenizer = tokenizer
    self.max_length = int(max_length)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in element.items() if k != 'text'}
    out['tokens'] = encode(self.tokenizer, [str(element['text'])], self.max_length)[0]
    return out
