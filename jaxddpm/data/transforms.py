"""Per-example Grain transformations, and the main process's conversion of a batch.

A source's records (`jaxddpm.data.sources`) are dicts {'image': encoded file bytes or
uint8 [H, W, C'], 'label': int}, or ready examples {'x': [S, S, C], 'label': int} for the
in-memory sets; captioned sets add 'text' (a str) or 'captions' (all of an image's captions).
Grain applies, in its worker processes:

  * `DecodeImage`: bytes -> uint8 [H, W, C] with PIL (converted to L or RGB); a decoded
    array only has its channels matched; the other keys pass through;
  * `ChooseCaption`: one of an image's captions, drawn per element and epoch;
  * `CenterCropResize`: uint8 [H, W, C] -> uint8 [S, S, C], central square, antialiased
    bicubic resize;
  * `RandomFlip`: a left-right mirror with probability 1/2, seeded per element;
  * `LowRes`: a super-resolution pair, {'x', 'low_res'} with low_res = `bicubic_resize(x)`.

Images stay uint8 until the batch reaches the main process (a quarter of float32's bytes
through Grain's shared memory); `to_model_batch` converts them there to float32 [-1, 1].
"""

from __future__ import annotations

import io
from typing import Any

import grain
import numpy as np
from PIL import Image


class DatasetError(ValueError):
  """A data configuration that cannot work (unknown data set, empty folder, ...)."""


def center_crop_resize(image: np.ndarray, image_size: int, *, center_crop: bool = True) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [S, S, C]: central square crop, then PIL resize.

  PIL's bicubic filter widens its support when downsampling, i.e. it
  antialiases, which matters when LSUN/CelebA images shrink 4-8x.
  """
  h, w = image.shape[:2]
  if center_crop and h != w:
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((image_size, image_size), Image.BICUBIC))
  return out[..., None] if squeeze else out


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, C'] -> uint8 [H, W, channels] (drop alpha, luma, or repeat gray)."""
  if image.ndim == 2:
    image = image[..., None]
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 4 and channels == 3:
    return image[..., :3]
  if c in (3, 4) and channels == 1:
    # ITU-R 601-2 luma, as PIL's convert('L').
    rgb = image[..., :3].astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  raise DatasetError(f'Cannot convert a {c}-channel image to {channels} channels.')


def decode_image(data: bytes, channels: int) -> np.ndarray:
  """An encoded PNG/JPEG file -> uint8 [H, W, channels], converted by PIL to L or RGB."""
  with Image.open(io.BytesIO(data)) as pil:
    image = np.asarray(pil.convert('L' if channels == 1 else 'RGB'))
  return match_channels(image, channels)


def uint8_to_float(image: np.ndarray) -> np.ndarray:
  """uint8 {0..255} -> float32 [-1, 1]: x / 127.5 - 1 (DDPM, Sec. 3.3), in float32."""
  # In place: the main process converts every batch, and each temporary of a 32 x 256^2 x 3
  # batch is 25 MB (a third of the time, and bitwise the same as `x / 127.5 - 1.0`).
  x = image.astype(np.float32)
  np.divide(x, np.float32(127.5), out=x)
  np.subtract(x, np.float32(1.0), out=x)
  return x


class DecodeImage(grain.transforms.Map):
  """{'image': bytes or uint8 [H, W, C'], 'label', ...} -> {'x': uint8 [H, W, channels],
  'label', ...} (other keys, e.g. 'text', unchanged)."""

  def __init__(self, channels: int):
    self.channels = channels

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element['image']
    if isinstance(image, bytes):
      image = decode_image(image, self.channels)
    else:
      image = match_channels(np.asarray(image), self.channels)
    out = {k: v for k, v in element.items() if k != 'image'}
    out['x'] = image
    return out


