"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis", sec. 4): a noisy classifier p_phi(y | x_t, t) steers sampling towards class y.

Two forms, as in the paper:

  eps shift (Algorithm 2, eq. 14), for DDIM and the ODE solvers, a model_fn wrapper:
    eps~(x_t) = eps(x_t) - sqrt(1 - abar_t) s grad_x log p_phi(y | x_t, t),
  mean shift (Algorithm 1), for ancestral DDPM, a wrapper of the DDPM solver:
    x_{t-1} ~ N(mu + s Sigma grad_x log p_phi(y | x_t, t), Sigma),

with s the guidance scale. At s = 1 with the exact eps and the exact noisy classifier the
eps shift is exactly the eps of p_t(x_t | y) (Bayes: grad log p_t(x | y) = grad log p_t(x)
+ grad log p(y | x)), so an exact sampler draws from p(x_0 | y); the mean shift is the
first-order (small-step) expansion of the conditional transition
p(x_{t-1} | x_t) p(y | x_{t-1}) around x_t, exact only as the steps shrink.

The classifier is `classifier_fn(x, t) -> logits [B, K]`, any function (a `Partial` over its
parameters keeps them arguments under jit), called with the model's own inputs: x_t and the
original integer timestep t the model sees (`schedule.timestep_map[t]` of a respaced
schedule), as guided-diffusion's classifier (`cond_fn` through `_WrappedModel`). The label y
[B] int comes from the conditioning pytree under `CLASSIFIER_LABEL` ('classifier_label'),
which the wrappers remove before the model sees cond: an unconditional model never sees it,
and a class-conditional model (guided-diffusion's "conditional + classifier") gets its own
'label' as usual. Wrap classifier guidance outermost (around `classifier_free_guidance`),
so that the inner wrapper never sees the classifier's key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxddpm import diffusion
from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import ddpm

CLASSIFIER_LABEL = 'classifier_label'


def log_prob_grad(classifier_fn, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
  """grad_x log p_phi(y | x, t), by jax.grad of sum_b log_softmax(classifier_fn(x, t))[b, y_b].

  The sum over the batch gives every sample its own gradient, as long as the classifier
  treats samples independently (no batch statistics).

  Args:
    classifier_fn: classifier_fn(x, t) -> logits [B, K].
    x: [B, ...] float32. t: int32 [B], the model's timesteps. y: int [B] in [0, K).

  Returns:
    [B, ...] float32.
  """
  x = jnp.asarray(x, jnp.float32)

  def log_prob(x):
    logits = jnp.asarray(classifier_fn(x, t), jnp.float32)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None].astype(jnp.int32), 1)
    return jnp.sum(picked)

  return jax.grad(log_prob)(x)


def _split_label(cond, label_key: str):
  """(y [B], cond without the classifier's key)."""
  cond = dict(cond or {})
  if label_key not in cond:
    raise ValueError(f'classifier guidance reads the class from cond[{label_key!r}]; cond has '
                     f'{sorted(cond) or "no keys"}')
  y = cond.pop(label_key)
  return y, cond


# The eps shift d eps as a shift of each prediction, x_t fixed: from x_t = alpha x_0 + sigma eps
# (DDPM eq. 4) and v = alpha eps - sigma x_0 (Salimans & Ho 2022, app. D), d x_0 = -(sigma /
# alpha) d eps and d v = d eps / alpha. Applied in closed form rather than by converting to eps
# and back, which in float32 divides by sqrt(1/abar - 1) ~ 1e-2 at t = 0.
def _prediction_shift(model_mean_type: str, abar: jax.Array, shift_eps: jax.Array) -> jax.Array:
  if model_mean_type == 'eps':
    return shift_eps
  if model_mean_type == 'x0':
    return -jnp.sqrt((1.0 - abar) / abar) * shift_eps
  return shift_eps / jnp.sqrt(abar)


@dataclasses.dataclass(frozen=True)
class _EpsShift:
  """The guided model function; the options are static, the functions and arrays leaves."""
  model_mean_type: str
  label_key: str

  def __call__(self, model_fn, classifier_fn, alphas_cumprod, scale, x, t, cond=None):
    y, cond = _split_label(cond, self.label_key)
    out = model_fn(x, t, cond)
    grad = log_prob_grad(classifier_fn, x, t, y)
    abar = diffusion.extract(alphas_cumprod, t, x.ndim)
    shift = _prediction_shift(self.model_mean_type, abar, -jnp.sqrt(1.0 - abar) * scale * grad)
    c = x.shape[-1]
    # A learned variance (channels c:) passes through: guidance moves the mean only.
    return jnp.concatenate([out[..., :c] + shift.astype(out.dtype), out[..., c:]], axis=-1)


def _trained_alphas_cumprod(schedule: schedules_lib.Schedule) -> jax.Array:
  """abar [T] of the schedule the model was trained with (its timesteps are the model's).

  Raises:
    ValueError: a respaced schedule (its index k is not the model's timestep k).
  """
  if not np.array_equal(np.asarray(schedule.timestep_map), np.arange(schedule.num_timesteps)):
    raise ValueError('classifier guidance needs the schedule the model was trained with (the '
                     'model and the classifier see its timesteps), not a respaced one')
  return jnp.asarray(schedule.alphas_cumprod, jnp.float32)


