"""Progressive distillation runs: rounds N -> N/2 -> ... of students, each a training run.

  python run_train.py --config=configs/digits_distill.py \
      --config.distill.teacher=runs/digits --workdir=runs/digits_pd

The workdir holds the distillation config (config.json) and one complete run directory per
round, `rounds/steps_NNNN/` (N: the student's steps), with its own config.json (the
teacher's model and schedule, the student's mean type, `config.distill` naming the round)
and checkpoints. A round is `train.train_and_evaluate` with a teacher: the original run's
EMA parameters for the first round, the previous round's student (EMA) for the others; the
student starts from the teacher's parameters, Adam's learning rate is annealed linearly to 0
within the round (optim.decay_steps = the round's updates). Killing the process and rerunning
the command resumes the unfinished round bit-exactly (the round's own checkpoints); finished
rounds are kept and skipped, so every student can be sampled:

  python run_sample.py --workdir=runs/digits_pd --steps=4

The math is in `jaxddpm.distillation` (the grid, the SNR-0 endpoint, the target); the
workdir layout, which sampling reads too, in `jaxddpm.distill_layout`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from jaxddpm import checkpoint
from jaxddpm import distill_layout
from jaxddpm import distillation
from jaxddpm import factories
from jaxddpm import runs
from jaxddpm import train
from jaxddpm import workdir as workdir_lib

DistillError = distill_layout.DistillError
# The distillation config's sections that define the rounds: a rerun must not change them.
_FIXED = ('distill', 'training', 'optim', 'seed')


def is_distillation(config) -> bool:
  """Whether `config` is a distillation config (run_train.py then runs `distill`)."""
  return 'distill' in config and 'teacher' in config.distill


def round_steps(config) -> list[int]:
  """The students' step counts: start_steps, start_steps / 2, ..., final_steps."""
  d = config.distill
  steps, out = int(d.start_steps), []
  while steps >= int(d.final_steps):
    out.append(steps)
    steps //= 2
  return out


def _power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def check_config(config) -> None:
  """Raises DistillError for a distillation config that cannot run, before any compute."""
  d = config.distill
  if not str(d.teacher).strip():
    raise DistillError('distill.teacher is empty; name the teacher run, e.g. '
                       '--config.distill.teacher=runs/digits')
  start, final = int(d.start_steps), int(d.final_steps)
  if not (_power_of_two(start) and _power_of_two(final) and final <= start):
    raise DistillError(f'distill.start_steps ({start}) and final_steps ({final}) must be powers '
                       'of two with final_steps <= start_steps (each round halves the steps)')
  if d.student_mean_type not in distillation.STUDENT_MEAN_TYPES:
    raise DistillError(f'distill.student_mean_type must be one of '
                       f'{distillation.STUDENT_MEAN_TYPES} (an eps student cannot predict x from '
                       f'pure noise), got {d.student_mean_type!r}')
  if d.weighting not in distillation.WEIGHTINGS:
    raise DistillError(f'distill.weighting must be one of {distillation.WEIGHTINGS}, '
                       f'got {d.weighting!r}')
  t = config.training
  if int(t.num_train_steps) < 1:
    raise DistillError('training.num_train_steps (the updates of each round) must be positive')
  if not 0.0 <= float(d.dropout) < 1.0:
    raise DistillError(f'distill.dropout must be in [0, 1), got {d.dropout}')


def load_teacher(config) -> tuple[ml_collections.ConfigDict, Any]:
  """(the teacher run's config, its EMA parameters as host arrays). Raises DistillError."""
  path = str(config.distill.teacher)
  if not os.path.isdir(path):
    raise DistillError(f'teacher workdir {path!r} does not exist; train it first '
                       f'(run_train.py) or convert official weights into it')
  try:
    if is_distillation(runs.read_config(path)):
      raise DistillError(f'{path!r} is a distillation run; distill from the original run '
                         '(the rounds of a distillation already continue from each other)')
    teacher_config, params, _, step = runs.load_run_and_step(path, ema=True)
  except (FileNotFoundError, ValueError) as e:
    raise DistillError(f'cannot load the teacher {path!r}: {e}') from None
  if is_distillation(teacher_config) or factories.is_distilled(teacher_config):
    raise DistillError(f'{path!r} is a distillation run; distill from the original run (the '
                       'rounds of a distillation already continue from each other)')
  k, t_total = 2 * int(config.distill.start_steps), int(teacher_config.diffusion.num_timesteps)
  if k > t_total:
    raise DistillError(f'distill.start_steps = {config.distill.start_steps} needs a teacher '
                       f'with at least {k} timesteps; {path!r} has {t_total}')
  logging.info('Teacher: %s at step %d (%s prediction, %d timesteps).', path, step,
               teacher_config.diffusion.model_mean_type, t_total)
  return teacher_config, jax.device_get(params)


