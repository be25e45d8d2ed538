"""A small text transformer trained jointly with the denoiser (GLIDE, Nichol et al. 2022, sec. 2.3).

GLIDE encodes the caption with a transformer trained from scratch together with the
diffusion model: its token features are attended to by every attention layer of the
U-Net, and a pooled feature is added to the timestep embedding. Here

  e_0 = W_tok[tokens] + P                                        [B, L, W]
  e_k = e_{k-1} + MHA(LN(e_{k-1}), mask)
  e_k = e_k + MLP(LN(e_k))           (pre-LN blocks, MLP 4 W wide, GELU)
  context = LN(e_K),  mask = tokens != pad_id,
  pooled = sum_l mask_l context_l / sum_l mask_l                  [B, W]

Attention is bidirectional over the real tokens (pad keys are masked; GLIDE's text
transformer masks the padding too). Pooling is the masked mean, which exists for every
prompt, the empty one included ([BOS, EOS] has two real tokens).

Shapes: tokens [B, L] int32 with L = max_length.

With `TextConfig.clip` set, the encoder is instead a pretrained CLIP text tower
(`clip_text.CLIPTextTransformer`, Radford et al. 2021), frozen: its parameters live under
FROZEN_NAME (the optimizer leaves them alone, `train_state.FROZEN_PREFIX`) and its outputs
are cut from the gradient. context = its last hidden states, attended to at every position
(as Stable Diffusion and Imagen read a frozen encoder: the padding is the end-of-text token,
which the causal tower has seen the whole prompt by), pooled = its projected EOS feature
(the plain EOS feature without a projection).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxddpm.models import clip_text

# The frozen CLIP tower's parameter subtree (train_state.FROZEN_PREFIX + a name).
FROZEN_NAME = 'frozen_clip_text'


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Architecture and conditioning of the jointly trained text encoder.

  Attributes:
    vocab_size: the tokenizer's vocabulary (`jaxddpm.data.text`; built from the captions).
    max_length: L, the token length of every prompt (padded / truncated).
    width: W, the feature width; also the width of `context`.
    num_layers, num_heads: transformer blocks and attention heads.
    pad_id: the padding token (masked out of attention and pooling).
    null_tokens: the tokenised empty prompt (length L): the null value of `cond['tokens']`
      for caption dropout and classifier-free guidance (GLIDE sec. 2.3).
    caption_dropout: the training probability that a caption becomes the empty prompt.
    clip: a pretrained CLIP text tower to use, frozen, instead of the transformer (vocab_size
      and max_length must fit it; width, num_layers and num_heads are then unused).
  """
  vocab_size: int
  max_length: int
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  pad_id: int = 0
  null_tokens: tuple[int, ...] = ()
  caption_dropout: float = 0.1
  clip: clip_text.CLIPTextConfig | None = None

  def __post_init__(self):
    object.__setattr__(self, 'null_tokens', tuple(int(t) for t in self.null_tokens))
    if self.vocab_size < 1 or self.max_length < 1:
      raise ValueError(f'text: vocab_size ({self.vocab_size}) and max_length '
                       f'({self.max_length}) must be positive')
    if len(self.null_tokens) != self.max_length:
      raise ValueError(f'text: null_tokens has {len(self.null_tokens)} tokens, max_length is '
                       f'{self.max_length}')
    if self.clip is not None:
      if (self.vocab_size > self.clip.vocab_size
          or self.max_length > self.clip.max_position_embeddings):
        raise ValueError(f'text: vocab_size {self.vocab_size} / max_length {self.max_length} '
                         f'exceed the CLIP tower\'s {self.clip.vocab_size} / '
                         f'{self.clip.max_position_embeddings}')
    elif self.width % self.num_heads:
      raise ValueError(f'text: width {self.width} does not split into {self.num_heads} heads')


class TextTransformer(nn.Module):
  """tokens [B, L] -> (context [B, L, W], mask [B, L] bool, pooled [B, W]); module docstring."""
  config: TextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    if tokens.ndim != 2 or tokens.shape[1] != cfg.max_length:
      raise ValueError(f'tokens must be [B, {cfg.max_length}], got {tokens.shape}')
    mask = tokens != cfg.pad_id
    init = nn.initializers.normal(0.02)
    h = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=init, param_dtype=jnp.float32,
                 dtype=self.dtype, name='token_embed')(tokens)
    h = h + self.param('position_embed', init, (cfg.max_length, cfg.width)).astype(self.dtype)
    attn_mask = nn.make_attention_mask(jnp.ones_like(mask), mask)  # [B, 1, L, L]: keys only
    for i in range(cfg.num_layers):
      n = nn.LayerNorm(dtype=self.dtype, name=f'block_{i}_ln1')(h)
      h = h + nn.MultiHeadDotProductAttention(
          cfg.num_heads, dtype=self.dtype, name=f'block_{i}_attn')(n, n, mask=attn_mask)
      n = nn.LayerNorm(dtype=self.dtype, name=f'block_{i}_ln2')(h)
      n = nn.gelu(nn.Dense(4 * cfg.width, dtype=self.dtype, name=f'block_{i}_fc1')(n))
      h = h + nn.Dense(cfg.width, dtype=self.dtype, name=f'block_{i}_fc2')(n)
    context = nn.LayerNorm(dtype=self.dtype, name='ln_final')(h)
    weights = mask.astype(context.dtype)[..., None]
    pooled = (context * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return context, mask, pooled
