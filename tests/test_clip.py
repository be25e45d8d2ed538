"""The CLIP text encoder (`jaxddpm.clip`, `jaxddpm.models.clip_text`): parity with transformers,
the pooling rule, the checkpoint layouts, and clear load errors.

tests/fixtures/clip_tiny and its transformers outputs (reference.npz) were written by
tests/fixtures/make_clip_fixture.py (torch + transformers); these tests need neither.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxddpm import clip
from jaxddpm.models import clip_text

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip_tiny')
PREFIX = 'text_model.'
# A float32 pass that orders its sums differently from transformers' differs by a few ulps
# of the largest activations, whatever an entry's own size: measured at most 4.2e-7 of
# max |value| here, while transformers' own float32 run is 3.8e-7 from its float64 run.
# rtol alone would fail on entries near zero. Subtle mistakes stay far above it: another
# GELU gives 1e-2, a LayerNorm epsilon of 1e-6 for 1e-5 gives 3e-4, a transposed kernel 4e-1.
ATOL_SCALE = 2e-6


@pytest.fixture(scope='module')
def ref():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def encoder():
  return clip.load_clip_text(FIXTURE)


def _assert_close(out, ref):
  """float32 parity: elementwise rtol 1e-5, plus an atol of ATOL_SCALE times the output's
  largest |value| for the entries near zero (module comment at ATOL_SCALE)."""
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=ATOL_SCALE * np.abs(ref).max())


def _copy(tmp_path):
  folder = str(tmp_path / 'clip')
  shutil.copytree(FIXTURE, folder)
  return folder


def _rewrite_weights(folder, edit):
  path = os.path.join(folder, clip.WEIGHTS_FILE)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


# --- parity with transformers -------------------------------------------------------------


def test_config_and_params_from_the_folder(encoder):
  c = encoder.config
  assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (400, 32, 64, 2)
  assert (c.num_attention_heads, c.max_position_embeddings, c.projection_dim) == (4, 16, 24)
  assert (c.hidden_act, c.eos_token_id, c.with_projection) == ('quick_gelu', 1, True)
  assert encoder.pad_id == encoder.tokenizer.token_to_id(clip.PAD)
  assert encoder.params['layers_1']['self_attn']['q_proj']['kernel'].shape == (32, 32)
  assert encoder.params['text_projection']['kernel'].shape == (32, 24)


def test_tokenize_matches_transformers(encoder, ref):
  ids, mask = encoder.tokenize([str(p) for p in ref['prompts']])
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, ref['input_ids'])
  np.testing.assert_array_equal(mask, ref['attention_mask'])
  # The long prompt is cut to 16 tokens with EOS last; the empty one is [BOS, EOS, pad...].
  eos = encoder.config.eos_token_id
  assert mask[3].all() and ids[3, -1] == eos
  assert list(ids[2, :2]) == [encoder.tokenizer.token_to_id(clip.BOS), eos]
  short, short_mask = encoder.tokenize(['a photo of a cat'], max_length=8)
  assert short.shape == (1, 8) and short_mask.sum() == 7
  with pytest.raises(ValueError, match='max_length'):
    encoder.tokenize(['a cat'], max_length=17)
  with pytest.raises(TypeError):
    encoder.tokenize('a cat')


def test_outputs_match_transformers(encoder, ref):
  last, pooled, projected = encoder.encode(ref['input_ids'], ref['attention_mask'])
  _assert_close(np.asarray(last), ref['last_hidden_state'])
  _assert_close(np.asarray(pooled), ref['pooler_output'])
  _assert_close(np.asarray(projected), ref['text_embeds'])
  # Against transformers' float64 run too: our float32 error is of the same size as theirs.
  _assert_close(np.asarray(last), ref['last_hidden_state_f64'])
  _assert_close(np.asarray(projected), ref['text_embeds_f64'])


def test_without_attention_mask_matches_transformers(encoder, ref):
  """No mask: causal attention over the padding too (Stable Diffusion's call); the real
  tokens' features do not change, since padding comes after them."""
  last, _, _ = encoder.encode(ref['input_ids'])
  _assert_close(np.asarray(last), ref['last_hidden_state_nomask'])
  real = ref['attention_mask'].astype(bool)
  np.testing.assert_allclose(np.asarray(last)[real], ref['last_hidden_state'][real],
                             rtol=1e-5, atol=ATOL_SCALE * np.abs(ref['last_hidden_state']).max())


def test_legacy_eos_token_id_pools_at_the_largest_id(encoder, ref):
  config = dataclasses.replace(encoder.config, eos_token_id=clip_text.LEGACY_EOS_TOKEN_ID)
  legacy = dataclasses.replace(encoder, config=config, module=clip_text.CLIPTextTransformer(config))
  _, pooled, _ = legacy.encode(ref['input_ids'], ref['attention_mask'])
  _assert_close(np.asarray(pooled), ref['pooler_output_legacy'])


def test_pooling_picks_the_eos_position(encoder, ref):
  """pooled_b = last_hidden_state[b, first EOS]; the legacy rule, the largest id's first position."""
  ids = np.array([[0, 5, 9, 1, 1, 1], [0, 1, 7, 1, 3, 2], [0, 9, 9, 4, 1, 9]])
  np.testing.assert_array_equal(clip_text.eos_positions(ids, 1), [3, 1, 4])
  np.testing.assert_array_equal(clip_text.eos_positions(ids, 2), [2, 2, 1])
  last, pooled, _ = encoder.encode(ref['input_ids'], ref['attention_mask'])
  first_eos = [list(row).index(encoder.config.eos_token_id) for row in ref['input_ids']]
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(last)[np.arange(len(first_eos)), first_eos])
  assert first_eos == list(ref['attention_mask'].sum(1) - 1)


