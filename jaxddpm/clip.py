"""Loads a pretrained Hugging Face CLIP text encoder folder (shell side of `models.clip_text`).

  clip = jaxddpm.clip.load_clip_text('clip-vit-large-patch14')  # a downloaded model folder
  ids, mask = clip.tokenize(['a photo of a cat'])                # int32 [1, 77] each
  last_hidden_state, pooled, projected = clip.encode(ids, mask)  # [1, 77, 768], [1, 768], [1, 768]

The folder holds what the Hugging Face Hub publishes for openai/clip-vit-large-patch14 and
its kin:

- config.json: a `CLIPTextConfig` (CLIPTextModel, CLIPTextModelWithProjection) or a full
  `CLIPConfig` with a nested `text_config` (`config_from_hf`);
- model.safetensors, read with the `safetensors` NumPy API (`convert.load_tensors`; no
  torch). The text tower's tensors are `text_model.`-prefixed (transformers 4 checkpoints,
  CLIPTextModelWithProjection, CLIPModel) or not (CLIPTextModel saved by transformers 5);
  `text_projection.weight`, when present, adds the projection. A full CLIPModel's vision
  tower (`vision_model.*`, `visual_projection.weight`) and `logit_scale` are ignored;
- tokenizer.json, read with `tokenizers`; tokenizer_config.json / special_tokens_map.json,
  when present, name the padding token as they do for `transformers.CLIPTokenizer`.

Every problem is a `CLIPLoadError` naming the file, tensor (with both shapes) or key;
nothing is loaded partially.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import processors

from jaxddpm import convert
from jaxddpm.models.clip_text import CLIPTextConfig, CLIPTextTransformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = 'config.json', 'model.safetensors', 'tokenizer.json'
# Read in this order, a later file's entry replacing an earlier one's, as transformers does.
SPECIAL_TOKENS_FILES = ('tokenizer_config.json', 'special_tokens_map.json')
# transformers.CLIPTokenizer's special tokens; it pads with the end-of-text token.
BOS, EOS, PAD = '<|startoftext|>', '<|endoftext|>', '<|endoftext|>'
TEXT_PREFIX, PROJECTION = 'text_model.', 'text_projection.weight'
# Not part of the text tower: a CLIPModel's vision side and its logit temperature.
IGNORED_PREFIXES = ('vision_model.', 'visual_projection.', 'logit_scale')
# A buffer (arange) that older transformers saved with the weights; it is no parameter.
POSITION_IDS = 'embeddings.position_ids'
_MAX_NAMES = 8  # names listed in one error message


class CLIPLoadError(Exception):
  """The folder cannot be loaded exactly; the message names the file, tensor or key."""


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CLIPLoadError(f'cannot read {path}: {e}') from e


def config_from_hf(cfg: Mapping[str, Any], *, with_projection: bool = False) -> CLIPTextConfig:
  """The text tower's config from a config.json dict (CLIPTextConfig or full CLIPConfig).

  As transformers reads them: keys a file leaves out take CLIPTextConfig's defaults; a
  CLIPConfig's `text_config` describes the tower and its top-level `projection_dim` the
  projection; a legacy `text_config_dict`, completed with the defaults, replaces
  `text_config`'s values (`CLIPConfig.__post_init__`). Other keys are ignored.
  """
  defaults = dataclasses.asdict(CLIPTextConfig())
  if 'text_config' in cfg or 'text_config_dict' in cfg or cfg.get('model_type') == 'clip':
    text = {**defaults, **(cfg.get('text_config') or {})}
    if cfg.get('text_config_dict') is not None:
      text.update({**defaults, **cfg['text_config_dict']})
    text['projection_dim'] = cfg.get('projection_dim', defaults['projection_dim'])
  else:
    text = {**defaults, **cfg}
  fields = {k: text[k] for k in defaults if k != 'with_projection'}
  try:
    return CLIPTextConfig(**fields, with_projection=with_projection)
  except ValueError as e:
    raise CLIPLoadError(str(e)) from e


def _hf_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> the tensor name in a CLIPTextModel (no prefix).

  ('layers_3', 'mlp', 'fc1', 'kernel') -> 'encoder.layers.3.mlp.fc1.weight'.
  """
  *modules, leaf = path
  if modules[0].startswith('layers_'):
    modules = ['encoder', 'layers', modules[0].removeprefix('layers_'), *modules[1:]]
  elif modules[0] in ('token_embedding', 'position_embedding'):
    modules = ['embeddings', *modules]
  return '.'.join([*modules, 'bias' if leaf == 'bias' else 'weight'])


