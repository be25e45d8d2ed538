r"""Trains a diffusion model: `python run_train.py --config=configs/digits.py --workdir=runs/digits`.

This file is intentionally kept short: it parses flags and calls
`jaxddpm.train.train_and_evaluate`, where the logic lives (and can be tested
and imported in a notebook). Running the same command again resumes from the
latest checkpoint in the workdir. Override any config field on the command
line, e.g. `--config.training.batch_size=64`. A mistake in the flags, the
config file or an override is one line on stderr and exit status 1.

Multi-host: pass --distributed (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and start one process per host.
"""

# Before anything starts threads: glibc then keeps freed memory for reuse, unless
# --noruntime_tuning (jaxddpm.runtime).
import os  # pylint: disable=g-bad-import-order
import sys  # pylint: disable=g-bad-import-order
from jaxddpm import runtime  # pylint: disable=g-bad-import-order
runtime.tune_from_argv(sys.argv)

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxddpm import config_cli
from jaxddpm import parallel

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None,
    'Call jax.distributed.initialize() (default: only when JAX_COORDINATOR_ADDRESS or '
    'JAX_NUM_PROCESSES is set).')
_RUNTIME_TUNING = runtime.define_flag()
flags.mark_flags_as_required(['config', 'workdir'])
# An empty --workdir would train into the current directory.
flags.register_validator('workdir', lambda workdir: workdir is None or workdir.strip(),
                         message='must not be empty')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _RUNTIME_TUNING.value:
    runtime.disable()  # also when a --flagfile turned it off, which tune_from_argv cannot read
  parallel.maybe_initialize_distributed(_DISTRIBUTED.value)
  from jaxddpm import distill  # pylint: disable=g-import-not-at-top
  from jaxddpm import train  # pylint: disable=g-import-not-at-top
  try:
    if distill.is_distillation(_CONFIG.value):
      summary = distill.distill(_CONFIG.value, _WORKDIR.value)
    else:
      summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except distill.DistillError as e:
    print(f'run_train.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  except train.TrainError as e:
    print(f'run_train.py: error: {e}', file=sys.stderr)
    if isinstance(e, train.SaveError):
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    sys.exit(1)
  if summary['stopped_by'] is not None:
    sys.exit(128 + int(summary['stopped_by']))


if __name__ == '__main__':
  app.run(main, flags_parser=config_cli.parse_flags)
