"""Inception-v3 as used for FID / IS / KID, in Flax.

This is the network of TensorFlow's `inception-2015-12-05` graph, the one the
original FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016)
code evaluate, in the layout of its PyTorch port `pt_inception-2015-12-05`
(pytorch-fid). It differs from torchvision's Inception-v3 in four blocks:

- Mixed_5b/5c/5d (InceptionA), Mixed_6b..6e (InceptionC) and Mixed_7b
  (InceptionE, "E_1") average-pool their pooling branch *without* counting the
  zero padding (TensorFlow's avg_pool, `count_include_pad=False`);
- Mixed_7c (InceptionE, "E_2") max-pools its pooling branch instead.

Input handling follows pytorch-fid: images in [0, 1] are resized to 299x299
(bilinear, half-pixel centres, no antialiasing: `F.interpolate(...,
align_corners=False)`), then scaled to [-1, 1]. The outputs are the 2048-d
"pool3" features (global average of Mixed_7c) and the 1008-way logits of the
graph's final fully connected layer.

Weights: the published PyTorch file
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
is a torchvision-style state dict (`Conv2d_1a_3x3.conv.weight`, `...bn.running_mean`,
`fc.weight`, ...). `load_torch_state_dict` reads it once (needs torch) and
caches it as .npz beside it; later loads (and a pre-converted .npz) need no torch.
`params_from_state_dict` maps it onto the Flax variables.
"""

import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                   'fid_weights/pt_inception-2015-12-05-6726825d.pth')
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3


def _pad(p):
  """torch-style symmetric padding (ph, pw) -> Flax ((ph, ph), (pw, pw))."""
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU (torchvision BasicConv2d)."""
  features: int
  kernel_size: tuple[int, int] | int
  strides: int = 1
  padding: tuple[int, int] | int = 0

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    k = (k, k) if isinstance(k, int) else tuple(k)
    x = nn.Conv(self.features, k, strides=(self.strides, self.strides),
                padding=_pad(self.padding), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  # TensorFlow's avg_pool averages over the valid (unpadded) pixels only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x, stride, padding=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


class InceptionA(nn.Module):
  """35x35 block (pytorch-fid FIDInceptionA): 1x1 | 5x5 | double 3x3 | avg-pool 1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name='branch1x1')(x)
    b5 = BasicConv(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, strides=2, name='branch3x3')(x)
    bd = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (pytorch-fid FIDInceptionC)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name='branch1x1')(x)
    b7 = BasicConv(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter banks.

  `pool='avg'` is pytorch-fid's FIDInceptionE_1 (Mixed_7b: avg-pool without
  padding in the count); `pool='max'` is FIDInceptionE_2 (Mixed_7c: the TF
  graph max-pools here, unlike the paper).
  """
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name='branch1x1')(x)
    b3 = BasicConv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
    ], axis=-1)
    bd = BasicConv(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
    ], axis=-1)
    if self.pool == 'avg':
      bp = _avg_pool_3x3_same(x)
    elif self.pool == 'max':
      bp = _max_pool_3x3(x, 1, padding=1)
    else:
      raise ValueError(f'pool must be avg or max, got {self.pool!r}')
    bp = BasicConv(192, 1, name='branch_pool')(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x, size):
  """Bilinear resize as torch `F.interpolate(mode='bilinear', align_corners=False)`.

  Half-pixel centres and no antialiasing (so also downsampling matches torch);
  x: [B, H, W, C] -> [B, size, size, C].
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method='bilinear', antialias=False)


