"""A small CNN on scikit-learn's digits: an offline feature space for sample quality.

Inception-v3 needs a downloaded weight file and sees 8x8 grey digits as
nothing like ImageNet. For the digits quickstart this classifier, trained once
(seconds on a CPU) on the digits training split and cached, plays its part:

- "digits FD": the Fréchet distance (Heusel et al. 2017, eq. 6) between
  Gaussians fitted to its penultimate (128-d) features of samples and of
  the training digits;
- classifier score: exp(E_x KL(p(y|x) || p(y))) over its 10 classes, the
  Inception Score formula (Salimans et al. 2016) with this classifier.

The data are those of the digits pipeline: 1797 8x8 images, the last 297 held
out as the test split, scaled from [0, 16] to [-1, 1] and bilinearly upsampled
to the run's image size.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxddpm import data
from jaxddpm import images as images_lib

NUM_CLASSES = 10
FEATURE_DIM = 128


def load_digits_split(split, image_size):
  """Digits as the data pipeline gives them: (images [N, S, S, 1] float32 in [-1, 1], labels [N]).

  split: 'train' (first 1500) or 'test' (last 297); S = image_size.
  """
  source = data.digits_source(split, image_size, channels=1)
  return source.images, source.labels


class DigitsCNN(nn.Module):
  """conv3x3(32)-pool-conv3x3(64)-pool-dense(128)-dense(10). x: [B, S, S, 1] in [-1, 1].

  Returns (features [B, 128] (post-ReLU penultimate layer), logits [B, 10]).
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(NUM_CLASSES)(features)


def train_classifier(image_size, *, seed=0, num_steps=500, batch_size=64, lr=2e-3):
  """Trains `DigitsCNN` on the training split; returns (params, test_accuracy).

  Adam with cross-entropy; inputs are jittered by up to one pixel (wrap-around
  shifts) so the features do not hinge on exact pixel positions.
  """
  train_x, train_y = load_digits_split('train', image_size)
  test_x, test_y = load_digits_split('test', image_size)
  train_x = images_lib.quantize(train_x)
  model = DigitsCNN()
  key_init, key_train = jax.random.split(jax.random.key(seed))
  params = model.init(key_init, train_x[:1])['params']
  tx = optax.adam(lr)

  def loss_fn(params, x, y):
    _, logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  data_x, data_y = jnp.asarray(train_x), jnp.asarray(train_y)

  # A Python loop over a jitted step: XLA:CPU runs convolutions inside
  # `lax.scan` bodies many times slower than at the top level.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, key):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, data_x.shape[0])
    shift = jax.random.randint(k_shift, (2,), -1, 2)
    x = jnp.roll(data_x[idx], shift, axis=(1, 2))
    grads = jax.grad(loss_fn)(params, x, data_y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for step in range(num_steps):
    params, opt_state = train_step(params, opt_state, jax.random.fold_in(key_train, step))
  _, logits = jax.jit(model.apply)({'params': params}, images_lib.quantize(test_x))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test_y))
  return params, accuracy


def default_cache_dir():
  """$JAXDDPM_CACHE, else ~/.cache/jaxddpm."""
  return os.environ.get('JAXDDPM_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jaxddpm')


@dataclasses.dataclass(frozen=True)
class DigitsExtractor:
  """Feature extractor (see `jaxddpm.evaluation.FeatureExtractor`) from the digits CNN."""
  params: dict
  image_size: int
  test_accuracy: float
  name: str = 'digits_cnn'
  prefix: str = 'digits_'  # metric names: digits_fid, digits_is, digits_kid

  @classmethod
  def load_or_train(cls, cache_path=None, image_size=16, *, seed=0):
    """Loads the classifier from `cache_path` (.npz), or trains it and writes it there.

    Default path: `default_cache_dir()/digits_classifier_{image_size}px_seed{seed}.npz`.
    """
    if cache_path is None:
      cache_path = os.path.join(default_cache_dir(),
                                f'digits_classifier_{image_size}px_seed{seed}.npz')
    cache_path = os.fspath(cache_path)
    if os.path.exists(cache_path):
      with np.load(cache_path) as f:
        if int(f['image_size']) != image_size:
          raise ValueError(f'{cache_path} holds a classifier for {int(f["image_size"])}px '
                           f'digits, not {image_size}px')
        flat = {k[len('params/'):]: f[k] for k in f.files if k.startswith('params/')}
        accuracy = float(f['test_accuracy'])
      params = _unflatten(flat)
    else:
      params, accuracy = train_classifier(image_size, seed=seed)
      flat = {'params/' + k: np.asarray(v) for k, v in _flatten(params).items()}
      os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
      tmp = f'{cache_path}.{os.getpid()}.tmp.npz'  # atomic against concurrent readers
      np.savez(tmp, image_size=image_size, test_accuracy=accuracy, **flat)
      os.replace(tmp, cache_path)
    return cls(params=jax.tree.map(jnp.asarray, params), image_size=image_size,
               test_accuracy=accuracy)

  def features(self, images, *, batch_size=500):
    """images: [N, S, S, 1] uint8 or float in [-1, 1] -> (features [N, 128], logits [N, 10]).

    Images of another size are bilinearly resized to the classifier's.
    """
    x = images_lib.quantize(images)
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'digits images must be [N, H, W, 1], got {x.shape}')
    if x.shape[1:3] != (self.image_size, self.image_size):
      x = np.asarray(jax.image.resize(
          x, (len(x), self.image_size, self.image_size, 1), method='bilinear'))
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      padded = np.pad(chunk, [(0, batch_size - len(chunk))] + [(0, 0)] * 3)  # one compile
      f, l = _apply(self.params, padded)
      feats.append(np.asarray(f)[:len(chunk)])
      logits.append(np.asarray(l)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(logits)


@jax.jit
def _apply(params, x):
  return DigitsCNN().apply({'params': params}, x)


def _flatten(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
