"""Checkpoints: exact round trips, keep-N, params-only checkpoints for converters."""

import os

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


def _remove(path):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _garbage(path):
  """Overwrites every data file of an item with bytes that decode to NaN (or do not decode)."""
  for root, _, names in os.walk(path):
    for name in names if os.path.basename(root) == 'd' else ():
      target = os.path.join(root, name)
      size = os.path.getsize(target)
      with open(target, 'r+b') as f:
        f.write(b'\xff' * size)


_DAMAGE = {
    'missing manifest': lambda step: _remove(step / 'ema_params' / 'manifest.ocdbt'),
    'garbage in a data file': lambda step: _garbage(step / 'ema_params'),
    'missing ema_params item': lambda step: _remove(step / 'ema_params'),
    'missing train item': lambda step: _remove(step / 'train'),
}


def _two_checkpoints(directory):
  with checkpoint.Checkpointer(directory) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(step), force=True)


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, damage, caplog):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  _two_checkpoints(directory)
  _DAMAGE[damage](tmp_path / 'checkpoints' / '2')
  mesh = parallel.make_mesh()
  abstract = _abstract(_state(0), parallel.replicated(mesh))
  with checkpoint.Checkpointer(directory) as ckpt:
    step, state, rejected = ckpt.restore_newest_good(abstract)
  assert step == 1 and [s for s, _ in rejected] == [2], rejected
  jax.tree.map(np.testing.assert_array_equal, state.params, _state(1).params)
  if damage != 'missing train item':  # sampling needs no optimizer state
    params, used = checkpoint.load_params_and_step(str(tmp_path))
    assert used == 1
    jax.tree.map(np.testing.assert_array_equal, params, _state(1).ema_params)
    assert any('Checkpoint 2 ' in r.getMessage() and 'using checkpoint 1' in r.getMessage()
               for r in caplog.records)


def test_a_stray_empty_step_folder_is_skipped(tmp_path):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  _two_checkpoints(directory)
  os.makedirs(os.path.join(directory, '7'))
  params, used = checkpoint.load_params_and_step(str(tmp_path))
  assert used == 2
  jax.tree.map(np.testing.assert_array_equal, params, _state(2).ema_params)


def test_non_finite_parameters_are_rejected_on_restore(tmp_path):
  directory = checkpoint.checkpoint_dir(str(tmp_path))
  bad = _state(2)
  bad = bad.replace(ema_params=jax.tree.map(lambda x: x.at[0].set(jnp.nan), bad.ema_params))
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), force=True)
    ckpt.save(2, bad, force=True)
  abstract = _abstract(_state(0), parallel.replicated(parallel.make_mesh()))
  with checkpoint.Checkpointer(directory) as ckpt:
    step, _, rejected = ckpt.restore_newest_good(abstract)
  assert step == 1
  # One NaN in row 0 of each of the two leaves: the (3, 4) kernel's row and the bias' first entry.
  assert rejected == [(2, 'holds non-finite values (5 in ema_params)')]
  with pytest.raises(checkpoint.CheckpointError, match='no usable|Checkpoint 2 .*non-finite'):
    checkpoint.load_params(str(tmp_path), step=2)
