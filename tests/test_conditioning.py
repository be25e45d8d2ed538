"""The conditioning pytree: null values, dropout to them, and the key check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm.models import conditioning

SPEC = {'label': conditioning.Label(10, dropout=0.2),
        'context': conditioning.Fill(0.0, dropout=0.2),
        'pooled': conditioning.Fill(0.0, dropout=0.5),
        'low_res': conditioning.Fill(0.0, guided=False)}


def _cond(batch):
  rng = np.random.default_rng(0)
  return {'label': jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
          'context': jnp.asarray(rng.normal(size=(batch, 3, 2)) + 5, jnp.float32),
          'pooled': jnp.asarray(rng.normal(size=(batch, 2)) + 5, jnp.float32),
          'low_res': jnp.asarray(rng.normal(size=(batch, 2, 2, 1)) + 5, jnp.float32)}


def test_drop_shares_one_draw_per_example():
  batch = 4000
  cond = _cond(batch)
  key = jax.random.key(3)
  out = conditioning.drop(cond, SPEC, key)
  u = np.asarray(jax.random.uniform(key, (batch,)))  # the documented draw
  label_dropped = np.asarray(out['label']) == 10
  np.testing.assert_array_equal(label_dropped, u < 0.2)
  # Equal rates drop together; a higher rate nests the lower one.
  np.testing.assert_array_equal(np.all(np.asarray(out['context']) == 0, (1, 2)), label_dropped)
  pooled_dropped = np.all(np.asarray(out['pooled']) == 0, 1)
  np.testing.assert_array_equal(pooled_dropped, u < 0.5)
  assert np.all(pooled_dropped[label_dropped])
  # Kept examples are untouched, and a key without dropout is never touched.
  np.testing.assert_array_equal(np.asarray(out['label'])[~label_dropped],
                                np.asarray(cond['label'])[~label_dropped])
  np.testing.assert_array_equal(out['low_res'], cond['low_res'])
  assert abs(label_dropped.mean() - 0.2) < 0.03  # 4.7 standard errors


def test_drop_rates_zero_and_one():
  cond = {'label': jnp.arange(6) % 3}
  keep = conditioning.drop(cond, {'label': conditioning.Label(3)}, jax.random.key(0))
  np.testing.assert_array_equal(keep['label'], cond['label'])
  gone = conditioning.drop(cond, {'label': conditioning.Label(3, dropout=1.0)}, jax.random.key(0))
  np.testing.assert_array_equal(gone['label'], np.full(6, 3))


def test_null_keeps_unguided_keys():
  cond = _cond(3)
  out = conditioning.null(cond, SPEC)
  np.testing.assert_array_equal(out['label'], np.full(3, 10))
  np.testing.assert_array_equal(out['context'], np.zeros((3, 3, 2)))
  np.testing.assert_array_equal(out['low_res'], cond['low_res'])


def test_tokens_null_is_the_empty_prompt():
  kind = conditioning.Tokens(null_tokens=(49406, 49407, 0, 0))
  out = kind.null(jnp.ones((2, 4), jnp.int32))
  np.testing.assert_array_equal(out, [[49406, 49407, 0, 0]] * 2)
  with pytest.raises(ValueError, match='length 4'):
    kind.null(jnp.ones((2, 5), jnp.int32))


def test_unknown_keys_and_mismatched_halves_are_errors():
  with pytest.raises(ValueError, match=r"unexpected conditioning key\(s\) \['tokens'\]"):
    conditioning.drop({'tokens': jnp.zeros((2, 3))}, SPEC, jax.random.key(0))
  conditioning.check({'tokens': jnp.zeros((2, 3))}, SPEC, ignore=('tokens',))
  with pytest.raises(ValueError, match='different keys'):
    conditioning.concat({'label': jnp.zeros(2)}, {})
  both = conditioning.concat({'label': jnp.arange(2)}, {'label': jnp.arange(2, 4)})
  np.testing.assert_array_equal(both['label'], [0, 1, 2, 3])


def test_kinds_are_hashable_for_static_use():
  assert hash(tuple(sorted(SPEC.items()))) == hash(tuple(sorted(dict(SPEC).items())))
