"""Test setup: several fake CPU devices, so every sharded code path runs on CPU; for the
sampling tests, factories of tiny run directories and of inpainting inputs."""

import os
import sys

import pytest

# Must happen before JAX initialises its backend.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import jax  # noqa: E402
from jaxddpm import factories

NUM_FAKE_DEVICES = 4
jax.config.update('jax_num_cpu_devices', NUM_FAKE_DEVICES)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # for `configs`


def _write_sample_workdir(path, config, *, scale=0.1, step=0):
  """A run directory: config.json and a params-only checkpoint at `step`.

  The EMA params are random, `scale` times standard normal (no init compilation; the output
  layer of a fresh init is zero, these make every weight matter); the raw params are zeros,
  so a sampler that used them instead of the EMA ones would be noticed.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxddpm import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxddpm import models  # pylint: disable=g-import-not-at-top
  model = factories.create_model(config)
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(1)
  ema = jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  checkpoint.save_params(str(path), jax.tree.map(np.zeros_like, ema), step=step,
                         ema_params=ema)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return str(path)


@pytest.fixture(scope='session')
def make_sample_workdir():
  """make(path, config, *, scale=0.1, step=0) -> a run directory to sample from."""
  return _write_sample_workdir


def _write_inpainting_inputs(folder, size=8, mask_size=8):
  """A random gray image and a mask keeping its left half, as PNGs in `folder`.

  Returns (image uint8 [size, size], image path, mask path).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (size, size), dtype=np.uint8)
  mask = np.zeros((mask_size, mask_size), np.uint8)
  mask[:, :mask_size // 2] = 255  # keep the left half
  Image.fromarray(image).save(folder / 'image.png')
  Image.fromarray(mask).save(folder / 'mask.png')
  return image, str(folder / 'image.png'), str(folder / 'mask.png')


@pytest.fixture(scope='session')
def write_inpainting_inputs():
  """write(folder, size=8, mask_size=8) -> (image, image path, mask path)."""
  return _write_inpainting_inputs