def round_config(config, teacher_config, steps: int, index: int) -> ml_collections.ConfigDict:
  """The run config of the round whose student takes `steps` steps (round `index`, from 0).

  The teacher's model, schedule and data; the distillation config's training, optim and eval
  sections (optim.decay_steps = the round's updates); the student's mean type; sampling
  set to the student's N steps; `distill` naming the round and its teacher.
  """
  d = config.distill
  out = ml_collections.ConfigDict(copy.deepcopy(teacher_config.to_dict()))
  for section in ('training', 'optim', 'eval'):
    out[section] = ml_collections.ConfigDict(config[section].to_dict())
  out.optim.decay_steps = int(config.training.num_train_steps)
  out.seed = int(config.seed) + index  # a fresh data order and noise each round
  out.model.dropout = float(d.dropout)
  first = index == 0
  out.distill = ml_collections.ConfigDict(dict(
      teacher=str(d.teacher), grid_points=2 * int(d.start_steps), round_steps=int(steps),
      weighting=str(d.weighting), teacher_kind='run' if first else 'student',
      teacher_mean_type=(teacher_config.diffusion.model_mean_type if first
                         else str(d.student_mean_type)),
      teacher_var_type=teacher_config.diffusion.model_var_type))
  out.diffusion.model_mean_type = str(d.student_mean_type)
  out.diffusion.loss_type = 'mse'
  out.diffusion.timestep_sampler = 'uniform'
  if 'sampler' in out.sampling:  # the solver's name in configs saved before `solver`
    del out.sampling['sampler']
  out.sampling.solver = 'ddim'
  for option, neutral in factories.SOLVER_OPTIONS.items():  # the teacher's solver's options
    if option in out.sampling:
      out.sampling[option] = neutral
  out.sampling.num_steps = int(steps)
  out.sampling.train_grid_sampler = 'ddim'
  out.sampling.train_grid_steps = int(steps)
  return out


def _check_workdir(config, workdir: str) -> None:
  """The workdir is new, or holds this distillation (same rounds); writes config.json."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  current = workdir_lib.config_dict(config)
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise DistillError(f'cannot read {path}: {e}') from None
    if 'distill' not in saved:
      raise DistillError(f'{workdir!r} holds a training run, not a distillation; use a new '
                         'workdir for the distillation')
    diffs = [s for s in _FIXED if saved.get(s) != current.get(s)]
    if diffs and os.path.isdir(os.path.join(workdir, distill_layout.ROUNDS_DIR)):
      raise DistillError(f'{workdir!r} holds rounds of a distillation with other settings '
                         f'(config.json differs in {", ".join(diffs)}); use a new workdir')
  try:
    workdir_lib.check_writable(workdir)
    workdir_lib.write_config(workdir, config)
  except workdir_lib.WorkdirError as e:
    raise DistillError(str(e)) from None


def distill(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every round of `config` in `workdir`.

  Returns {'rounds': [{'steps', 'workdir', 'trained_steps', 'loss'}], 'stopped_by': a
  signal number or None (then the remaining rounds did not run)}.

  Raises:
    DistillError: a bad config, teacher or workdir (before any compute).
    train.TrainError: a round that cannot run (its message names the round's workdir).
  """
  check_config(config)
  workdir = os.path.abspath(workdir)
  teacher_config, teacher = load_teacher(config)
  _check_workdir(config, workdir)
  updates = int(config.training.num_train_steps)
  all_steps = round_steps(config)
  summary = {'rounds': [], 'stopped_by': None}
  for index, steps in enumerate(all_steps):
    rdir = distill_layout.round_dir(workdir, steps)
    if not distill_layout.finished(rdir, updates):
      logging.info('Round %d/%d: a %d-step student of the %d-step teacher, %d updates, in %s.',
                   index + 1, len(all_steps), steps, 2 * steps, updates, rdir)
      result = train.train_and_evaluate(round_config(config, teacher_config, steps, index),
                                        rdir, teacher=teacher)
      summary['rounds'].append(dict(steps=steps, workdir=rdir, loss=result['loss'],
                                    trained_steps=result['trained_steps']))
      if result['stopped_by'] is not None:
        summary['stopped_by'] = result['stopped_by']
        return summary
    else:
      logging.info('Round %d/%d (%d steps) is finished; its student is in %s.', index + 1,
                   len(all_steps), steps, rdir)
    teacher = jax.device_get(checkpoint.load_params(rdir, ema=True, step=updates))
  return summary
