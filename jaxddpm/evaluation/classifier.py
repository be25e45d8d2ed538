"""Held-out accuracy of a noisy classifier p_phi(y | x_t, t) at chosen noise levels.

For timestep index t, every held-out image x (config.data.eval_split) is noised once,
x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, and classified; the accuracy is the fraction
whose argmax is the label. Guidance needs the classifier at every level, so the table runs
from the data (t = 0) to nearly pure noise, where the accuracy falls to chance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import data
from jaxddpm import diffusion
from jaxddpm import parallel

# The fractions of T at which training logs the held-out accuracy.
LEVELS = (0.0, 0.25, 0.5, 0.75, 0.9)


@jax.jit
def _correct(classifier_fn, schedule, x, y, t, key):
  noise = jax.random.normal(key, x.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, x, t, noise)
  logits = classifier_fn(x_t, schedule.timestep_map[t])
  return jnp.argmax(logits, axis=-1) == y


def accuracy_by_level(classifier_fn, schedule, images, labels, key, *, timesteps,
                      batch_size: int = 256, mesh=None) -> dict[int, float]:
  """{t: held-out accuracy at timestep index t} for each t of `timesteps`.

  Args:
    classifier_fn: classifier_fn(x, t) -> logits [B, K] (a `Partial` over the parameters).
    images: float32 [N, H, W, C] in [-1, 1]; labels: int [N].
    key: batch i of level t draws its noise from fold_in(fold_in(key, t), i).
  """
  n = len(images)
  batch_size = parallel.round_to_mesh(min(batch_size, n), mesh)
  out = {}
  for t in timesteps:
    right = []
    for i, start in enumerate(range(0, n, batch_size)):
      idx = np.arange(start, min(start + batch_size, n))
      padded = np.pad(idx, (0, batch_size - len(idx)), mode='edge')  # one shape: one compile
      x = parallel.host_array_to_global(np.asarray(images, np.float32)[padded], mesh)
      y = parallel.host_array_to_global(np.asarray(labels, np.int32)[padded], mesh)
      tt = parallel.host_array_to_global(np.full((batch_size,), t, np.int32), mesh)
      ok = _correct(classifier_fn, schedule, x, y, tt,
                    jax.random.fold_in(jax.random.fold_in(key, int(t)), i))
      right.append(parallel.fetch(ok)[:len(idx)])
    out[int(t)] = float(np.mean(np.concatenate(right)))
  return out


def held_out_accuracy(config, classifier_fn, schedule, key, *, mesh=None) -> dict[str, float]:
  """{'accuracy_t<t>': accuracy} on config.data.eval_split at t = round(f (T - 1)), f in
  LEVELS."""
  batches = list(data.eval_batches(config, batch_size=1024, num_examples=None))
  images = np.concatenate([b['x'] for b in batches])
  labels = np.concatenate([b['cond']['label'] for b in batches])
  steps = [int(round(f * (schedule.num_timesteps - 1))) for f in LEVELS]
  acc = accuracy_by_level(classifier_fn, schedule, images, labels, key, timesteps=steps,
                          batch_size=int(config.sampling.batch_size), mesh=mesh)
  return {f'accuracy_t{t}': v for t, v in acc.items()}
