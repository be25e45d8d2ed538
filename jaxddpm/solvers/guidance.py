"""Classifier-free guidance (Ho & Salimans 2022), a wrapper around the model function."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.tree_util import Partial

from jaxddpm.models import conditioning
from jaxddpm.solvers import base


# cond['negative_tokens'] (any 'negative_' key) replaces the null half's 'tokens': a
# negative prompt (the contrast that guidance steers away from).
NEGATIVE = 'negative_'


@dataclasses.dataclass(frozen=True)
class _Guided:
  """The guided model function; the spec is static (hashable), model_fn and w are leaves."""
  spec: tuple[tuple[str, Any], ...]

  def __call__(self, model_fn, guidance_scale, x, t, cond=None):
    cond = {} if cond is None else cond
    batch = x.shape[0]
    negative = {k[len(NEGATIVE):]: v for k, v in cond.items() if k.startswith(NEGATIVE)}
    cond = {k: v for k, v in cond.items() if not k.startswith(NEGATIVE)}
    uncond = conditioning.null(cond, dict(self.spec))
    unknown = sorted(set(negative) - set(uncond))
    if unknown:
      raise ValueError(f'negative conditions {unknown} have no positive counterpart')
    uncond.update(negative)
    both = conditioning.concat(cond, uncond)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = out[:batch], out[batch:]
    c = x.shape[-1]
    guided = (1.0 + guidance_scale) * cond_out[..., :c] - guidance_scale * uncond_out[..., :c]
    # A learned variance (channels c:) is taken from the conditional prediction, as in GLIDE.
    return jnp.concatenate([guided, cond_out[..., c:]], axis=-1)


def classifier_free_guidance(model_fn, guidance_scale, cond_spec: conditioning.Spec) -> Partial:
  """Classifier-free guidance as a model function (Ho & Salimans 2022, eq. 6).

  eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null(c)), with w = guidance_scale and
  null(c) = `conditioning.null(c, cond_spec)`: the guided keys (labels, text) at their null
  value, the others (a super-resolution input) kept; a key 'negative_K' of cond replaces K
  in null(c) (a negative prompt: eps(x_t | negative) instead of eps(x_t | empty prompt)). Both predictions come from one model
  call on the doubled batch. The combination is affine with weights summing to 1, so it is
  applied to the first C output channels whatever the model predicts (eps, x_0 or v); extra
  channels (learned variance) come from the conditional prediction.

  Args:
    model_fn: model_fn(x, t, cond).
    guidance_scale: w >= 0 (0 is the conditional model).
    cond_spec: the model's conditioning spec (e.g. `UNetConfig.cond_spec()`).

  Returns:
    model_fn(x, t, cond) -> [B, ..., C or 2C], a `Partial` (a pytree: under jit the wrapped
    parameters and w are arguments, so a new w does not recompile).
  """
  return Partial(_Guided(tuple(sorted(cond_spec.items()))), base.as_pytree(model_fn),
                 jnp.asarray(guidance_scale, jnp.float32))
