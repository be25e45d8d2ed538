"""Runs `train.train_and_evaluate` on the tiny config in a fresh process (used by test_train.py).

  python tests/train_subprocess.py WORKDIR '{"training.num_train_steps": 8, ...}'

Environment:
  NUM_DEVICES: fake CPU devices of this process (default 4).
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: multi-process run.
  SIGNAL_AT_LOG=S:SIG: send signal SIG to this process when the metrics of step S are written.
  NAN_AT_BATCH=S: the batch of step S (0-based) is all NaN.
  NAN_UPDATE_AT=S: the optimizer update of step S (0-based) is NaN, its loss still finite.
  FAIL_SAVE_AT=S: the background write of checkpoint S fails as on a full disk.
  FAIL_CONFIG_WRITE=1: writing config.json fails midway (ENOSPC).
  MOCK_TFDS=N: run under tfds.testing.mock_data(num_examples=N).
  DISTILL=1: run `distill.distill` on configs/digits_distill.py (the overrides apply to it).

Prints 'SUMMARY <json>' at the end; a TrainError prints its message to stderr and exits 1,
as run_train.py does.
"""

import contextlib
import json
import os
import sys

from absl import logging
import jax

jax.config.update('jax_num_cpu_devices', int(os.environ.get('NUM_DEVICES', '4')))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits_distill  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import data  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import train_io  # noqa: E402  pylint: disable=g-import-not-at-top


def _install_faults(train):
  env = os.environ
  if 'SIGNAL_AT_LOG' in env:
    step, signum = (int(v) for v in env['SIGNAL_AT_LOG'].split(':'))
    write = train_io.MetricWriter.write

    def write_then_signal(self, at_step, metrics):
      write(self, at_step, metrics)
      if at_step == step:
        os.kill(os.getpid(), signum)

    train_io.MetricWriter.write = write_then_signal
  if 'NAN_AT_BATCH' in env:
    nan_step = int(env['NAN_AT_BATCH'])
    # Batches come from Grain workers, so the hook wraps the iterator, not `batch`.
    next_batch = data.BatchIterator.__next__

    def nan_next(self):
      step = self.step
      out = next_batch(self)
      if step == nan_step:
        out['x'] = out['x'] * float('nan')
      return out

    data.BatchIterator.__next__ = nan_next
  if 'NAN_UPDATE_AT' in env:
    _nan_update_at(int(env['NAN_UPDATE_AT']))
  if 'FAIL_SAVE_AT' in env:
    _fail_save_at(int(env['FAIL_SAVE_AT']))
  if 'FAIL_CONFIG_WRITE' in env:
    _fail_config_write()


def _nan_update_at(nan_step):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxddpm import train_state  # pylint: disable=g-import-not-at-top
  make_optimizer = train_state.make_optimizer

  def poison(count):
    return jnp.where(count == nan_step, jnp.nan, 1.0)

  def update(updates, count, params=None):
    del params
    return jax.tree.map(lambda u: u * poison(count), updates), count + 1

  def with_nan_update(optim_config, **kwargs):
    return optax.chain(make_optimizer(optim_config, **kwargs), optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.int32), update))

  train_state.make_optimizer = with_nan_update


def _fail_save_at(fail_step):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  async_save = ocp.StandardCheckpointHandler.async_save

  class _DiskFull:
    def result(self, timeout=None):
      del timeout
      raise OSError(errno.ENOSPC, 'No space left on device')

  async def failing_async_save(self, directory, *args, **kwargs):
    futures = await async_save(self, directory, *args, **kwargs)
    # directory: .../checkpoints/<step>[.orbax-checkpoint-tmp-N]/<item>
    if os.path.basename(os.path.dirname(str(directory))).split('.')[0] == str(fail_step):
      return [*(futures or []), _DiskFull()]
    return futures

  ocp.StandardCheckpointHandler.async_save = failing_async_save


def _fail_config_write():
  import errno  # pylint: disable=g-import-not-at-top
  from jaxddpm import workdir  # pylint: disable=g-import-not-at-top
  fsync = os.fsync

  def full_disk(fd):
    del fd
    raise OSError(errno.ENOSPC, 'No space left on device')

  def write_config(directory, config):
    os.fsync = full_disk
    try:
      return write(directory, config)
    finally:
      os.fsync = fsync

  write = workdir.write_config
  workdir.write_config = write_config


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  # The log lines run_train.py prints (absl's handler, INFO), for tests that read them.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  parallel.maybe_initialize_distributed()
  from jaxddpm import distill  # pylint: disable=g-import-not-at-top
  from jaxddpm import train  # pylint: disable=g-import-not-at-top
  distilling = os.environ.get('DISTILL') == '1'
  config = digits_distill.get_config() if distilling else tiny.get_config()
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for part in path:
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  _install_faults(train)
  mock = contextlib.nullcontext()
  if 'MOCK_TFDS' in os.environ:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    mock = tfds.testing.mock_data(num_examples=int(os.environ['MOCK_TFDS']),
                                  data_dir=config.data.data_dir)
  try:
    with mock:
      summary = (distill.distill(config, workdir) if distilling
                 else train.train_and_evaluate(config, workdir))
  except (train.TrainError, distill.DistillError) as e:
    print(f'error: {e}', file=sys.stderr)
    if isinstance(e, train.SaveError):
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    sys.exit(1)
  print('SUMMARY ' + json.dumps(summary))
  if summary['stopped_by'] is not None:
    sys.exit(128 + summary['stopped_by'])


if __name__ == '__main__':
  main()
