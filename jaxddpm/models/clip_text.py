"""CLIP's text tower (Radford et al. 2021, sec. 2.4), as Hugging Face `CLIPTextModel` computes it.

CLIP encodes a caption with a GPT-2-style transformer (Radford et al. 2019): masked
(causal) self-attention, pre-LN residual blocks, a final LayerNorm, and the feature
at the end-of-text token as the text's representation, linearly projected into the
joint image-text space. Following the Hugging Face architecture
(`transformers.models.clip.modeling_clip`: `CLIPTextEmbeddings`, `CLIPEncoderLayer`,
`CLIPTextModel`, `CLIPTextModelWithProjection`), with D = hidden_size, H heads:

  h_0 = W_tok[ids] + W_pos[0 .. L-1]                                     [B, L, D]
  h_k = h_{k-1} + Attn(LN1(h_{k-1}))          q, k, v, out: D x D with biases,
                                               softmax(q k^T / sqrt(D / H) + M)
  h_k = h_k + fc2(act(fc1(LN2(h_k))))          fc1: D -> intermediate_size
  last_hidden_state = LN_final(h_K)                                      [B, L, D]
  pooled_b = last_hidden_state[b, eos_b]       (`eos_positions`)          [B, D]
  projected = pooled W_proj^T                  (no bias; P = projection_dim) [B, P]

The mask M allows key j for query i when j <= i (causal) and, given an attention_mask,
when attention_mask[b, j] = 1: the two masks are intersected, as the Hugging Face text
model does (`create_causal_mask` with the padding mask on keys). With right padding, which
the tokenizer gives, every query keeps at least its first token, so no row is fully
masked; since padding comes after the real tokens, the padding mask changes only the
features at padded positions. Every LayerNorm uses `layer_norm_eps`.

Parameter names follow the Hugging Face modules (`token_embedding`, `layers_{i}/self_attn/
q_proj`, `layers_{i}/mlp/fc1`, `final_layer_norm`, `text_projection`), so the loader
(`jaxddpm.clip`) maps checkpoint tensors by name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# hidden_act -> activation. quick_gelu is the sigmoid approximation of the original CLIP
# code, x * sigmoid(1.702 x); 'gelu' is the exact erf form; 'gelu_new' and
# 'gelu_pytorch_tanh' are both the tanh approximation (Hendrycks & Gimpel 2016, sec. 2).
ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}
# Hugging Face's rule: a config whose eos_token_id is 2 predates the fix of the id
# (transformers PR #24773) and pools at the largest token id (the EOS of the original
# CLIP vocabulary); any other id pools at its first occurrence.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The architecture of a CLIP text tower; the defaults are Hugging Face `CLIPTextConfig`'s
  (the ViT-B/32 text tower). `jaxddpm.clip.config_from_hf` builds one from a config.json.

  Attributes:
    vocab_size, hidden_size (D), intermediate_size, num_hidden_layers, num_attention_heads:
      as in Hugging Face.
    max_position_embeddings: the longest token sequence (77 for OpenAI's CLIP).
    hidden_act: the MLP's activation, a key of ACTIVATIONS.
    layer_norm_eps: epsilon of every LayerNorm.
    eos_token_id: the token whose feature is pooled (LEGACY_EOS_TOKEN_ID: the largest id).
    projection_dim: P, the width of the text projection.
    with_projection: whether the tower ends in the text projection (`text_projection.weight`
      in the checkpoint: CLIPTextModelWithProjection or a full CLIPModel).
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 512
  with_projection: bool = False

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                 'num_attention_heads', 'max_position_embeddings', 'projection_dim', 'eos_token_id'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'clip text config: {name} must be an integer, got {value!r}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'clip text config: hidden_act={self.hidden_act!r} is not supported '
                       f'(supported: {list(ACTIVATIONS)})')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'clip text config: hidden_size {self.hidden_size} does not split into '
                       f'{self.num_attention_heads} heads')


def eos_positions(input_ids, eos_token_id: int):
  """The position pooled in each row: [B, L] int -> [B] int32.

    eos_b = argmax_l input_ids[b, l]                  if eos_token_id == LEGACY_EOS_TOKEN_ID
    eos_b = min {l : input_ids[b, l] == eos_token_id}  otherwise (0 when the row has none)

  Both take the first position where the maximum is reached (`jnp.argmax`, like torch's),
  so padding with the EOS token itself pools at the sequence's own EOS.
  """
  input_ids = jnp.asarray(input_ids)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class _SelfAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections: [B, L, D] -> [B, L, D]."""
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def project(name):
      y = nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)(x)
      return y.reshape(*y.shape[:-1], heads, head_dim)

    # Scaled by 1 / sqrt(head_dim); the softmax runs in float32 as in Hugging Face.
    y = nn.dot_product_attention(project('q_proj'), project('k_proj'), project('v_proj'),
                                 mask=mask, deterministic=True, dtype=self.dtype,
                                 force_fp32_for_softmax=True)
    y = y.reshape(*y.shape[:-2], cfg.hidden_size)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name='out_proj')(y)


class _MLP(nn.Module):
  """fc2(act(fc1(x))): [B, L, D] -> [B, L, D]."""
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name='fc1')(x)
    x = ACTIVATIONS[cfg.hidden_act](x)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name='fc2')(x)


class _EncoderLayer(nn.Module):
  """One pre-LN block: h + Attn(LN1(h)), then h + MLP(LN2(h))."""
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, mask):
    eps = self.config.layer_norm_eps
    n = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='layer_norm1')(h)
    h = h + _SelfAttention(self.config, self.dtype, name='self_attn')(n, mask)
    n = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='layer_norm2')(h)
    return h + _MLP(self.config, self.dtype, name='mlp')(n)


class CLIPTextTransformer(nn.Module):
  """(input_ids [B, L] int, attention_mask [B, L] int/bool or None) ->
  (last_hidden_state [B, L, D], pooled [B, D], projected [B, P] or None); module docstring.

  L may be shorter than max_position_embeddings (the first L positions are used).
  attention_mask None means every token is attended to (Stable Diffusion calls CLIP's
  text encoder so); the causal mask is always applied.
  """
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.config
    if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= cfg.max_position_embeddings:
      raise ValueError(f'input_ids must be [B, L] with 1 <= L <= {cfg.max_position_embeddings}, '
                       f'got {input_ids.shape}')
    length = input_ids.shape[1]
    init = nn.initializers.normal(0.02)
    h = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                 name='token_embedding')(input_ids)
    h = h + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                     dtype=self.dtype, name='position_embedding')(jnp.arange(length))
    mask = nn.make_causal_mask(input_ids)  # [B, 1, L, L]
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f'attention_mask {attention_mask.shape} must match input_ids '
                         f'{input_ids.shape}')
      # Keys only (the query argument is all ones): a padded query still sees the real keys.
      keys = attention_mask.astype(bool)
      mask = nn.combine_masks(mask, nn.make_attention_mask(jnp.ones_like(keys), keys))
    for i in range(cfg.num_hidden_layers):
      h = _EncoderLayer(cfg, self.dtype, name=f'layers_{i}')(h, mask)
    last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(h)
    index = eos_positions(input_ids, cfg.eos_token_id)
    pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
    projected = None
    if cfg.with_projection:
      projected = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                           name='text_projection')(pooled)
    return last, pooled, projected
