"""The layout of a progressive-distillation workdir (`jaxddpm.distill`), as sampling reads it.

  runs/digits_pd/config.json                 the distillation config (config.distill.teacher)
  runs/digits_pd/rounds/steps_0004/          a complete run directory: the 4-step student
"""

from __future__ import annotations

import json
import os
import re

from jaxddpm import checkpoint
from jaxddpm import runs
from jaxddpm import workdir as workdir_lib

ROUNDS_DIR = 'rounds'


class DistillError(Exception):
  """A distillation that cannot start or continue, or a round that does not exist."""


def round_dir(workdir: str, steps: int) -> str:
  """The run directory of the round whose student takes `steps` steps."""
  return os.path.join(workdir, ROUNDS_DIR, f'steps_{steps:04d}')


def finished(rdir: str, updates: int) -> bool:
  """Whether the round in `rdir` has its final checkpoint (step `updates`)."""
  return updates in checkpoint.saved_steps(rdir)


def finished_rounds(workdir: str) -> dict[int, str]:
  """{student steps: round workdir} of the finished rounds of a distillation workdir."""
  out = {}
  rounds = os.path.join(workdir, ROUNDS_DIR)
  if not os.path.isdir(rounds):
    return out
  for name in sorted(os.listdir(rounds)):
    match = re.fullmatch(r'steps_(\d+)', name)
    rdir = os.path.join(rounds, name)
    if not match:
      continue
    try:
      updates = int(runs.read_config(rdir).training.num_train_steps)
    except (FileNotFoundError, ValueError):
      continue
    if finished(rdir, updates):
      out[int(match.group(1))] = rdir
  return out


def resolve_workdir(workdir: str, steps: int | None) -> str:
  """The run directory to sample: `workdir` itself, or for a distillation workdir the round
  distilled for `steps` steps (default: the fewest steps finished).

  Raises:
    DistillError: no finished round, or none for `steps` (the message lists those there are).
  """
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return workdir  # not a distillation workdir; the caller reports what is wrong with it
  if 'distill' not in saved or 'round_steps' in saved['distill']:
    return workdir
  done = finished_rounds(workdir)
  if not done:
    raise DistillError(f'{workdir!r} is a distillation with no finished round yet; rerun its '
                       'run_train.py command, or sample an unfinished round directly with '
                       f'--workdir={os.path.join(workdir, ROUNDS_DIR, "steps_NNNN")}')
  if steps is None:
    steps = min(done)
  if steps not in done:
    raise DistillError(f'no round of {workdir!r} was distilled for {steps} steps; finished '
                       f'rounds: {", ".join(str(s) for s in sorted(done, reverse=True))} steps')
  return done[steps]
