"""The DDPM U-Net (Ho, Jain, Abbeel 2020, Appendix B), layer for layer.

A PixelCNN++-style U-Net (Salimans et al. 2017) of Wide ResNet blocks with
GroupNorm, a sinusoidal timestep embedding added in every block, and
single-head self-attention at chosen resolutions. The structure and parameter
names follow the reference code (hojonathanho/diffusion,
`diffusion_tf/models/unet.py`); `configs/cifar.py` gives the paper's 35.7M
parameter CIFAR-10 model.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxddpm.diffusion import superres
from jaxddpm.models import clip_text
from jaxddpm.models import conditioning
from jaxddpm.models import layers
from jaxddpm.models import text as text_lib


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the U-Net. Lists are accepted and stored as tuples.

  Attributes:
    image_size: input height (and width, unless image_width); attention goes at the
      levels whose resolution image_size // 2**level is in `attn_resolutions`.
    image_width: 0 for square inputs, else the width (e.g. 32 for 16 x 32 canvases).
    in_channels: image channels C of x.
    out_channels: output channels (2C for learned variances: [eps, v]).
    ch: base channel count; level i has ch * ch_mult[i] channels.
    ch_mult: channel multiplier per level; len(ch_mult) levels, len - 1 downsamplings.
    num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 up).
    attn_resolutions: resolutions with a self-attention block after each ResBlock.
    dropout: dropout rate inside ResBlocks (active when train=True).
    num_classes: 0 for unconditional; else a class embedding with
      num_classes + 1 rows, row num_classes being the null class
      (classifier-free guidance, Ho & Salimans 2021) of `cond['label']`.
    class_dropout: the training probability that a label is replaced by the
      null class. The network does not drop labels itself: the objective does,
      through `cond_spec()` and `conditioning.drop`.
    ignore_cond_keys: conditioning keys the network accepts and ignores (e.g.
      a shared data pipeline's keys); any other key it was not built for is an error.
    low_res_size: 0, or a super-resolution model (SR3 sec. 2.1): cond['low_res']
      [B, low_res_size, low_res_size, in_channels] is upsampled bilinearly to x's size and
      concatenated to x_t on the channel axis, and cond['aug_level'] [B] (the
      noise-conditioning augmentation level s in [0, 1], `jaxddpm.diffusion.superres`;
      0 when absent) is embedded like the timestep (of 1000 s) and added to the time
      embedding (CDM sec. 4.3).
    text: None, or a `text.TextConfig`: a text-to-image model with its own transformer
      (GLIDE sec. 2.3) reading cond['tokens'] [B, L]; its token features are attended to by
      a `layers.CrossAttnBlock` after every self-attention block (mid included) and its
      pooled feature, projected, is added to the time embedding (Imagen sec. 2.2). A
      missing 'tokens' means the empty prompt. With `text.clip`, the encoder is that frozen
      pretrained CLIP tower instead (parameters under `text.FROZEN_NAME`).
    context_dim, pooled_dim: > 0 for a model conditioned on features computed outside it
      (a frozen CLIP text encoder): cond['context'] [B, L, context_dim] with
      cond['context_mask'] [B, L], and cond['pooled'] [B, pooled_dim]. Their null value is
      0 (an all-masked context: the cross-attention blocks are then the identity).
    context_dropout: the training probability that the context and pooled features are
      dropped to their null value together.
    num_heads: attention heads (1 in DDPM).
    num_head_channels: if > 0, heads = channels // num_head_channels instead.
    resblock_updown: BigGAN-style ResBlocks for up/downsampling.
    resamp_with_conv: conv3x3 in up/downsampling (else nearest / avg pool only).
    norm_groups, norm_eps: GroupNorm groups and epsilon (32, 1e-6 in DDPM).
    flip_sin_to_cos, freq_shift: timestep embedding variant, see
      `layers.timestep_embedding` (DDPM: False, 1).
    downsample_padding: 'same' (TF, DDPM) or 'symmetric' (pad 1 each side).
    dtype: compute dtype name ('float32', 'bfloat16'); params are float32.
    remat: recompute each block's activations in the backward pass (nn.remat).
    energy: the denoiser is energy-parameterised: the network f is read as the energy
      E(x, t) = 1/2 ||x + f(x, t)||^2 and the eps prediction is grad_x E
      (`jaxddpm.models.make_energy_fn`); training differentiates through that gradient.
  """
  image_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  num_classes: int = 0
  class_dropout: float = 0.0
  num_heads: int = 1
  num_head_channels: int = 0
  resblock_updown: bool = False
  resamp_with_conv: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-6
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  downsample_padding: str = 'same'
  dtype: str = 'float32'
  remat: bool = False
  ignore_cond_keys: Sequence[str] = ()
  low_res_size: int = 0
  image_width: int = 0
  text: text_lib.TextConfig | None = None
  context_dim: int = 0
  pooled_dim: int = 0
  context_dropout: float = 0.0
  energy: bool = False

  @property
  def image_shape(self) -> tuple[int, int]:
    return self.image_size, self.image_width or self.image_size

  def __post_init__(self):
    # ConfigDicts read back from JSON hold lists; tuples keep the config hashable.
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_resolutions', tuple(int(r) for r in self.attn_resolutions))
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype).name)
    object.__setattr__(self, 'ignore_cond_keys', tuple(str(k) for k in self.ignore_cond_keys))
    if self.energy and self.out_channels != self.in_channels:
      raise ValueError('an energy-parameterised U-Net predicts eps only (a fixed variance): '
                       f'out_channels must be in_channels = {self.in_channels}')
    if self.downsample_padding not in ('same', 'symmetric'):
      raise ValueError(f"downsample_padding must be 'same' or 'symmetric', got {self.downsample_padding!r}")
    for c in [self.ch * m for m in self.ch_mult]:
      if c % self.norm_groups:
        raise ValueError(f'{c} channels do not split into norm_groups={self.norm_groups} groups')

  def cond_spec(self) -> dict[str, conditioning.Kind]:
    """The conditioning keys the network reads: {'label'} for a class-conditional model;
    'low_res' and 'aug_level' for a super-resolution model (kept in guidance's null half)."""
    spec = {}
    if self.num_classes > 0:
      spec['label'] = conditioning.Label(self.num_classes, dropout=self.class_dropout)
    if self.low_res_size > 0:
      spec['low_res'] = conditioning.Fill(guided=False)
      spec['aug_level'] = conditioning.Fill(guided=False)
    if self.text is not None:
      spec['tokens'] = conditioning.Tokens(self.text.null_tokens,
                                           dropout=self.text.caption_dropout)
    if self.context_dim > 0:
      # One rate: the shared uniform of conditioning.drop nulls all three together.
      for key in ('context', 'context_mask', 'pooled'):
        spec[key] = conditioning.Fill(dropout=self.context_dropout)
    return spec

  def example_inputs(self, batch: int = 1):
    """(x, t, cond) of the right shapes and dtypes (for init and shape inference)."""
    x = jnp.zeros((batch, *self.image_shape, self.in_channels), jnp.float32)
    cond = {'label': jnp.zeros((batch,), jnp.int32)} if self.num_classes > 0 else {}
    if self.text is not None:
      cond['tokens'] = jnp.asarray([self.text.null_tokens] * batch, jnp.int32)
    if self.context_dim > 0:
      cond['context'] = jnp.zeros((batch, 1, self.context_dim), jnp.float32)
      cond['context_mask'] = jnp.ones((batch, 1), jnp.int32)
      cond['pooled'] = jnp.zeros((batch, max(self.pooled_dim, 1)), jnp.float32)
    if self.low_res_size > 0:
      size = self.low_res_size
      cond['low_res'] = jnp.zeros((batch, size, size, self.in_channels), jnp.float32)
      cond['aug_level'] = jnp.zeros((batch,), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), cond