def _listing(names) -> str:
  names = sorted(names)
  more = f' ... ({len(names)} in all)' if len(names) > _MAX_NAMES else ''
  return ', '.join(repr(n) for n in names[:_MAX_NAMES]) + more


def convert_weights(tensors: Mapping[str, np.ndarray], config: CLIPTextConfig,
                    where: str = WEIGHTS_FILE) -> dict[str, Any]:
  """Flax params of `CLIPTextTransformer(config)` from a Hugging Face state dict.

  Dense kernels are the transposed `weight`s (torch stores [out, in]); LayerNorm
  weight/bias are scale/bias; embeddings are copied. Raises CLIPLoadError for a missing
  tensor, a tensor of the wrong shape, or an unused text tensor (`where` names the file).
  """
  module = CLIPTextTransformer(config)
  dummy = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), dummy)['params'])
  prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in tensors) else ''
  wanted = {}  # our path -> (file name, transposed)
  for path in shapes:
    name = _hf_name(path)
    wanted[path] = (name if name == PROJECTION else prefix + name, path[-1] == 'kernel')

  missing = [name for name, _ in wanted.values() if name not in tensors]
  if missing:
    raise CLIPLoadError(f'{where}: missing tensor{"s" if len(missing) > 1 else ""} {_listing(missing)}')
  used = {name for name, _ in wanted.values()}
  unused = [k for k in tensors if k not in used and not k.startswith(IGNORED_PREFIXES)
            and not k.endswith(POSITION_IDS)]
  if unused:
    raise CLIPLoadError(f'{where}: unused text tensor{"s" if len(unused) > 1 else ""} {_listing(unused)}')
  flat = {}
  for path, (name, transposed) in wanted.items():
    want = shapes[path].shape[::-1] if transposed else shapes[path].shape
    got = tuple(np.shape(tensors[name]))
    if got != want:
      raise CLIPLoadError(f'{where}: tensor {name!r} has shape {got}, expected {want}')
    value = np.asarray(tensors[name], np.float32)
    flat[path] = value.T if transposed else value
  return traverse_util.unflatten_dict(flat)


def _special_tokens(folder: str) -> dict[str, str]:
  """{'pad_token': ..., 'bos_token': ..., 'eos_token': ...} named by the folder's files."""
  out = {}
  for file in SPECIAL_TOKENS_FILES:
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
      continue
    for key, value in _read_json(path).items():
      if key in ('pad_token', 'bos_token', 'eos_token') and value is not None:
        out[key] = value['content'] if isinstance(value, dict) else str(value)
  return out


def _token_id(tokenizer: tokenizers.Tokenizer, token: str, role: str, where: str) -> int:
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise CLIPLoadError(f'{where}: the {role} token {token!r} is not in the vocabulary')
  return int(token_id)


def load_tokenizer(folder: str) -> tuple[tokenizers.Tokenizer, int]:
  """(tokenizer, pad id) of the folder, with the tokenizer's own truncation and padding off
  (`ClipText.tokenize` does both) and a [BOS] $A [EOS] post-processor when it has none,
  as `transformers.CLIPTokenizer` installs one."""
  path = os.path.join(folder, TOKENIZER_FILE)
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust side raises plain Exceptions
    raise CLIPLoadError(f'{path} is not a tokenizer.json file ({e})') from e
  special = _special_tokens(folder)
  if 'pad_token' in special or tokenizer.padding is None:
    pad_id = _token_id(tokenizer, special.get('pad_token', PAD), 'padding', path)
  else:
    pad_id = int(tokenizer.padding['pad_id'])
  tokenizer.no_truncation()
  tokenizer.no_padding()
  if tokenizer.post_processor is None:
    bos, eos = special.get('bos_token', BOS), special.get('eos_token', EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A {eos}', special_tokens=[(bos, _token_id(tokenizer, bos, 'BOS', path)),
                                                  (eos, _token_id(tokenizer, eos, 'EOS', path))])
  return tokenizer, pad_id


