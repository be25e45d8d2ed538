"""jaxddpm: Denoising Diffusion Probabilistic Models in JAX/Flax.

The core (schedules, diffusion math, the U-Net, solvers) is pure and jit-able;
the shell (data, training loop, checkpoints, CLIs) does the I/O.
"""

__version__ = '0.1.0'


def load_run(workdir, **kwargs):
  """The run in `workdir` as a `jaxddpm.sample.Run`: `run.sample(16, solver='ddim', steps=50)`,
  and `config, params, model_fn = run`. kwargs: ema=True, step=None (see `jaxddpm.runs`)."""
  from jaxddpm import sample  # pylint: disable=g-import-not-at-top
  return sample.load_run(workdir, **kwargs)


def save_image_grid(images, path):
  """Writes [N, H, W, C] images (uint8, or floats in [-1, 1]) as one PNG grid."""
  from jaxddpm import images as images_lib  # pylint: disable=g-import-not-at-top
  images_lib.save_image_grid(images, path)