# --- checkpoint layouts -------------------------------------------------------------------


def test_unprefixed_text_model_without_projection(tmp_path, encoder, ref):
  """transformers 5 saves a CLIPTextModel without the 'text_model.' prefix; no projection."""
  folder = _copy(tmp_path)

  def strip(tensors):
    del tensors['text_projection.weight']
    for k in [k for k in tensors if k.startswith(PREFIX)]:
      tensors[k.removeprefix(PREFIX)] = tensors.pop(k)

  _rewrite_weights(folder, strip)
  loaded = clip.load_clip_text(folder)
  assert not loaded.config.with_projection
  last, pooled, projected = loaded.encode(ref['input_ids'], ref['attention_mask'])
  assert projected is None
  _assert_close(np.asarray(last), ref['last_hidden_state'])
  _assert_close(np.asarray(pooled), ref['pooler_output'])


def test_full_clip_model_folder(tmp_path, ref):
  """A CLIPModel folder: nested text_config, top-level projection_dim, a vision tower and
  logit_scale beside the text tensors (ignored), and the legacy position_ids buffer."""
  folder = _copy(tmp_path)
  with open(os.path.join(folder, clip.CONFIG_FILE)) as f:
    text_config = json.load(f)
  text_config.pop('projection_dim')
  full = {'model_type': 'clip', 'projection_dim': 24, 'text_config': text_config,
          'vision_config': {'hidden_size': 8}}
  with open(os.path.join(folder, clip.CONFIG_FILE), 'w') as f:
    json.dump(full, f)

  def add_vision(tensors):
    tensors['vision_model.embeddings.class_embedding'] = np.zeros(8, np.float32)
    tensors['visual_projection.weight'] = np.zeros((24, 8), np.float32)
    tensors['logit_scale'] = np.zeros((), np.float32)
    tensors[PREFIX + 'embeddings.position_ids'] = np.arange(16)[None]

  _rewrite_weights(folder, add_vision)
  loaded = clip.load_clip_text(folder)
  assert loaded.config.projection_dim == 24 and loaded.config.with_projection
  _, _, projected = loaded.encode(ref['input_ids'], ref['attention_mask'])
  _assert_close(np.asarray(projected), ref['text_embeds'])


def test_config_from_hf_defaults_and_text_config_dict():
  assert clip.config_from_hf({}) == clip_text.CLIPTextConfig()
  cfg = clip.config_from_hf({'text_config': {'hidden_size': 768, 'eos_token_id': 2},
                             'text_config_dict': {'num_attention_heads': 16}, 'projection_dim': 768})
  # text_config_dict, completed with the defaults, replaces text_config (transformers' rule).
  assert (cfg.hidden_size, cfg.eos_token_id, cfg.num_attention_heads) == (512, 49407, 16)
  assert cfg.projection_dim == 768
  with pytest.raises(clip.CLIPLoadError, match='hidden_act'):
    clip.config_from_hf({'hidden_act': 'relu'})


def test_pad_token_from_tokenizer_config(tmp_path):
  folder = _copy(tmp_path)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'pad_token': {'content': clip.BOS}}, f)
  loaded = clip.load_clip_text(folder)
  ids, mask = loaded.tokenize(['a cat'], max_length=8)
  assert loaded.pad_id == loaded.tokenizer.token_to_id(clip.BOS)
  assert (ids[0, mask[0] == 0] == loaded.pad_id).all()


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize('file', [clip.WEIGHTS_FILE, clip.CONFIG_FILE, clip.TOKENIZER_FILE])
def test_missing_file_is_named(tmp_path, file):
  folder = _copy(tmp_path)
  os.remove(os.path.join(folder, file))
  with pytest.raises(clip.CLIPLoadError, match=f'no {file}'):
    clip.load_clip_text(folder)


def test_missing_tensor_is_named(tmp_path):
  folder = _copy(tmp_path)
  name = PREFIX + 'encoder.layers.1.mlp.fc2.bias'
  _rewrite_weights(folder, lambda t: t.pop(name))
  with pytest.raises(clip.CLIPLoadError, match=f"missing tensor '{name}'"):
    clip.load_clip_text(folder)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
  folder = _copy(tmp_path)
  name = PREFIX + 'encoder.layers.0.self_attn.k_proj.weight'
  _rewrite_weights(folder, lambda t: t.update({name: np.zeros((32, 31), np.float32)}))
  with pytest.raises(clip.CLIPLoadError,
                     match=rf"'{name}' has shape \(32, 31\), expected \(32, 32\)"):
    clip.load_clip_text(folder)


def test_unused_text_tensor_is_named(tmp_path):
  folder = _copy(tmp_path)
  name = PREFIX + 'encoder.layers.2.mlp.fc1.weight'
  _rewrite_weights(folder, lambda t: t.update({name: np.zeros((64, 32), np.float32)}))
  with pytest.raises(clip.CLIPLoadError, match=f"unused text tensor '{name}'"):
    clip.load_clip_text(folder)
