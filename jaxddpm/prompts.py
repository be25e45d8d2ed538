"""Prompts of text-to-image runs: the run's tokenizer, and prompts as `cond['tokens']`.

A run with `model.text.encoder = 'transformer'` tokenizes captions with a word-level
tokenizer built from its training captions (`jaxddpm.data.text`) at the start of training
and saved as `WORKDIR/tokenizer.json`; the vocabulary size and the empty prompt's tokens
(the null value of `cond['tokens']`, for caption dropout and classifier-free guidance) are
written into the run's config, so a resumed run and `run_sample.py --prompt` use exactly
the same tokens. A 'clip' run takes the tokenizer of its pretrained encoder's folder
(`jaxddpm.clip`), padded with its pad token, and saves it in the workdir the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jaxddpm import clip
from jaxddpm import sample_io
from jaxddpm.data import text as text_data
from jaxddpm.models import text as text_lib


class PromptError(sample_io.SampleError):
  """A prompt, a prompts file or a tokenizer that cannot be used; the message says why."""


def encoder(config) -> str:
  text = config.model.get('text')
  return str(text.get('encoder', '')) if text else ''


def tokenizer_path(config, workdir: str) -> str:
  """WORKDIR/tokenizer.json: the run's tokenizer (a 'clip' run's is its encoder's, padded)."""
  del config
  return os.path.join(workdir, text_data.TOKENIZER_FILE)


def prepare_text(config, workdir: str, captions: Callable[[], Sequence[str]]):
  """(config with model.text.vocab_size / null_tokens set, tokenizer, pretrained), or
  (config, None, None) for a run without text.

  'transformer': the tokenizer is WORKDIR/tokenizer.json when it exists (a resumed run), else
  built from `captions()` (every process builds the same one); pretrained is None.
  'clip': the encoder of model.text.clip_dir (`jaxddpm.clip.load_clip_text`): its tokenizer,
  set to pad with its pad token, its architecture as JSON in model.text.clip_arch (so that
  the run samples without the folder), and pretrained = {text.FROZEN_NAME: its parameters}
  (`train_state.create_train_state`'s pretrained subtrees).
  `save_tokenizer` writes the tokenizer once the workdir is locked.
  """
  kind = encoder(config)
  if not kind:
    return config, None, None
  config = copy.deepcopy(config)
  length = int(config.data.max_text_length)
  pretrained = None
  if kind == 'clip':
    tokenizer, arch, pretrained = _clip_encoder(str(config.model.text.clip_dir), length)
    with config.unlocked():
      config.model.text.clip_arch = arch
  else:
    path = tokenizer_path(config, workdir)
    tokenizer = (_load(path) if os.path.exists(path)
                 else text_data.build_word_tokenizer(captions()))
  with config.unlocked():
    config.model.text.vocab_size = int(tokenizer.get_vocab_size())
    config.model.text.null_tokens = tuple(text_data.null_tokens(tokenizer, length))
  return config, tokenizer, pretrained


def _clip_encoder(folder: str, length: int):
  """(tokenizer padding with the pad token, architecture JSON, {FROZEN_NAME: params})."""
  try:
    encoder_ = clip.load_clip_text(folder)
  except clip.CLIPLoadError as e:
    raise PromptError(f'model.text.clip_dir: {e}') from None
  if length > encoder_.config.max_position_embeddings:
    raise PromptError(f'data.max_text_length = {length} exceeds the CLIP encoder\'s '
                      f'{encoder_.config.max_position_embeddings} positions')
  tokenizer = encoder_.tokenizer
  tokenizer.enable_padding(pad_id=encoder_.pad_id, pad_token=tokenizer.id_to_token(encoder_.pad_id))
  arch = json.dumps(dataclasses.asdict(encoder_.config), sort_keys=True)
  params = jax.tree.map(np.asarray, encoder_.params)
  return tokenizer, arch, {text_lib.FROZEN_NAME: params}


def save_tokenizer(config, workdir: str, tokenizer) -> None:
  """Writes the run's tokenizer to WORKDIR/tokenizer.json unless it is there."""
  path = tokenizer_path(config, workdir)
  if tokenizer is not None and encoder(config) and not os.path.exists(path):
    try:
      text_data.save_tokenizer(tokenizer, path)
    except OSError as e:
      raise PromptError(f'cannot write the tokenizer {path}: {e}') from None


def load_tokenizer(config, workdir: str):
  """The run's tokenizer (WORKDIR/tokenizer.json); PromptError when missing or unreadable."""
  return _load(tokenizer_path(config, workdir))


def _load(path: str):
  if not os.path.exists(path):
    raise PromptError(f'{path} is missing: this text-to-image run has no tokenizer')
  try:
    return text_data.load_tokenizer(path)
  except Exception as e:  # tokenizers raises its own exception types
    raise PromptError(f'cannot read the tokenizer {path}: {e}') from None


def read_prompts_file(path: str) -> list[str]:
  """The prompts of a file, one a line (blank lines are empty prompts; no trailing one)."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise PromptError(f'cannot read the prompts file {path!r}: {e}') from None
  if not lines:
    raise PromptError(f'the prompts file {path!r} is empty')
  return lines


def prompt_inputs(config, workdir: str | None, prompts: Sequence[str] | None,
                  negative_prompt: str | None, opts: dict, *, tokenizer=None) -> dict:
  """{'prompts': [N] str or None, 'tokens': int32 [N, L] or None, 'negative_tokens': ...}.

  One prompt is given to every sample; several must be one per sample. No prompt on a text
  model is the empty prompt (unconditional samples); any prompt on a model without text is
  an error, and so is a negative prompt without guidance (opts['guidance_scale'] > 0).
  `tokenizer` (else the run's, from `workdir`) turns them into tokens.
  """
  num_samples = opts['num_samples']
  none = {'prompts': None, 'tokens': None, 'negative_tokens': None}
  given = prompts is not None or negative_prompt is not None
  if not encoder(config):
    if given:
      raise PromptError('prompts given, but this run has no text conditioning '
                        '(model.text.encoder is empty)')
    return none
  if not given:  # the model's missing tokens are the empty prompt
    return none
  prompts = list(prompts or [''])
  if len(prompts) == 1:
    prompts = prompts * num_samples
  if len(prompts) != num_samples:
    raise PromptError(f'{len(prompts)} prompts for {num_samples} samples; give one prompt, '
                      'or one per sample')
  if tokenizer is None:
    tokenizer = _load(tokenizer_path(config, workdir or ''))
  length = int(config.data.max_text_length)
  out = {'prompts': prompts, 'tokens': text_data.encode(tokenizer, prompts, length),
         'negative_tokens': None}
  if negative_prompt is not None:
    if not opts['guidance_scale'] > 0:
      raise PromptError('a negative prompt acts through classifier-free guidance: give '
                        'guidance_scale > 0 with it')
    out['negative_tokens'] = text_data.encode(tokenizer, [negative_prompt] * num_samples, length)
  return out


def unknown_words(config, workdir: str, prompts: Sequence[str]) -> list[str]:
  """The words of `prompts` outside the run's vocabulary (they become [UNK])."""
  tokenizer = _load(tokenizer_path(config, workdir))
  vocab = tokenizer.get_vocab()
  words = []
  for p in prompts:
    for token in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(p)):
      if token[0] not in vocab and token[0] not in words:
        words.append(token[0])
  return words
