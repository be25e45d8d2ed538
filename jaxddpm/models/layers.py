"""Layers of the DDPM U-Net (Ho et al. 2020, Appendix B), NHWC.

Names and initialisation follow the reference TensorFlow code
(hojonathanho/diffusion, `diffusion_tf/models/unet.py` and `nn.py`):
`norm1, conv1, temb_proj, norm2, conv2, nin_shortcut` in a ResBlock and
`norm, q, k, v, proj_out` in an attention block.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def ddpm_init(scale: float = 1.0):
  """Variance scaling (fan_avg, uniform), the reference `default_init`.

  A weight W with fan_in / fan_out is drawn from U(-a, a), a = sqrt(3 * scale /
  ((fan_in + fan_out) / 2)). `scale=0` means 1e-10: the reference zero-inits the
  last layer of every residual branch this way, so each block starts as the
  identity map.
  """
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10_000.0):
  """Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; DDPM Appendix B).

    freq_i = exp(-log(max_period) * i / (dim // 2 - freq_shift)),  i = 0 .. dim // 2 - 1
    emb    = [sin(t * freq), cos(t * freq)]     ([cos, sin] when flip_sin_to_cos)

  freq_shift=1, flip_sin_to_cos=False is the DDPM reference (and the diffusers
  DDPM checkpoints); freq_shift=0, flip_sin_to_cos=True is the diffusers default.
  An odd `dim` is zero-padded by one column.

  Args:
    t: [B] timesteps (int or float; fractional timesteps are allowed).
    dim: embedding width.
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(emb, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x):
  """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x):
  """[B, H, W, C] -> [B, H/2, W/2, C], mean over 2x2 windows."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def group_norm_apply(x, scale, bias, num_groups: int, epsilon: float):
  """GroupNorm (Wu & He 2018, Eq. 1) of NHWC `x` with per-channel `scale` and `bias`.

    mu_g = mean of x over (H, W, channels of group g),
    var_g = mean of (x - mu_g)^2 over the same set   (two-pass, as PyTorch and TF),
    y = (x - mu_g) / sqrt(var_g + epsilon) * scale + bias.

  Statistics are reduced in float32 whatever the dtype of x, first per channel
  over the H*W positions, then per group by a [C, C] group-averaging matrix.
  Reducing the [B, H*W, G, C/G] view over axes (1, 3) at once gives the same
  numbers, but XLA:CPU runs that strided reduction about 5x slower; these
  per-channel column sums run at memory speed.

  Args:
    x: [B, ..., C], C divisible by num_groups.
    scale, bias: [C].
  Returns:
    float32 [B, ..., C].
  """
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(f'GroupNorm: {c} channels do not split into {num_groups} groups')
  xf = x.astype(jnp.float32).reshape(b, -1, c)
  count = xf.shape[1] * (c // num_groups)
  group = np.arange(c) // (c // num_groups)
  # A NumPy constant: built with jnp, XLA:CPU would rebuild it on every call.
  averaging = (group[:, None] == group[None, :]).astype(np.float32) / np.float32(count)

  def group_mean(per_channel_sums):  # [B, C] -> the mean of each channel's group, [B, C]
    # HIGHEST: a GPU would otherwise round these float32 products to TF32.
    return jnp.dot(per_channel_sums, averaging, precision=lax.Precision.HIGHEST)

  mean = group_mean(jnp.sum(xf, axis=1))[:, None, :]
  centered = xf - mean
  var = group_mean(jnp.sum(jnp.square(centered), axis=1))[:, None, :]
  y = centered * (lax.rsqrt(var + epsilon) * scale) + bias
  return y.reshape(x.shape)


class GroupNorm(nn.Module):
  """GroupNorm with float32 statistics and params; the output in `dtype`.

  Params `scale` (ones) and `bias` (zeros), [C], as `flax.linen.GroupNorm`.
  See `group_norm_apply` for the equation.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return group_norm_apply(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def group_norm(num_groups: int, epsilon: float, dtype: Dtype, name: str) -> GroupNorm:
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, name=name)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(strides, pads, precision, x, w):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _conv_grads_canonical(strides, pads, precision, x, w, dy):
  """(dx, dw) of y = conv(x, w) as two forward NHWC x HWIO convolutions.

  With s the stride, lo the low padding and K the kernel size (per spatial dim):
    dx[i] = sum_k dilate_s(dy)[i + lo - k] w[k]: dy dilated by s, correlated with
            the spatially flipped kernel, its in/out channels swapped;
    dw[k] = sum_o x_pad[s o + k] dy[o]: a correlation of x with dy as the kernel
            (dilated by s), the batch axis B playing the channel role:
            [I, H, W, B] (*) [H', W', B, O] -> [I, K, K, O].
  These are the convolutions JAX's transpose rule gives, written in the one
  layout XLA:CPU runs fast everywhere: inside a loop (lax.scan of train steps)
  it does not bring the transposed convolutions JAX emits into that layout and
  runs them about 20x slower (jax-ml/jax#12868).
  """
  dx_pads, dw_pads = [], []
  for d, (lo, _), k, s in zip((1, 2), pads, w.shape[:2], strides):
    dilated_out = (dy.shape[d] - 1) * s + 1
    lo_t = k - 1 - lo
    dx_pads.append((lo_t, x.shape[d] + k - 1 - lo_t - dilated_out))
    dw_pads.append((lo, dilated_out + k - 1 - x.shape[d] - lo))
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = lax.conv_general_dilated(dy, w_t, (1, 1), dx_pads, lhs_dilation=strides,
                                dimension_numbers=_NHWC, precision=precision)
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), dw_pads,
                                rhs_dilation=strides, dimension_numbers=_NHWC, precision=precision)
  return dx, dw.transpose(1, 2, 0, 3)


def _conv_grads_lax(strides, pads, precision, x, w, dy):
  return jax.vjp(functools.partial(_lax_conv, strides, pads, precision), x, w)[1](dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_nhwc(strides, pads, precision, x, w):
  return _lax_conv(strides, pads, precision, x, w)


def _conv_nhwc_fwd(strides, pads, precision, x, w):
  return _lax_conv(strides, pads, precision, x, w), (x, w)


def _conv_nhwc_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals
  canonical = functools.partial(_conv_grads_canonical, strides, pads, precision)
  default = functools.partial(_conv_grads_lax, strides, pads, precision)
  # Other backends map JAX's own transposed convolutions onto their libraries (cuDNN).
  return lax.platform_dependent(x, w, dy, cpu=canonical, default=default)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` with a gradient that stays fast on the CPU inside loops.

  For a plain 2-D NHWC x HWIO convolution (no dilation, no groups) the value is
  exactly lax's; the gradient is computed by `_conv_grads_canonical` on the CPU
  and by JAX's own rule elsewhere. Anything else goes to lax unchanged.
  """
  plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers))
  if plain:
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    # The gradient's convolutions need non-negative padding: pads below the kernel size, and
    # no input rows that the strided windows skip beyond the padding.
    fits = all(0 <= lo < k and 0 <= hi < k and (n + lo + hi - k) % s <= hi
               for (lo, hi), n, k, s in zip(pads, lhs.shape[1:3], rhs.shape[:2], strides))
    if fits:
      return _conv_nhwc(strides, pads, precision, lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision, **kwargs)


def conv(features, name, *, kernel=3, strides=1, padding='SAME', init_scale=1.0, dtype=jnp.float32):
  """kernel x kernel convolution with the DDPM init, float32 params, `conv_general_dilated`."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 kernel_init=ddpm_init(init_scale), dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=conv_general_dilated, name=name)


def _dense(features, name, *, init_scale=1.0, dtype=jnp.float32):
  return nn.Dense(features, kernel_init=ddpm_init(init_scale), dtype=dtype,
                  param_dtype=jnp.float32, name=name)


class Downsample(nn.Module):
  """Halves the resolution: conv3x3 stride 2, or 2x2 average pooling.

  padding='same' is TensorFlow 'SAME' (pad 0 before, 1 after for even sizes),
  as the reference and the diffusers DDPM checkpoints (`downsample_padding=0`);
  'symmetric' pads 1 on each side (diffusers `downsample_padding=1`).
  """
  with_conv: bool = True
  padding: str = 'same'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.with_conv:
      return avg_pool_2x2(x)
    pad = {'same': 'SAME', 'symmetric': ((1, 1), (1, 1))}[self.padding]
    return conv(x.shape[-1], 'conv', strides=2, padding=pad, dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour, then conv3x3 when `with_conv`."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.with_conv:
      x = conv(x.shape[-1], 'conv', dtype=self.dtype)(x)
    return x


class ResBlock(nn.Module):
  """Residual block with timestep conditioning (DDPM Appendix B, Wide ResNet style).

    h = conv1(swish(norm1(x))) + temb_proj(swish(temb))[:, None, None, :]
    h = conv2(dropout(swish(norm2(h))))
    out = shortcut(x) + h

  shortcut is a 1x1 conv ("NIN") when the channel count changes. With
  `resample='down'|'up'` (BigGAN-style, Brock et al. 2019; Song et al. 2021)
  both branches are average-pooled / nearest-upsampled after the first
  activation. conv2 starts near zero, so the block starts as the identity.

  x: [B, H, W, Cin], temb: [B, D] -> [B, H', W', out_ch].
  """
  out_ch: int
  dropout: float = 0.0
  norm_groups: int = 32
  norm_eps: float = 1e-6
  resample: str = 'none'  # none | up | down
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    h = nn.swish(group_norm(self.norm_groups, self.norm_eps, self.dtype, name='norm1')(x))
    if self.resample == 'up':
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.resample == 'down':
      h, x = avg_pool_2x2(h), avg_pool_2x2(x)
    h = conv(self.out_ch, 'conv1', dtype=self.dtype)(h)
    h = h + _dense(self.out_ch, 'temb_proj', dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(group_norm(self.norm_groups, self.norm_eps, self.dtype, name='norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, 'conv2', init_scale=0.0, dtype=self.dtype)(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 'nin_shortcut', kernel=1, dtype=self.dtype)(x)
    return x + h


def head_split(c: int, num_heads: int, num_head_channels: int, what: str) -> tuple[int, int]:
  """(heads, d): num_head_channels > 0 fixes d (heads = c // d), else num_heads fixes heads."""
  heads = c // num_head_channels if num_head_channels > 0 else num_heads
  if heads < 1 or c % heads:
    raise ValueError(f'{what}: {c} channels do not split into {heads} heads')
  return heads, c // heads


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions (DDPM Appendix B; Wang et al. 2018).

    q, k, v = W_q n, W_k n, W_v n            (n = norm(x), per position)
    h = softmax(q k^T / sqrt(d)) v           (per head, d = C / num_heads)
    out = x + proj_out(h)

  One head (d = C) in DDPM. `num_head_channels > 0` fixes d instead of the
  head count (diffusers' `attention_head_dim`). proj_out starts near zero.

  x: [B, H, W, C] -> [B, H, W, C].
  """
  num_heads: int = 1
  num_head_channels: int = 0
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads, d = head_split(c, self.num_heads, self.num_head_channels, 'attention')
    n = group_norm(self.norm_groups, self.norm_eps, self.dtype, name='norm')(x)
    n = n.reshape(b, hgt * wid, c)
    q, k, v = (_dense(c, name, dtype=self.dtype)(n).reshape(b, hgt * wid, heads, d)
               for name in ('q', 'k', 'v'))
    logits = jnp.einsum('bihd,bjhd->bhij', q, k) * (d ** -0.5)
    # Softmax in float32: bfloat16 logits lose the small differences that matter here.
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum('bhij,bjhd->bihd', w, v).reshape(b, hgt * wid, c)
    h = _dense(c, 'proj_out', init_scale=0.0, dtype=self.dtype)(h)
    return x + h.reshape(b, hgt, wid, c)


class CrossAttnBlock(nn.Module):
  """Cross-attention from the H*W positions to text features (Imagen, Saharia et al. 2022,
  sec. 2.2; Stable Diffusion's `SpatialTransformer`, Rombach et al. 2022, sec. 3.3):

    q = W_q norm(x),  k = W_k c,  v = W_v c            (c: context [B, L, D])
    h = softmax(q k^T / sqrt(d) + log mask) v            (per head, d = C / heads)
    out = x + any(mask) * proj_out(h)

  A fully masked context (the null condition) contributes nothing: the block is then the
  identity, the network's unconditional path. proj_out starts at zero.

  x: [B, H, W, C], context: [B, L, D], mask: [B, L] (nonzero = a real token) -> [B, H, W, C].
  """
  num_heads: int = 1
  num_head_channels: int = 0
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask):
    b, hgt, wid, c = x.shape
    heads, d = head_split(c, self.num_heads, self.num_head_channels, 'cross-attention')
    length = context.shape[1]
    n = group_norm(self.norm_groups, self.norm_eps, self.dtype, name='norm')(x)
    q = _dense(c, 'q', dtype=self.dtype)(n.reshape(b, hgt * wid, c)).reshape(b, -1, heads, d)
    context = context.astype(self.dtype)
    k, v = (_dense(c, name, dtype=self.dtype)(context).reshape(b, length, heads, d)
            for name in ('k', 'v'))
    valid = mask.astype(bool)
    logits = jnp.einsum('bihd,bjhd->bhij', q, k).astype(jnp.float32) * (d ** -0.5)
    logits = jnp.where(valid[:, None, None, :], logits, -1e30)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum('bhij,bjhd->bihd', w, v).reshape(b, hgt * wid, c)
    h = _dense(c, 'proj_out', init_scale=0.0, dtype=self.dtype)(h)
    gate = valid.any(axis=1).astype(h.dtype)[:, None, None]
    return x + (gate * h).reshape(b, hgt, wid, c)
