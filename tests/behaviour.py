"""What tests/test_behaviour.py pins: 20 training losses and fixed-key samples of configs/tiny.py.

`compute()` uses the package's public pieces the way training and sampling do;
tests/fixtures/make_behaviour_fixture.py saved its output (first before the
architecture refactor, again when the data order moved to Grain), so the two must
agree bitwise.
"""

import dataclasses
import os
import platform
import re

import jax
import jaxlib
import numpy as np

from configs import tiny
from jaxddpm import data
from jaxddpm import models
from jaxddpm import runtime
from jaxddpm import solvers
from jaxddpm import train
from jaxddpm import train_state
from jaxddpm import factories

# The CPU features XLA's CPU code generation chooses kernels by: a float32 sum may round
# differently on another instruction set, so bitwise agreement holds per (jaxlib, cores, ISA).
_ISA_FLAGS = re.compile(r'^(avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni\w*)$')

NUM_STEPS = 20
NUM_SAMPLES = 16


def compute() -> dict[str, np.ndarray]:
  config = tiny.get_config()
  device = jax.devices()[0]
  model = factories.create_model(config)
  schedule = factories.schedule(config)
  with jax.default_device(device):
    state = jax.jit(lambda key: train_state.create_train_state(config, model, key))(
        jax.random.PRNGKey(int(config.seed)))
    step = jax.jit(train.make_train_step(config, model, schedule))
    pipeline = data.create_train_pipeline(config)
    losses = []
    for k in range(NUM_STEPS):
      state, metrics = step(state, data.stack_batches([pipeline.batch(k)]))
      losses.append(np.asarray(metrics['loss'])[0])
    out = {'losses': np.asarray(losses, np.float32)}
    types = factories.diffusion_types(config)
    shape = (NUM_SAMPLES, config.data.image_size, config.data.image_size, config.data.channels)
    key = jax.random.key(1234)
    # Without its float64 alpha_bar a Schedule makes `respace` recompute alpha_bar from the
    # float32 betas, the path the code before the refactor had (see test_behaviour.py).
    float32_respacing = dataclasses.replace(schedule, alphas_cumprod64=None)
    for name, base in (('ddim', schedule), ('ddpm', schedule),
                       ('ddpm_float32_respacing', float32_respacing)):
      plan = solvers.make_plan(solvers.make_solver(
          base, name[:4], num_steps=10, eta=0.0, model_mean_type=types['model_mean_type'],
          model_var_type=types['model_var_type']))
      for which in ('params', 'ema_params'):
        model_fn = models.make_model_fn(model, getattr(state, which))
        out[f'{name}_{which}'] = np.asarray(solvers.sample(
            model_fn, plan, key, shape, compiler_options=runtime.step_compiler_options()))
  return out


def machine() -> str:
  """jaxlib version, core count and the host's vector-ISA flags: where two machines agree on
  this, XLA compiles the same CPU kernels, so the recorded values must be reproduced bitwise."""
  flags = set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = {w for w in line.split(':', 1)[1].split() if _ISA_FLAGS.match(w)}
          break
  except OSError:
    flags = {platform.processor()}
  # The core count sets how XLA splits a parallel loop, and so the order of partial sums.
  return (f'jaxlib {jaxlib.__version__}; {platform.machine()}; {os.cpu_count()} cores; '
          + ' '.join(sorted(flags)))
