"""The noisy classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", sec. 4 and appendix F.2).

The U-Net's encoder half (the same ResBlocks, self-attention and downsampling as
`jaxddpm.models.unet.UNet`, conditioned on the timestep through the same embedding), its
middle block, then attention pooling to logits, as guided-diffusion's `EncoderUNetModel`
with pool='attention' (Radford et al. 2021's `AttentionPool2d`):

  h = swish(norm(features)),  tokens = [mean_{HW}(h); h_1 .. h_{HW}] + pos   [B, HW + 1, C]
  logits = W_out MHA(q = tokens_0, k = v = tokens)                           [B, K]

with a learned positional embedding pos (initialised N(0, 1 / C)) and heads of
num_head_channels channels. pool='mean' averages the positions instead.

It is a registered model ('noisy_classifier', `jaxddpm.models.register`) called like the
denoisers, `apply({'params': p}, x_t, t, cond, train=...)`, and reads no conditioning: the
label is its target (`jaxddpm.objectives.classifier_objective`), so a data pipeline's keys
in cond are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxddpm.models import layers

POOLS = ('attention', 'mean')


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Architecture of the noisy classifier (fields as `UNetConfig`'s where shared).

  Attributes:
    image_size, image_width: input height, and width (0: square).
    in_channels: image channels C.
    num_classes: K, the logits' size.
    ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads, num_head_channels,
      resamp_with_conv, norm_groups, norm_eps, dtype: as the U-Net's encoder half.
    pool: 'attention' (guided-diffusion's classifier) or 'mean'.
    pool_head_channels: channels per head of the attention pooling.
  """
  image_size: int = 32
  image_width: int = 0
  in_channels: int = 3
  num_classes: int = 10
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  num_heads: int = 1
  num_head_channels: int = 0
  resamp_with_conv: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  pool: str = 'attention'
  pool_head_channels: int = 64

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_resolutions', tuple(int(r) for r in self.attn_resolutions))
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype).name)
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}')
    if self.num_classes < 2:
      raise ValueError(f'a classifier needs num_classes >= 2, got {self.num_classes}')
    for c in [self.ch * m for m in self.ch_mult]:
      if c % self.norm_groups:
        raise ValueError(f'{c} channels do not split into norm_groups={self.norm_groups} groups')

  @property
  def image_shape(self) -> tuple[int, int]:
    return self.image_size, self.image_width or self.image_size

  def cond_spec(self) -> dict:
    """None: the classifier reads no conditioning (its label is the target)."""
    return {}

  def example_inputs(self, batch: int = 1):
    x = jnp.zeros((batch, *self.image_shape, self.in_channels), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), {}


class AttentionPool(nn.Module):
  """Attention pooling of [B, H, W, C] to [B, out] (module docstring; CLIP's AttentionPool2d).

  The query is the mean position's token only; keys and values are all HW + 1 tokens.
  """
  out_features: int
  head_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads, d = layers.head_split(c, 0, min(self.head_channels, c), 'attention pooling')
    tokens = x.reshape(b, hgt * wid, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    pos = self.param('positional_embedding', nn.initializers.normal(c ** -0.5),
                     (hgt * wid + 1, c), jnp.float32)
    tokens = tokens + pos.astype(tokens.dtype)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                                            name=name)
    q = dense(c, 'q')(tokens[:, :1]).reshape(b, 1, heads, d)
    k, v = (dense(c, name)(tokens).reshape(b, -1, heads, d) for name in ('k', 'v'))
    logits = jnp.einsum('bihd,bjhd->bhij', q, k).astype(jnp.float32) * (d ** -0.5)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    pooled = jnp.einsum('bhij,bjhd->bihd', w, v).reshape(b, c)
    return dense(self.out_features, 'proj_out')(pooled)


class NoisyClassifier(nn.Module):
  """logits of p_phi(y | x_t, t) (module docstring).

  Call: `model.apply({'params': p}, x, t, cond=None, train=False, rngs={'dropout': key})`.
    x: [B, H, W, C] with H, W divisible by 2**(len(ch_mult) - 1); t: [B] timesteps; cond is
    ignored.
  Returns: float32 [B, num_classes].
  """
  config: ClassifierConfig

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    del cond  # the label is the target, not an input
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    num_levels = len(cfg.ch_mult)
    factor = 2 ** (num_levels - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'x must be [B, H, W, C] with H, W divisible by {factor}, got {x.shape}')

    def resnet(out_ch, name):
      return layers.ResBlock(out_ch, dropout=cfg.dropout, norm_groups=cfg.norm_groups,
                             norm_eps=cfg.norm_eps, dtype=dtype, name=name)

    def attention(name):
      return layers.AttnBlock(num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
                              norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps, dtype=dtype,
                              name=name)

    dense = lambda features, name: nn.Dense(features, kernel_init=layers.ddpm_init(),
                                            dtype=dtype, param_dtype=jnp.float32, name=name)
    temb = layers.timestep_embedding(t, cfg.ch)
    temb = dense(4 * cfg.ch, 'temb_dense1')(nn.swish(dense(4 * cfg.ch, 'temb_dense0')(temb)))

    h = layers.conv(cfg.ch, 'conv_in', dtype=dtype)(x.astype(dtype))
    for level, mult in enumerate(cfg.ch_mult):
      for i in range(cfg.num_res_blocks):
        h = resnet(cfg.ch * mult, f'down_{level}_block_{i}')(h, temb, train)
        if cfg.image_size // 2 ** level in cfg.attn_resolutions:
          h = attention(f'down_{level}_attn_{i}')(h)
      if level != num_levels - 1:
        h = layers.Downsample(cfg.resamp_with_conv, 'same', dtype,
                              name=f'down_{level}_downsample')(h)
    h = resnet(h.shape[-1], 'mid_block_0')(h, temb, train)
    h = attention('mid_attn')(h)
    h = resnet(h.shape[-1], 'mid_block_1')(h, temb, train)

    h = nn.swish(layers.group_norm(cfg.norm_groups, cfg.norm_eps, dtype, 'norm_out')(h))
    if cfg.pool == 'attention':
      logits = AttentionPool(cfg.num_classes, cfg.pool_head_channels, dtype, name='pool')(h)
    else:
      logits = dense(cfg.num_classes, 'proj_out')(h.mean(axis=(1, 2)))
    return logits.astype(jnp.float32)