class InceptionV3(nn.Module):
  """FID Inception-v3. x: [B, H, W, 3] float in [0, 1] (any H, W).

  Returns dict(pool3=[B, 2048], logits=[B, 1008], logits_unbiased=[B, 1008]);
  `logits_unbiased = pool3 @ W` without the fc bias is what the original TF
  Inception Score code (improved-GAN) and torch-fidelity / torchmetrics use.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = resize_bilinear(x.astype(jnp.float32), INPUT_SIZE)
    x = (2 * x - 1).astype(self.dtype)  # [0, 1] -> [-1, 1], as the TF graph expects
    x = BasicConv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)  # 149x149
    x = BasicConv(32, 3, name='Conv2d_2a_3x3')(x)  # 147x147
    x = BasicConv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)  # 73x73
    x = BasicConv(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, 3, name='Conv2d_4a_3x3')(x)  # 71x71
    x = _max_pool_3x3(x, 2)  # 35x35
    x = InceptionA(32, name='Mixed_5b')(x)  # 256 channels
    x = InceptionA(64, name='Mixed_5c')(x)  # 288
    x = InceptionA(64, name='Mixed_5d')(x)  # 288
    x = InceptionB(name='Mixed_6a')(x)  # 17x17x768
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)  # 8x8x1280
    x = InceptionE('avg', name='Mixed_7b')(x)  # 2048
    x = InceptionE('max', name='Mixed_7c')(x)  # 2048
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, name='fc')
    logits = fc(pool3)
    logits_unbiased = logits - fc.variables['params']['bias']
    return dict(pool3=pool3, logits=logits, logits_unbiased=logits_unbiased)


# ----------------------------------------------------------------------------
# Weights: torch state dict <-> Flax variables.

_BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def variable_shapes():
  """Flax variables of `InceptionV3` as a tree of ShapeDtypeStruct (no allocation)."""
  model = InceptionV3()
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))


def _torch_name(path):
  """Flax variable path (collection, module..., leaf) -> torch state-dict key."""
  collection, *modules, leaf = path
  if modules[-1] == 'bn':
    return '.'.join(modules + [_BN_NAMES[leaf]])
  if modules[-1] == 'conv' and leaf == 'kernel':
    return '.'.join(modules + ['weight'])
  if modules == ['fc']:
    return 'fc.' + {'kernel': 'weight', 'bias': 'bias'}[leaf]
  raise ValueError(f'unexpected Inception variable {collection}/{"/".join(modules)}/{leaf}')


def _torch_shape(path, shape):
  """Shape of the torch tensor for a Flax variable (OIHW convs, [out, in] linear)."""
  leaf = path[-1]
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel':
    return (shape[1], shape[0])
  return tuple(shape)


def _paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def state_dict_shapes():
  """{torch key: shape} of the pt_inception-2015-12-05 state dict (without num_batches_tracked)."""
  return {_torch_name(path): _torch_shape(path, leaf.shape)
          for path, leaf in _paths(variable_shapes())}


def params_from_state_dict(state_dict):
  """Maps a pt_inception state dict {key: array} onto `InceptionV3` variables.

  Convs OIHW -> HWIO, linear [out, in] -> [in, out]; BatchNorm weight/bias ->
  params scale/bias, running_mean/var -> batch_stats mean/var. Extra keys
  (`num_batches_tracked`) are ignored; missing or misshaped keys raise.
  """
  def convert(path, leaf):
    key = _torch_name(path)
    if key not in state_dict:
      raise KeyError(f'Inception weights lack {key!r}')
    value = np.asarray(state_dict[key], np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if value.shape != leaf.shape:
      raise ValueError(f'{key}: shape {value.shape} does not fit {leaf.shape}')
    return jnp.asarray(value)

  shapes = variable_shapes()
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = [convert(tuple(k.key for k in path), leaf) for path, leaf in flat]
  return jax.tree.unflatten(treedef, leaves)


def synthetic_state_dict(seed):
  """Deterministic pseudo-random pt_inception state dict (float32 numpy), for tests.

  Each tensor comes from its own generator seeded by (seed, crc32(key)), so the
  result does not depend on iteration order and any implementation (torch,
  Flax) can rebuild it from the key names. Convs are He-scaled and the
  BatchNorm statistics are near (0, 1) so activations stay O(1) through the
  depth of the network.
  """
  out = {}
  for key, shape in sorted(state_dict_shapes().items()):
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith('conv.weight'):
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key == 'fc.weight':
      value = rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])
    elif key.endswith(('bn.weight', 'bn.running_var')):
      value = rng.uniform(0.8, 1.2, shape)
    else:  # bn.bias, bn.running_mean, fc.bias
      value = 0.1 * rng.standard_normal(shape)
    out[key] = value.astype(np.float32)
  return out


def load_torch_state_dict(path, *, cache_path=None):
  """Reads Inception weights from a .pth (via torch, cached as .npz) or a .npz.

  A .npz holds the state dict as {torch key: array}. For a .pth the converted
  .npz is written to `cache_path` (default: beside it, same stem) and reused on
  later calls, so torch is only needed the first time.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Inception weights not found at {path!r}. Download {FID_WEIGHTS_URL} '
        'and pass its path (--inception_weights / config.eval.inception_weights).')
  if path.endswith('.npz'):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  cache_path = cache_path or os.path.splitext(path)[0] + '.npz'
  if os.path.exists(cache_path):
    return load_torch_state_dict(cache_path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading {path} needs torch once (pip install torch); or pass a .npz made '
        'from it with jaxddpm.models.inception.convert_weights.') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  arrays = {k: v.detach().cpu().numpy() for k, v in state_dict.items()
            if not k.endswith('num_batches_tracked')}
  tmp = f'{cache_path}.{os.getpid()}.tmp.npz'  # atomic: readers never see half a file
  np.savez(tmp, **arrays)
  os.replace(tmp, cache_path)
  return arrays


def convert_weights(pth_path, npz_path):
  """Converts the published .pth to a torch-free .npz; returns npz_path."""
  load_torch_state_dict(pth_path, cache_path=os.fspath(npz_path))
  return npz_path