class UNet(nn.Module):
  """eps_theta(x_t, t) of DDPM (Ho et al. 2020, eq. 11 and Appendix B).

  Call: `model.apply({'params': p}, x, t, cond, train=False, rngs={'dropout': key})`.
    x: [B, H, W, C] with H, W divisible by 2**(len(ch_mult) - 1).
    t: [B] timesteps (int or float).
    cond: the conditioning pytree (`jaxddpm.models.conditioning`): {} or None when
      unconditional; {'label': [B] int in [0, num_classes]} (num_classes = null
      class) for num_classes > 0, where a missing label means the null class;
      {'low_res': [B, h, w, C], 'aug_level': [B]} for a super-resolution model
      (`UNetConfig.low_res_size`; low_res is required, aug_level defaults to 0);
      {'tokens': [B, L]} for a text model, {'context', 'context_mask', 'pooled'} for one
      on external text features (`UNetConfig.text`, `context_dim`).
      A key outside `cond_spec()` and `ignore_cond_keys` is a ValueError.
  Returns: [B, H, W, out_channels] float32.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    cfg = self.config
    if cond is None:
      cond = {}
    if not isinstance(cond, Mapping):
      raise TypeError(f'cond must be a dict of conditioning arrays, got {type(cond).__name__}')
    conditioning.check(cond, cfg.cond_spec(), ignore=cfg.ignore_cond_keys)
    dtype = jnp.dtype(cfg.dtype)
    num_levels = len(cfg.ch_mult)
    factor = 2 ** (num_levels - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'x must be [B, H, W, C] with H, W divisible by {factor}, got {x.shape}')
    res_block = nn.remat(layers.ResBlock, static_argnums=(3,)) if cfg.remat else layers.ResBlock
    attn_block = nn.remat(layers.AttnBlock) if cfg.remat else layers.AttnBlock
    cross_block = nn.remat(layers.CrossAttnBlock) if cfg.remat else layers.CrossAttnBlock

    def resnet(out_ch, name, resample='none'):
      return res_block(out_ch, dropout=cfg.dropout, norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
                       resample=resample, dtype=dtype, name=name)

    def attention(name):
      kw = dict(num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
                norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps, dtype=dtype)
      self_attn = attn_block(**kw, name=name)
      if context is None:
        return self_attn
      cross = cross_block(**kw, name=name.replace('attn', 'xattn'))
      return lambda h: cross(self_attn(h), context, context_mask)

    def dense(features, name):
      return nn.Dense(features, kernel_init=layers.ddpm_init(), dtype=dtype, param_dtype=jnp.float32, name=name)

    def has_attn(level):
      return cfg.image_size // 2 ** level in cfg.attn_resolutions

    # Timestep (and class) embedding: [B] -> [B, 4 ch].
    temb = layers.timestep_embedding(t, cfg.ch, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb = dense(4 * cfg.ch, 'temb_dense1')(nn.swish(dense(4 * cfg.ch, 'temb_dense0')(temb)))
    if cfg.num_classes > 0:
      y = cond.get('label')
      if y is None:
        y = jnp.full(x.shape[:1], cfg.num_classes, jnp.int32)
      temb = temb + nn.Embed(cfg.num_classes + 1, 4 * cfg.ch, dtype=dtype, param_dtype=jnp.float32,
                             name='class_embed')(y)
    context, context_mask, pooled = self._text_inputs(x, cond, dtype)
    if pooled is not None:
      temb = temb + dense(4 * cfg.ch, 'pooled_proj')(pooled.astype(dtype))
    if cfg.low_res_size > 0:
      x, aug_emb = self._super_res_inputs(x, cond)
      aug_emb = dense(4 * cfg.ch, 'aug_dense1')(nn.swish(dense(4 * cfg.ch, 'aug_dense0')(aug_emb)))
      temb = temb + aug_emb

    # Downsampling path; every intermediate output is kept for the skips.
    hs = [layers.conv(cfg.ch, 'conv_in', dtype=dtype)(x.astype(dtype))]
    for level, mult in enumerate(cfg.ch_mult):
      for i in range(cfg.num_res_blocks):
        h = resnet(cfg.ch * mult, f'down_{level}_block_{i}')(hs[-1], temb, train)
        if has_attn(level):
          h = attention(f'down_{level}_attn_{i}')(h)
        hs.append(h)
      if level != num_levels - 1:
        if cfg.resblock_updown:
          hs.append(resnet(cfg.ch * mult, f'down_{level}_downsample', 'down')(hs[-1], temb, train))
        else:
          hs.append(layers.Downsample(cfg.resamp_with_conv, cfg.downsample_padding, dtype,
                                      name=f'down_{level}_downsample')(hs[-1]))

    # Middle.
    h = hs[-1]
    h = resnet(h.shape[-1], 'mid_block_0')(h, temb, train)
    h = attention('mid_attn')(h)
    h = resnet(h.shape[-1], 'mid_block_1')(h, temb, train)

    # Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip.
    for level in reversed(range(num_levels)):
      for i in range(cfg.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = resnet(cfg.ch * cfg.ch_mult[level], f'up_{level}_block_{i}')(h, temb, train)
        if has_attn(level):
          h = attention(f'up_{level}_attn_{i}')(h)
      if level != 0:
        if cfg.resblock_updown:
          h = resnet(h.shape[-1], f'up_{level}_upsample', 'up')(h, temb, train)
        else:
          h = layers.Upsample(cfg.resamp_with_conv, dtype, name=f'up_{level}_upsample')(h)
    assert not hs, 'every skip connection is used once'

    h = nn.swish(layers.group_norm(cfg.norm_groups, cfg.norm_eps, dtype, 'norm_out')(h))
    h = layers.conv(cfg.out_channels, 'conv_out', init_scale=0.0, dtype=dtype)(h)
    return h.astype(jnp.float32)

  def _text_inputs(self, x, cond, dtype):
    """(context [B, L, D] or None, its mask [B, L], pooled [B, D'] or None)."""
    cfg = self.config
    batch = x.shape[0]
    if cfg.text is not None:
      tokens = cond.get('tokens')
      if tokens is None:  # the empty prompt, as a missing label is the null class
        tokens = jnp.broadcast_to(jnp.asarray(cfg.text.null_tokens, jnp.int32),
                                  (batch, cfg.text.max_length))
      if cfg.text.clip is None:
        return text_lib.TextTransformer(cfg.text, dtype, name='text')(tokens)
      last, pooled, projected = clip_text.CLIPTextTransformer(
          cfg.text.clip, dtype, name=text_lib.FROZEN_NAME)(tokens)
      pooled = pooled if projected is None else projected
      # Frozen: no gradient reaches the pretrained tower (its optimizer updates are zero too).
      return (jax.lax.stop_gradient(last), jnp.ones(tokens.shape, bool),
              jax.lax.stop_gradient(pooled))
    if cfg.context_dim > 0:
      pooled = cond.get('pooled')
      if cfg.pooled_dim > 0 and pooled is None:
        pooled = jnp.zeros((batch, cfg.pooled_dim), jnp.float32)
      context = cond.get('context')
      if context is None:  # unconditional: the cross-attention blocks are the identity
        return None, None, pooled if cfg.pooled_dim > 0 else None
      if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
        raise ValueError(f"cond['context'] must be [B, L, {cfg.context_dim}], got "
                         f'{context.shape}')
      mask = cond.get('context_mask')
      if mask is None:
        mask = jnp.ones(context.shape[:2], jnp.int32)
      return context, mask, pooled if cfg.pooled_dim > 0 else None
    return None, None, None

  def _super_res_inputs(self, x, cond):
    """([x_t, upsampled low_res] on channels, the sinusoidal embedding of 1000 s)."""
    cfg = self.config
    low_res = cond.get('low_res')
    expected = (x.shape[0], cfg.low_res_size, cfg.low_res_size, cfg.in_channels)
    if low_res is None or tuple(low_res.shape) != expected:
      got = 'none' if low_res is None else tuple(low_res.shape)
      raise ValueError(f"a super-resolution U-Net needs cond['low_res'] of shape {expected}, "
                       f'got {got}')
    s = cond.get('aug_level')
    s = jnp.zeros(x.shape[:1], jnp.float32) if s is None else jnp.broadcast_to(s, x.shape[:1])
    up = superres.upsample(low_res.astype(jnp.float32), x.shape[1:3])
    # 1000 s spreads [0, 1] over the embedding's frequencies as the timesteps [0, 1000) do.
    emb = layers.timestep_embedding(1000.0 * s, cfg.ch, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                    freq_shift=cfg.freq_shift)
    return jnp.concatenate([x, up.astype(x.dtype)], axis=-1), emb
