"""The conditioning pytree: what each key means, its null value, and dropout to it.

A batch is `{'x': [B, ...], 'cond': {...}}` and a denoiser is `model_fn(x, t, cond)`.
The keys of `cond` by convention (DESIGN.md):

  label         [B] int32             class labels (null: the extra class `num_classes`)
  low_res       [B, h, w, C] float32  super-resolution input (never nulled by guidance)
  aug_level     [B] float32           noise-conditioning augmentation level
  tokens        [B, L] int32          text tokens (null: the empty prompt's tokens)
  context       [B, L, D] float32     text features, with context_mask [B, L]
  pooled        [B, D] float32        pooled text feature

An empty dict is unconditional. A *spec* maps each key a model consumes to a `Kind`,
which knows the key's null value (the input that means "no condition"), its training
dropout rate, and whether classifier-free guidance replaces it by the null value.
Training dropout (`drop`) and every guidance method (`null`) go through these two
functions, so labels today and text or low-res images later share one code path:

  eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null(c))   (Ho & Salimans 2022, eq. 6)

where null(c) nulls the guided keys and keeps the rest (a super-resolution model keeps
its low-res input in both halves, as in Imagen).

Kinds are frozen (hashable) dataclasses, so a spec can be static under jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Cond = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Label:
  """Integer class labels [B] in [0, num_classes); the null label is `num_classes`
  (the extra embedding row of a classifier-free-guidance model).

  dropout: the training probability that a label is replaced by the null label.
  """
  num_classes: int
  dropout: float = 0.0
  guided: bool = True

  def null(self, value: jax.Array) -> jax.Array:
    return jnp.full_like(value, self.num_classes)


@dataclasses.dataclass(frozen=True)
class Fill:
  """An array key whose null value is a constant (0 for features such as `context`,
  `pooled`, or a mask). guided=False keeps it in the guidance's null half (`low_res`,
  `aug_level`)."""
  fill: float = 0.0
  dropout: float = 0.0
  guided: bool = True

  def null(self, value: jax.Array) -> jax.Array:
    return jnp.full_like(value, self.fill)


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Token ids [B, L]; the null value is the tokenised empty prompt (`null_tokens`, length L),
  as classifier-free guidance of text models uses it (GLIDE, Imagen)."""
  null_tokens: tuple[int, ...]
  dropout: float = 0.0
  guided: bool = True

  def null(self, value: jax.Array) -> jax.Array:
    tokens = jnp.asarray(self.null_tokens, value.dtype)
    if tokens.shape != value.shape[1:]:
      raise ValueError(f'null_tokens has length {tokens.shape[0]}, tokens are {value.shape}')
    return jnp.broadcast_to(tokens, value.shape)


Kind = Any  # Label | Fill | Tokens | any frozen dataclass with null(value), dropout, guided
Spec = Mapping[str, Kind]


def check(cond: Cond, spec: Spec, *, ignore: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the keys of `cond` that the spec does not know (and that are
  not in `ignore`): a condition a model was not built for is a mistake, not a no-op."""
  unexpected = sorted(set(cond) - set(spec) - set(ignore))
  if unexpected:
    known = sorted(spec) or 'none (unconditional)'
    raise ValueError(f'unexpected conditioning key(s) {unexpected}; this model takes {known}')


def _expand(mask: jax.Array, value: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (value.ndim - 1))


def drop(cond: Cond, spec: Spec, key: jax.Array) -> dict[str, jax.Array]:
  """Training dropout to the null values: key k of example i is nulled where u_i < rate_k.

  One uniform u_i ~ U[0, 1) per example is shared by all keys, so keys with equal rates are
  dropped together (a prompt's tokens, context and pooled feature always vanish as one) and
  keys with different rates nest. Keys without dropout are returned unchanged.

  Args:
    cond: {key: [B, ...]}; B is the leading dimension of every value.
    spec: {key: Kind}; must cover cond (see `check`).
    key: PRNG key of this step's dropout.
  """
  check(cond, spec)
  rated = [k for k in cond if spec[k].dropout > 0]
  if not rated:
    return dict(cond)
  batch = cond[rated[0]].shape[0]
  u = jax.random.uniform(key, (batch,))
  out = dict(cond)
  for k in rated:
    value = cond[k]
    out[k] = jnp.where(_expand(u < spec[k].dropout, value), spec[k].null(value), value)
  return out


def null(cond: Cond, spec: Spec) -> dict[str, jax.Array]:
  """The condition classifier-free guidance contrasts with: guided keys at their null value,
  the others (e.g. `low_res`) unchanged."""
  check(cond, spec)
  return {k: spec[k].null(v) if spec[k].guided else v for k, v in cond.items()}


def concat(a: Cond, b: Cond) -> dict[str, jax.Array]:
  """Two conditions with the same keys stacked along the batch axis (one model call for both
  halves of guidance)."""
  if set(a) != set(b):
    raise ValueError(f'conditions have different keys: {sorted(a)} and {sorted(b)}')
  return {k: jnp.concatenate([a[k], b[k]]) for k in a}
