"""Composition of conditions (Liu et al. 2022, "Compositional Visual Generation with
Composable Diffusion Models", sec. 4, "Concept Conjunction" and "Concept Negation"), a wrapper
around the model function.

Conjunction (AND) of conditions c_1 .. c_N with weights w_i:

  eps~(x_t, t) = eps(x_t, t | null) + sum_i w_i (eps(x_t, t | c_i) - eps(x_t, t | null)),

the score of p(x_t) prod_i (p(x_t | c_i) / p(x_t))^{w_i}, the product of experts read at
each noise level. A negative weight steers away from c_i (NOT). Liu et al.'s negation
eps(x_t | c_2) + w (eps(x_t | c_1) - eps(x_t | c_2)) is the weights (w, 1 - w) on (c_1, c_2);
one condition with weight 1 + w is classifier-free guidance (Ho & Salimans 2022, eq. 6).

The summed scores are the product's score only at the data: at intermediate noise levels the
noised product is not the product of the noised conditionals, so a sampler that integrates
them is biased (Du et al. 2023, "Reduce, Reuse, Recycle", sec. 3); `correctors` adds MCMC
steps at each level that fix most of it.

Conditions are one conditioning pytree (`jaxddpm.models.conditioning`) whose guided keys
carry the conditions on axis 1: label [B, N], tokens [B, N, L], context [B, N, L, D], ...
(`stack_conditions` builds it); keys that guidance does not null (low_res, aug_level) are
[B, ...] and shared by all conditions. All N + 1 predictions come from one model call on
the batch repeated N + 1 times.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxddpm.models import conditioning
from jaxddpm.solvers import base
from jaxddpm.solvers import guidance


def _per_condition(cond: Mapping[str, jax.Array], spec: conditioning.Spec,
                   n: int) -> list[dict[str, jax.Array]]:
  """The N conditions of a stacked cond, each with [B, ...] values."""
  conditioning.check(cond, spec)
  for k, v in cond.items():
    if spec[k].guided and (v.ndim < 2 or v.shape[1] != n):
      raise ValueError(f'cond[{k!r}] has shape {v.shape}; composing {n} conditions needs '
                       f'them on axis 1, [B, {n}, ...] (see stack_conditions)')
  return [{k: v[:, i] if spec[k].guided else v for k, v in cond.items()} for i in range(n)]


@dataclasses.dataclass(frozen=True)
class _Composed:
  """The composed model function; the spec is static (hashable), model_fn and w are leaves."""
  spec: tuple[tuple[str, Any], ...]

  def __call__(self, model_fn, weights, x, t, cond=None):
    spec = dict(self.spec)
    n, batch = weights.shape[0], x.shape[0]
    cond = {} if cond is None else cond
    negative = {k[len(guidance.NEGATIVE):]: v for k, v in cond.items()
                if k.startswith(guidance.NEGATIVE)}
    conds = _per_condition({k: v for k, v in cond.items()
                            if not k.startswith(guidance.NEGATIVE)}, spec, n)
    null = conditioning.null(conds[0], spec)
    unknown = sorted(set(negative) - set(null))
    if unknown:
      raise ValueError(f'negative conditions {unknown} have no positive counterpart')
    null.update(negative)  # a negative prompt takes the null condition's place
    conds.append(null)
    stacked = functools.reduce(conditioning.concat, conds)
    out = model_fn(jnp.concatenate([x] * (n + 1)), jnp.concatenate([t] * (n + 1)), stacked)
    out = out.reshape((n + 1, batch) + out.shape[1:])
    c = x.shape[-1]
    uncond = out[n, ..., :c]
    w = weights.astype(out.dtype).reshape((n,) + (1,) * x.ndim)
    composed = uncond + jnp.sum(w * (out[:n, ..., :c] - uncond), axis=0)
    # A learned variance (channels c:) is the first condition's, as classifier-free guidance
    # takes its conditional half's: one condition with weight 1 + w is exactly that guidance.
    return jnp.concatenate([composed, out[0, ..., c:]], axis=-1)


def compose(model_fn, weights, cond_spec: conditioning.Spec) -> Partial:
  """The composed model function of N conditions (see the module docstring):

    eps~ = eps(x_t | null) + sum_i w_i (eps(x_t | c_i) - eps(x_t | null)),

  null = `conditioning.null(c_1, cond_spec)` (guided keys nulled, the others kept), where a
  cond key 'negative_K' [B, ...] replaces K (a negative prompt: eps(x_t | negative) takes the
  place of eps(x_t | null), as in `classifier_free_guidance`). The
  combination is affine, so it applies to whatever the model predicts (eps, x_0 or v) in the
  first C channels; extra channels (learned variance) come from c_1.

  Args:
    model_fn: model_fn(x, t, cond).
    weights: [N] floats w_i (negative: NOT); N is static (a shape).
    cond_spec: the model's conditioning spec (e.g. `UNetConfig.cond_spec()`).

  Returns:
    model_fn(x, t, cond) -> [B, ..., C or 2C] with cond's guided keys [B, N, ...], a
    `Partial` (under jit the wrapped parameters and the weights are arguments: new weights
    of the same N do not recompile).
  """
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim != 1 or weights.shape[0] < 1:
    raise ValueError(f'weights must be a vector of one weight per condition, got shape '
                     f'{weights.shape}')
  return Partial(_Composed(tuple(sorted(cond_spec.items()))), base.as_pytree(model_fn), weights)


def stack_conditions(conditions: Sequence[Mapping[str, jax.Array]],
                     cond_spec: conditioning.Spec) -> dict[str, jax.Array]:
  """The cond of `compose` from N conditions with the same keys, each {key: [B, ...]}: the
  guided keys stacked on axis 1 ([B, N, ...]), the others (e.g. one low_res input shared by
  all conditions) taken from the first condition."""
  if not conditions:
    raise ValueError('stack_conditions needs at least one condition')
  first = conditions[0]
  for c in conditions:
    conditioning.check(c, cond_spec)
    if set(c) != set(first):
      raise ValueError(f'conditions have different keys: {sorted(first)} and {sorted(c)}')
  return {k: jnp.stack([c[k] for c in conditions], axis=1) if cond_spec[k].guided else v
          for k, v in first.items()}


@dataclasses.dataclass(frozen=True)
class _ComposedEnergy:
  spec: tuple[tuple[str, Any], ...]

  def __call__(self, energy_fn, weights, x, t, cond=None):
    spec = dict(self.spec)
    n, batch = weights.shape[0], x.shape[0]
    conds = _per_condition({} if cond is None else cond, spec, n)
    conds.append(conditioning.null(conds[0], spec))
    stacked = functools.reduce(conditioning.concat, conds)
    e = energy_fn(jnp.concatenate([x] * (n + 1)), jnp.concatenate([t] * (n + 1)), stacked)
    e = jnp.asarray(e, jnp.float32).reshape(n + 1, batch)
    return e[n] + jnp.sum(weights[:, None] * (e[:n] - e[n]), axis=0)


def compose_energy(energy_fn, weights, cond_spec: conditioning.Spec) -> Partial:
  """The energy of the composition `compose` makes of an energy-parameterised model:

    E~(x, t) = E(x, t | null) + sum_i w_i (E(x, t | c_i) - E(x, t | null)),

  whose x-gradient is `compose`'s eps~ of the model's eps = grad_x E (the combination is
  linear), so Metropolis-adjusted correctors (`correctors.with_correctors(..., 'mala',
  energy_fn=...)`) target exactly what the composed sampler integrates (Du et al. 2023,
  sec. 3.3). energy_fn(x, t, cond) -> [B]; cond's guided keys [B, N, ...]; returns [B].
  """
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim != 1 or weights.shape[0] < 1:
    raise ValueError(f'weights must be a vector of one weight per condition, got shape '
                     f'{weights.shape}')
  return Partial(_ComposedEnergy(tuple(sorted(cond_spec.items()))), base.as_pytree(energy_fn),
                 weights)
