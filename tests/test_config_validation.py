"""Values that used to pass validation and then lost checkpoints or made NaN samples; the
training CLI's one-line errors for mistakes on its command line; --noruntime_tuning.

Every CLI case fails before anything is compiled, so each run takes a few seconds.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from jaxddpm import config_utils
from jaxddpm import runtime
from jaxddpm import schedules
from jaxddpm import factories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rejected(config) -> str:
  with pytest.raises(ValueError) as info:
    config_utils.validate_config(config)
  return str(info.value)


def test_keep_checkpoints_must_be_positive():
  # Orbax's max_to_keep=0 deletes every checkpoint, the old ones too.
  config = tiny.get_config()
  config.training.keep_checkpoints = 0
  assert _rejected(config).startswith('config.training.keep_checkpoints = 0: ')
  config.training.keep_checkpoints = 1
  config_utils.validate_config(config)


# (field that is named, schedule, overrides): each gives alpha_bar_T = 0 in float32.
ZERO_ALPHA_BAR = [
    ('beta_end', 'linear', {'beta_end': 1.0}),
    ('beta_end', 'quad', {'beta_end': 1.0}),
    ('beta_end', 'sigmoid', {'beta_end': 1.0}),
    ('beta_end', 'const', {'beta_end': 1.0}),
    ('beta_end', 'warmup10', {'beta_end': 1.0}),
    ('beta_end', 'warmup50', {'beta_end': 1.0}),
    ('beta_end', 'linear', {'beta_start': 0.5, 'beta_end': 0.9}),  # 0.3**100 underflows
    ('beta_end', 'linear', {'num_timesteps': 100_000}),  # the defaults, but T = 10**5
    ('beta_schedule', 'jsd', {}),  # its last beta is 1/1
]


@pytest.mark.parametrize('field, schedule, overrides', ZERO_ALPHA_BAR)
def test_schedules_with_zero_alpha_bar_are_rejected(field, schedule, overrides):
  config = tiny.get_config()
  config.diffusion.beta_schedule = schedule
  config.diffusion.update(overrides)
  message = _rejected(config)
  assert message.startswith(f'config.diffusion.{field} = {config.diffusion[field]!r}: '), message
  assert 'alpha_bar_T' in message and 'NaN' in message, message


BAD_COSINE = [
    ('max_beta', 1.0), ('max_beta', 0.0), ('max_beta', 1.5), ('max_beta', math.nan),
    ('cosine_s', 0.0), ('cosine_s', -0.1), ('cosine_s', math.inf), ('cosine_s', math.nan),
    ('cosine_s', 1e300),  # every beta rounds to 0: no noise is ever added
]


@pytest.mark.parametrize('name, value', BAD_COSINE)
def test_cosine_parameters_are_validated(name, value):
  config = tiny.get_config()
  config.diffusion.beta_schedule = 'cosine'
  config.diffusion[name] = value
  message = _rejected(config)
  assert message.startswith(f'config.diffusion.{name} = {value!r}: '), message


@pytest.mark.parametrize('schedule', [s for s in schedules.SCHEDULES if s != 'jsd'])
@pytest.mark.parametrize('num_timesteps', [100, 1000, 4000])
def test_accepted_schedules_keep_alpha_bar_positive(schedule, num_timesteps):
  config = tiny.get_config()
  config.diffusion.beta_schedule = schedule
  config.diffusion.num_timesteps = num_timesteps
  config_utils.validate_config(config)
  s = factories.schedule(config)
  assert float(s.alphas_cumprod[-1]) > 0
  assert np.isfinite(np.asarray(s.sqrt_recip_alphas_cumprod)).all()


@pytest.mark.parametrize('seed', [-1, 2 ** 32, True])
def test_bad_seed_is_rejected(seed):
  # -1 used to fail in the data pipeline after compiling; 2**32 would repeat seed 0.
  config = tiny.get_config()
  config.seed = seed
  assert _rejected(config).startswith(f'config.seed = {seed!r}: ')


@pytest.mark.parametrize('seed', [0, 2 ** 32 - 1])
def test_seed_range_ends_are_accepted(seed):
  config = tiny.get_config()
  config.seed = seed
  config_utils.validate_config(config)


@pytest.mark.parametrize('num_workers', [-2, -7, True])
def test_bad_num_workers_is_rejected(num_workers):
  config = tiny.get_config()
  config.data.num_workers = num_workers
  assert _rejected(config).startswith(f'config.data.num_workers = {num_workers!r}: ')


@pytest.mark.parametrize('num_workers', [-1, 0, 3])
def test_num_workers_accepts_the_machine_default_and_counts(num_workers):
  config = tiny.get_config()
  config.data.num_workers = num_workers
  config_utils.validate_config(config)


def _run_train(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  return subprocess.run([sys.executable, os.path.join(REPO, 'run_train.py'), *args], env=env,
                        capture_output=True, text=True, cwd=cwd, timeout=120)


def _one_error_line(proc) -> str:
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('run_train.py: error: '), proc.stderr
  return lines[0]


def test_cli_unknown_config_field_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  line = _one_error_line(_run_train('--config=configs/tiny.py', '--config.model.chh=3',
                                    f'--workdir={workdir}'))
  assert '--config.model.chh=3' in line and 'Did you mean "ch"' in line, line
  assert not workdir.exists()


def test_cli_missing_config_file_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  line = _one_error_line(_run_train('--config=configs/nope.py', f'--workdir={workdir}'))
  assert 'No such file' in line and 'configs/nope.py' in line, line
  assert not workdir.exists()


@pytest.mark.parametrize('source, line_number, error', [
    ('def get_config(:\n  pass\n', 1, 'SyntaxError: invalid syntax'),
    ('def get_config():\n  raise ValueError("no data_dir")\n', 2, 'ValueError: no data_dir'),
])
def test_cli_broken_config_file_is_one_line(tmp_path, source, line_number, error):
  config_file = tmp_path / 'broken.py'
  config_file.write_text(source)
  line = _one_error_line(_run_train(f'--config={config_file}', f'--workdir={tmp_path / "run"}'))
  assert line.endswith(f'{config_file}, line {line_number}: {error}'), line
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('workdir', ['', ' '])
def test_cli_empty_workdir_is_rejected(tmp_path, workdir):
  # An empty workdir used to train into the current directory.
  line = _one_error_line(_run_train('--config=configs/tiny.py', f'--workdir={workdir}',
                                    cwd=tmp_path))
  assert '--workdir' in line and 'must not be empty' in line, line
  assert not list(tmp_path.iterdir())


def test_cli_bad_seed_fails_before_making_the_workdir(tmp_path):
  workdir = tmp_path / 'run'
  line = _one_error_line(_run_train('--config=configs/tiny.py', '--config.seed=-1',
                                    f'--workdir={workdir}'))
  assert 'config.seed = -1' in line, line
  assert not workdir.exists()


def test_cli_accepts_noruntime_tuning_and_overrides(tmp_path):
  # The config (lock_config=True) takes the overrides; validation sees both of them.
  workdir = tmp_path / 'run'
  line = _one_error_line(_run_train(
      '--config=configs/tiny.py', '--noruntime_tuning', '--config.training.batch_size=64',
      '--config.training.keep_checkpoints=0', f'--workdir={workdir}'))
  assert 'config.training.keep_checkpoints = 0' in line, line
  assert not workdir.exists()


@pytest.mark.parametrize('args, tuned', [
    ([], True),
    (['--noruntime_tuning'], False),
    (['-noruntime_tuning'], False),
    (['--runtime_tuning=false'], False),
    (['--runtime_tuning=0'], False),
    (['--runtime_tuning=True'], True),
    (['--noruntime_tuning', '--runtime_tuning'], True),  # the last one wins, as in absl
    (['--', '--noruntime_tuning'], True),  # not a flag after --
    (['--noruntime_tuning_x'], True),
])
def test_tune_from_argv(monkeypatch, args, tuned):
  monkeypatch.setattr(runtime, '_enabled', True)
  calls = []
  monkeypatch.setattr(runtime, 'keep_freed_host_memory', lambda: calls.append(1))
  assert runtime.tune_from_argv(['run_train.py', *args]) is tuned
  assert calls == ([1] if tuned else [])
  if not tuned:
    assert runtime.step_compiler_options() == {}


def test_disable_turns_off_both_settings(monkeypatch):
  monkeypatch.setattr(runtime, '_enabled', True)
  runtime.disable()
  assert runtime.step_compiler_options() == {}
  assert runtime.keep_freed_host_memory(force=True) is False
