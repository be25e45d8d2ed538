"""The data iterator's state in the Orbax checkpoint, and resuming workdirs of older runs."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxddpm import checkpoint
from jaxddpm import data
from jaxddpm import workdir as workdir_lib


@pytest.fixture(scope='module')
def digits():
  return data.digits_source('train', 8, 1)


def _pipeline(source, **kw):
  return data.Pipeline(source, global_batch_size=64, seed=0, random_flip=True, **kw)


def _state(step):
  return {'params': {'w': jnp.full((3,), float(step))}, 'step': jnp.int32(step)}


def _saved(tmp_path, source, step, **kw):
  """A checkpoint at `step` whose data iterator has yielded batches 0..step-1."""
  it = _pipeline(source, **kw).iterate(0)
  for _ in range(step):
    next(it)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(step, _state(step), data=it)
  it.close()
  return str(tmp_path)


def test_grain_handler_writes_the_state_and_it_restores(tmp_path, digits):
  directory = _saved(tmp_path, digits, 5, num_workers=1)
  # Grain's Orbax handler: one JSON file per process, the iterator's get_state().
  with open(os.path.join(directory, '5', 'data', 'process_0-of-1.json')) as f:
    assert json.load(f) == {'next_step': 5, 'seed': 0, 'num_examples': 1500,
                            'global_batch_size': 64, 'random_flip': True, 'with_labels': False}
  it = _pipeline(digits).iterate(0)  # no workers now: the state does not depend on them
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.restore_data(5, it)
    assert ckpt.item_names(5) == ['params', 'train']  # the data item is not a model item
  assert it.step == 5
  np.testing.assert_array_equal(next(it)['x'], _pipeline(digits).batch(5)['x'])
  it.close()


def test_a_checkpoint_without_data_state_resumes_at_its_step(tmp_path, digits):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(4, _state(4))  # as runs before the data item saved it
    it = _pipeline(digits).iterate(0)
    assert not ckpt.restore_data(4, it)
    workdir_lib.restore_data_state(ckpt, 4, it, str(tmp_path))
  assert it.step == 4
  np.testing.assert_array_equal(next(it)['x'], _pipeline(digits).batch(4)['x'])
  it.close()


def test_a_damaged_data_state_warns_and_resumes_at_the_step(tmp_path, digits, caplog):
  directory = _saved(tmp_path, digits, 3)
  with open(os.path.join(directory, '3', 'data', 'process_0-of-1.json'), 'w') as f:
    f.write('{"next_st')
  it = _pipeline(digits).iterate(0)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(directory) as ckpt:
    workdir_lib.restore_data_state(ckpt, 3, it, directory)
  assert it.step == 3 and 'data state of checkpoint 3 cannot be read' in caplog.text
  it.close()


@pytest.mark.parametrize('change, message', [
    (dict(seed=1), r'seed 0 \(saved\) vs 1'),
    (dict(source='test'), r'num_examples 1500 \(saved\) vs 297'),
    (dict(random_flip=False), r'random_flip True \(saved\) vs False'),
])
def test_another_data_order_is_one_clear_error(tmp_path, digits, change, message):
  directory = _saved(tmp_path, digits, 3)
  change = dict(change)  # the parameters are shared between runs of the test
  source = data.digits_source('test', 8, 1) if change.pop('source', None) else digits
  it = data.Pipeline(source, **{**dict(global_batch_size=64, seed=0, random_flip=True),
                                **change}).iterate(0)
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(workdir_lib.WorkdirError, match=f'Checkpoint 3 in .*: .*{message}'):
      workdir_lib.restore_data_state(ckpt, 3, it, directory)
  it.close()


def test_a_data_state_of_another_step_is_refused(tmp_path, digits):
  directory = _saved(tmp_path, digits, 3)
  with open(os.path.join(directory, '3', 'data', 'process_0-of-1.json')) as f:
    state = json.load(f)
  with open(os.path.join(directory, '3', 'data', 'process_0-of-1.json'), 'w') as f:
    json.dump(dict(state, next_step=2), f)
  it = _pipeline(digits).iterate(0)
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(workdir_lib.WorkdirError, match='data state for step 2, not 3'):
      workdir_lib.restore_data_state(ckpt, 3, it, directory)
  it.close()


def _old_config_json(workdir, config, edit):
  saved = workdir_lib.config_dict(config)
  edit(saved['data'])
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), 'w') as f:
    json.dump(saved, f)


def test_old_configs_with_shuffle_buffer_and_without_num_workers_still_resume(tmp_path):
  config = tiny.get_config()
  assert 'shuffle_buffer' not in config.data

  def older(data_section):
    data_section['shuffle_buffer'] = 10_000  # removed: it never changed the order
    del data_section['num_workers']  # added later; how data is read, not what it is
  _old_config_json(str(tmp_path), config, older)
  workdir_lib.check_compatible(config, str(tmp_path), has_checkpoints=True)
  config.data.num_workers = 3
  workdir_lib.check_compatible(config, str(tmp_path), has_checkpoints=True)
  config.data.image_size = 16  # what the data is: still refused
  with pytest.raises(workdir_lib.WorkdirError, match='data.image_size: 8 .saved. vs 16'):
    workdir_lib.check_compatible(config, str(tmp_path), has_checkpoints=True)