class CenterCropResize(grain.transforms.Map):
  """{'x': uint8 [H, W, C]} -> {'x': uint8 [S, S, C]} (`center_crop_resize`)."""

  def __init__(self, image_size: int, center_crop: bool = True):
    self.image_size = image_size
    self.center_crop = center_crop

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    x = center_crop_resize(element['x'], self.image_size, center_crop=self.center_crop)
    return dict(element, x=x)


def image_transforms(image_size: int, channels: int,
                     center_crop: bool = True) -> tuple[grain.transforms.Map, ...]:
  """The transformations of an image file's record: decode, then crop and resize."""
  return (DecodeImage(channels), CenterCropResize(image_size, center_crop))


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors {'x': [S, S, C]} left-right with probability 1/2.

  Grain seeds `rng` from (seed, position in the stream), so a flip does not
  depend on which process or worker reads the example.
  """

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, x=element['x'][:, ::-1])
    return element


class ChooseCaption(grain.transforms.RandomMap):
  """{'captions': k strs, ...} -> {'text': one of them, ...}, uniformly at random.

  Grain seeds `rng` from (seed, position in the stream); the training stream repeats the data
  set, so each epoch draws afresh (another of COCO's five captions) while a batch stays a pure
  function of (seed, step).
  """

  def random_map(self, element, rng: np.random.Generator):
    captions = element['captions']
    if not len(captions):
      raise DatasetError('an image of this captioned data set has no caption')
    out = {k: v for k, v in element.items() if k != 'captions'}
    out['text'] = str(captions[int(rng.integers(len(captions)))])
    return out


def bicubic_resize(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] uint8 or float32 -> [size, size, C] of the same dtype: PIL's bicubic resize
  (Keys' kernel, a = -0.5), whose filter support widens by the reduction factor when it
  shrinks, i.e. an antialiased downsampling: the low-res image of a super-resolution pair,
  and (growing) the bicubic baseline the SR metrics compare with. uint8 stays 8-bit, as a saved low-res image
  is; float32 (the in-memory sets) is resized per channel in PIL's 'F' mode."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  if image.dtype == np.uint8:
    if image.shape[-1] in (1, 3):
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      out = np.asarray(pil.resize((size, size), Image.BICUBIC))
      return out.reshape(size, size, image.shape[-1])
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32),
                                         mode='F').resize((size, size), Image.BICUBIC))
              for c in range(image.shape[-1])]
  out = np.stack(channels, axis=-1)
  if image.dtype == np.uint8:
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
  return out.astype(image.dtype)


class LowRes(grain.transforms.Map):
  """{'x': [S, S, C]} -> the same with 'low_res': `bicubic_resize(x, size)` [s, s, C]."""

  def __init__(self, size: int):
    self.size = size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return dict(element, low_res=bicubic_resize(element['x'], self.size))


def _to_float(images: np.ndarray) -> np.ndarray:
  if images.dtype == np.uint8:
    return uint8_to_float(images)
  return np.ascontiguousarray(images, np.float32)


def to_model_batch(batch: dict[str, np.ndarray], with_labels: bool) -> dict[str, Any]:
  """A Grain batch {'x': uint8 or float32 [B, H, W, C], 'label': [B]} -> the model's layout
  {'x': float32 [B, H, W, C] in [-1, 1], 'cond': {'label': int32 [B]}} (cond {} without
  labels). uint8 images become x / 127.5 - 1 here, in the main process. A batch with
  'low_res' [B, s, s, C] (super-resolution pairs) gives cond['low_res'], in [-1, 1] too; one
  with 'tokens' [B, L] (tokenised captions) gives cond['tokens'] int32. Other keys ('text',
  digit_pairs' 'left' and 'right') stay out of the model's batch."""
  cond = {'label': np.asarray(batch['label'], np.int32)} if with_labels else {}
  if 'low_res' in batch:
    cond['low_res'] = _to_float(batch['low_res'])
  if 'tokens' in batch:
    cond['tokens'] = np.asarray(batch['tokens'], np.int32)
  return {'x': _to_float(batch['x']), 'cond': cond}
