"""Super-resolution conditioning: the low-res input and its noise-conditioning augmentation.

A super-resolution denoiser eps(x_t, t, {'low_res', 'aug_level'}) sees the low-resolution
image upsampled to x's size and concatenated to x_t on the channel axis (SR3, Saharia et al.
2021, sec. 2.1; guided-diffusion's `SuperResModel`); `jaxddpm.models.unet` does that.

Noise-conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models", sec. 4.3;
Imagen, Saharia et al. 2022, sec. 2.5): at training the low-res input z is replaced by a
sample of a variance-preserving forward process at a random level s in [0, 1],

  z_s = alpha(s) z + sigma(s) eps,   alpha(s) = cos(pi s / 2),  sigma(s) = sin(pi s / 2),

eps ~ N(0, I), and s is given to the network (`aug_level`, embedded like the timestep), so
that a model of a cascade learns to correct the artefacts of the stage before it. At s = 0
the input is unchanged; at s = 1 it is pure noise. alpha^2 + sigma^2 = 1, so the log-SNR
is 2 log cot(pi s / 2) (the continuous cosine schedule of Nichol & Dhariwal 2021 without
its offset). At sampling s is a fixed choice (run_sample.py --aug_level).

Residual targets (SRDiff, Li et al. 2022, sec. 3.2): the diffusion runs on
r = c (x - up3(z)), the high-resolution image minus the bicubically upsampled clean low-res
input (Keys' cubic, a = -0.5: the bicubic baseline that SR is scored against, 0.7 dB PSNR
above bilinear on the held-out photos), times a scale c, and a sample is up3(z) + r / c. The residual of 4x photographs has a
standard deviation near 0.18 (data in [-1, 1]); c = 3 gives it about the spread of images,
so the noise levels of the schedule keep their meaning instead of burying the signal at
most of them. The network and its conditioning stay as above; only what x_0 is
changes. A model that has learned little then predicts r ~ 0, i.e. bicubic upsampling,
instead of noise, and what it learns is the detail bicubic misses.

Shapes: low_res [B, h, w, C] float32 in [-1, 1]; s [B] float32.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

CondTransform = Callable[[Mapping[str, jax.Array], jax.Array], dict]


def aug_alpha_sigma(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha(s), sigma(s)) = (cos(pi s / 2), sin(pi s / 2)), float32 of s's shape."""
  s = jnp.asarray(s, jnp.float32)
  angle = 0.5 * jnp.pi * s
  return jnp.cos(angle), jnp.sin(angle)


def noise_low_res(low_res: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  """z_s = alpha(s) z + sigma(s) eps, a sample of q(z_s | z) (module docstring).

  Args:
    low_res: z, [B, h, w, C].
    s: [B] levels in [0, 1].
    noise: eps, [B, h, w, C].
  """
  alpha, sigma = aug_alpha_sigma(s)
  shape = (-1,) + (1,) * (low_res.ndim - 1)
  return alpha.reshape(shape) * low_res + sigma.reshape(shape) * noise


def augment(cond: Mapping[str, jax.Array], s: jax.Array, key: jax.Array) -> dict:
  """`cond` with cond['low_res'] replaced by z_s and cond['aug_level'] = s ([B] float32)."""
  low_res = jnp.asarray(cond['low_res'], jnp.float32)
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), low_res.shape[:1])
  noise = jax.random.normal(key, low_res.shape, jnp.float32)
  return dict(cond, low_res=noise_low_res(low_res, s, noise), aug_level=s)


def train_augmentation(max_level: float) -> CondTransform:
  """The training transform: s ~ U[0, max_level) per example, then `augment`.

  max_level = 0 keeps the low-res input clean (and s = 0), as SR3 trains.
  Returns transform(cond, key) -> cond, pure and jit-able; a cond without 'low_res' is
  returned unchanged.
  """
  if not 0.0 <= max_level <= 1.0:
    raise ValueError(f'the augmentation level bound must be in [0, 1], got {max_level}')

  def transform(cond, key):
    if 'low_res' not in cond:
      return dict(cond)
    level_key, noise_key = jax.random.split(key)
    batch = cond['low_res'].shape[0]
    s = max_level * jax.random.uniform(level_key, (batch,), jnp.float32)
    return augment(cond, s, noise_key)

  return transform


def upsample(low_res: jax.Array, size: tuple[int, int], method: str = 'bilinear') -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C] with half-pixel centres: bilinear for the network's view of
  the low-res input (guided-diffusion's `SuperResModel` interpolates bilinearly too), 'cubic'
  (Keys, a = -0.5) for the residual's base."""
  b, _, _, c = low_res.shape
  return jax.image.resize(low_res, (b, size[0], size[1], c), method)


def residual_base(low_res: jax.Array, size: tuple[int, int]) -> jax.Array:
  """up3(z) of the residual target: [B, h, w, C] -> [B, H, W, C], bicubic."""
  return upsample(jnp.asarray(low_res, jnp.float32), size, 'cubic')


def to_residual(batch: Mapping, scale: float = 1.0) -> dict:
  """{'x': x, 'cond'} -> {'x': scale (x - up3(cond['low_res'])), 'cond'}: the residual target.

  Called on the clean low-res input, before the augmentation noises the network's copy."""
  x = jnp.asarray(batch['x'], jnp.float32)
  return dict(batch, x=scale * (x - residual_base(batch['cond']['low_res'], x.shape[1:3])))


def from_residual(r: jax.Array, low_res: jax.Array, scale: float = 1.0) -> jax.Array:
  """A sample of the residual model back to an image: up3(low_res) + r / scale."""
  return r / scale + residual_base(low_res, r.shape[1:3])