@functools.partial(jax.jit, static_argnames=('module',))
def _encode(module: CLIPTextTransformer, params, ids, mask):
  """The text tower's forward pass, jitted; equal modules share the compiled function."""
  return module.apply({'params': params}, ids, mask)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipText:
  """A loaded CLIP text encoder: `tokenize` prompts, then `encode` them.

  Attributes:
    config: the tower's architecture.
    module: `CLIPTextTransformer(config, dtype)`.
    params: its float32 parameters (on the default device).
    tokenizer: the folder's tokenizer (own truncation and padding off; `load_tokenizer`).
    pad_id: the id `tokenize` pads with.
  """
  config: CLIPTextConfig
  module: CLIPTextTransformer
  params: Any
  tokenizer: tokenizers.Tokenizer
  pad_id: int

  def tokenize(self, prompts: Sequence[str], max_length: int | None = None):
    """Prompts -> (ids int32 [B, L], mask int32 [B, L]), as `transformers.CLIPTokenizer(prompts,
    padding='max_length', truncation=True, max_length=L)` gives them.

    L = max_length, default max_position_embeddings. Each text is cut so that it fits with
    its special tokens (BOS ... EOS: EOS stays last), then padded with `pad_id`; mask is 1 on
    the text and its special tokens, 0 on the padding.
    """
    if isinstance(prompts, str):
      raise TypeError('tokenize takes a sequence of prompts; wrap a single prompt in a list')
    length = self.config.max_position_embeddings if max_length is None else int(max_length)
    num_special = self.tokenizer.num_special_tokens_to_add(False)
    if not num_special < length <= self.config.max_position_embeddings:
      raise ValueError(f'max_length must be in ({num_special}, '
                       f'{self.config.max_position_embeddings}], got {length}')
    ids = np.full((len(prompts), length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, e in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
      e.truncate(length - num_special)
      e = self.tokenizer.post_process(e)
      ids[row, :len(e.ids)] = e.ids
      mask[row, :len(e.ids)] = 1
    return ids, mask

  def encode(self, ids, mask=None):
    """(ids [B, L], mask [B, L] or None) -> (last_hidden_state [B, L, D], pooled [B, D],
    projected [B, P] or None); `CLIPTextTransformer`. Without a mask every token is attended
    to (causally), as Stable Diffusion calls the encoder."""
    mask = None if mask is None else jnp.asarray(mask, jnp.int32)
    return _encode(self.module, self.params, jnp.asarray(ids, jnp.int32), mask)


def load_clip_text(folder: str, dtype=jnp.float32) -> ClipText:
  """The CLIP text encoder in `folder` (module docstring); `dtype` is the compute dtype."""
  if not os.path.isdir(folder):
    raise CLIPLoadError(f'{folder!r} is not a directory')
  for file in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
    if not os.path.isfile(os.path.join(folder, file)):
      raise CLIPLoadError(f'{folder}: no {file} (a CLIP text folder has {CONFIG_FILE}, '
                          f'{WEIGHTS_FILE} and {TOKENIZER_FILE})')
  weights = os.path.join(folder, WEIGHTS_FILE)
  try:
    tensors = convert.load_tensors(weights)
  except convert.ConversionError as e:
    raise CLIPLoadError(str(e)) from e
  config = config_from_hf(_read_json(os.path.join(folder, CONFIG_FILE)),
                          with_projection=PROJECTION in tensors)
  params = jax.tree.map(jnp.asarray, convert_weights(tensors, config, where=weights))
  tokenizer, pad_id = load_tokenizer(folder)
  if config.vocab_size < tokenizer.get_vocab_size():
    raise CLIPLoadError(f'{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens, '
                        f'the model embeds {config.vocab_size}')
  return ClipText(config, CLIPTextTransformer(config, dtype), params, tokenizer, pad_id)