def classifier_guided(model_fn, classifier_fn, schedule: schedules_lib.Schedule, scale, *,
                      model_mean_type: str = 'eps', label_key: str = CLASSIFIER_LABEL) -> Partial:
  """Classifier guidance as a model function, the eps shift (Dhariwal & Nichol 2021,
  Algorithm 2 and eq. 14), for DDIM, DPM-Solver++, UniPC and Heun:

    eps~(x_t, t) = eps(x_t, t) - sqrt(1 - abar_t) s grad_x log p_phi(y | x_t, t),

  y = cond[label_key], abar_t = schedule.alphas_cumprod[t] at the model's timestep t. The
  output keeps the model's parameterisation: an x_0 model's prediction moves by
  +(1 - abar_t) / sqrt(abar_t) s grad, a v model's by -sqrt((1 - abar_t) / abar_t) s grad
  (the same eps~ through DDPM eq. 4 and v = alpha eps - sigma x_0); a learned variance's
  channels are passed through. (Ancestral DDPM can use this too, as guided-diffusion's
  `condition_score`; Algorithm 1 is `classifier_mean_shift`.)

  Args:
    model_fn: model_fn(x, t, cond) -> [B, ..., C or 2C].
    classifier_fn: classifier_fn(x, t) -> logits [B, K], the noisy classifier.
    schedule: the schedule the model was trained with (not respaced).
    scale: s >= 0 (0 is the unguided model; 1 the exact conditional for exact models).
    model_mean_type: what model_fn predicts, 'eps', 'x0' or 'v'.
    label_key: the cond key of y, int [B]; removed from the cond the model sees.

  Returns:
    model_fn(x, t, cond) -> [B, ..., C or 2C], a `Partial` (under jit model_fn, classifier_fn
    and s are arguments: a new scale does not recompile).

  Raises:
    ValueError: an unknown mean type, or a respaced schedule.
  """
  diffusion.check_types(model_mean_type)
  return Partial(_EpsShift(model_mean_type, label_key), base.as_pytree(model_fn),
                 base.as_pytree(classifier_fn), _trained_alphas_cumprod(schedule),
                 jnp.asarray(scale, jnp.float32))


@flax.struct.dataclass
class MeanShift(base.Wrapped):
  """Ancestral DDPM with the classifier's mean shift (Dhariwal & Nichol 2021, Algorithm 1):

    x_{t-1} = mu + s Sigma grad_x log p_phi(y | x_t, t) + sigma_t z,   Sigma = sigma_t^2,

  mu, Sigma DDPM's (`ddpm.DDPM`: fixed or learned variances), no noise at the last step.
  Build with `classifier_mean_shift`.

  solver: the `ddpm.DDPM` it shifts; its noise is unchanged (the same key, `step_terms`).
  classifier_fn: classifier_fn(x, t) -> logits [B, K], called with the model's timesteps.
  scale: float32 scalar s. label_key: static, the cond key of y.
  """
  solver: ddpm.DDPM
  classifier_fn: Any
  scale: jax.Array
  label_key: str = flax.struct.field(pytree_node=False)

  def init(self, x_T: jax.Array, key: jax.Array) -> base.SolverState:
    return self.solver.init(x_T, key)

  def step(self, model_fn, state: base.SolverState, i, key, cond) -> base.SolverState:
    """x_t -> x_{t-1} at t = times[i]; x [B, ...] float32."""
    y, cond = _split_label(cond, self.label_key)
    t, out, noise, not_last = self.solver.step_terms(model_fn, state.x, i, key, cond)
    model_t = jnp.full((state.x.shape[0],), self.solver.schedule.timestep_map[t], jnp.int32)
    grad = log_prob_grad(self.classifier_fn, state.x, model_t, y)
    mean = out['mean'] + self.scale * out['variance'] * grad
    # DDPM's own draw (`ddpm.DDPM.step`) around the shifted mean.
    return state.replace(x=mean + not_last * jnp.exp(0.5 * out['log_variance']) * noise)


def classifier_mean_shift(solver: ddpm.DDPM, classifier_fn, scale, *,
                          label_key: str = CLASSIFIER_LABEL) -> MeanShift:
  """`solver` (ancestral DDPM, e.g. `make_solver(schedule, 'ddpm', ...)`) with classifier
  guidance by the mean shift of Algorithm 1 (see `MeanShift`); y = cond[label_key], which the
  model does not see.

  The shift is first order in the step: with T' respaced steps its error per step grows with
  the step's beta, so use it with many steps (it is exact as beta -> 0).

  Raises:
    ValueError: a solver that is not ancestral DDPM (for DDIM and the ODE solvers use the eps
      shift, `classifier_guided`).
  """
  if not isinstance(solver, ddpm.DDPM):
    raise ValueError(f'the mean shift (Algorithm 1) is for ancestral DDPM, got '
                     f'{type(solver).__name__}; guide DDIM and the ODE solvers with the eps '
                     f'shift, classifier_guided(model_fn, classifier_fn, schedule, scale)')
  return MeanShift(solver=solver, classifier_fn=base.as_pytree(classifier_fn),
                   scale=jnp.asarray(scale, jnp.float32), label_key=label_key)
