"""Checkpoints: exact round trips, keep-N, params-only checkpoints for converters."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxddpm import checkpoint
from jaxddpm import parallel


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array
  extra: None = None


def _state(seed):
  k = jax.random.PRNGKey(seed)
  params = {'dense': {'kernel': jax.random.normal(k, (3, 4)), 'bias': jnp.arange(4.0)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = tx.init(params)
  return _State(step=jnp.asarray(seed, jnp.int32), params=params,
                ema_params=jax.tree.map(lambda x: x + 1.0, params),
                opt_state=opt_state, rng=k)


def _abstract(state, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def test_round_trip_is_exact_and_replicated(tmp_path):
  state = _state(7)
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(tmp_path))) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state)
    assert not ckpt.save(7, state)  # an existing step is left as it is
    ckpt.wait()
    restored = ckpt.restore(None, _abstract(state, replicated))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.params['dense']['kernel'].sharding == replicated
  assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)


def test_keeps_latest_n(tmp_path):
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(tmp_path)), keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert checkpoint.saved_steps(str(tmp_path)) == [2, 3]


def test_load_params_reads_training_checkpoints(tmp_path):
  state = _state(3)
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(tmp_path))) as ckpt:
    ckpt.save(3, state)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(str(tmp_path)),
               state.ema_params)
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.load_params(str(tmp_path), ema=False), state.params)


def test_params_only_checkpoints(tmp_path):
  params = _state(0).params
  checkpoint.save_params(str(tmp_path), params, step=5)
  # No EMA saved: ema=True falls back to the raw parameters.
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(str(tmp_path)), params)
  ema = jax.tree.map(lambda x: 2 * x, params)
  checkpoint.save_params(str(tmp_path), params, step=6, ema_params=ema)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(str(tmp_path)), ema)
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.load_params(str(tmp_path), ema=True, step=5), params)
  with pytest.raises(FileExistsError):
    checkpoint.save_params(str(tmp_path), params, step=6)


def test_load_params_without_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    checkpoint.load_params(str(tmp_path / 'missing'))
  assert not (tmp_path / 'missing').exists()
