"""jaxddpm: Denoising Diffusion Probabilistic Models in JAX/Flax.

The core (schedules, diffusion math, the U-Net, samplers) is pure and jit-able;
the shell (data, training loop, checkpoints, CLIs) does the I/O.
"""

__version__ = '0.1.0'


def load_run(workdir, **kwargs):
  """Returns (config, params, model_fn) of a trained or converted run. See `jaxddpm.runs`."""
  from jaxddpm import runs  # pylint: disable=g-import-not-at-top
  return runs.load_run(workdir, **kwargs)
