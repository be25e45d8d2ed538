"""Solvers of the reverse process: (init, step) pairs on one chunked `lax.scan` driver.

  solver = make_solver(schedule, 'ddim', num_steps=50, eta=0.0)
  x_0 = sample(model_fn, make_plan(solver), key, (16, 32, 32, 3))

Modules:
  base        the solver protocol, the noise-level `Grid`, respacing
  ddpm, ddim  the solver families: ancestral DDPM (learned variances included), DDIM(eta)
  driver      `Plan`, `make_plan`, `run_chunk`, `sample`: the one sampling loop
  inpainting  `replacement(solver, known, mask)`, a step wrapper; `masked_psnr`
  repaint     `repaint.make_plan(solver, jump_length, resample)`, a plan-level wrapper
  guidance    `classifier_free_guidance(model_fn, w, cond_spec)`, a model_fn wrapper

Indices are 0-based as in `jaxddpm.schedules` (index t is the paper's t+1). Fewer steps than
the model was trained with are taken on a respaced schedule (improved DDPM sec. 4: betas
recomputed from the kept alphas_cumprod); its `timestep_map` makes the model see the
original timesteps.
"""

from __future__ import annotations

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import ddim
from jaxddpm.solvers import ddpm
from jaxddpm.solvers import driver
from jaxddpm.solvers import guidance
from jaxddpm.solvers import inpainting
from jaxddpm.solvers import repaint
from jaxddpm.solvers.driver import OP_SKIP, OP_STEP, Plan, State, make_plan, run_chunk, sample
from jaxddpm.solvers.guidance import classifier_free_guidance
from jaxddpm.solvers.inpainting import masked_psnr

SOLVERS = ('ddpm', 'ddim')


def make_solver(schedule: schedules_lib.Schedule, name: str = 'ddpm', *,
                num_steps: int | None = None, eta: float = 0.0,
                timestep_spacing: str = 'uniform', model_mean_type: str = 'eps',
                model_var_type: str = 'fixedlarge', clip_denoised: bool = True):
  """The solver `name` on `schedule`, respaced to `num_steps`. Host-side.

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    name: one of SOLVERS: 'ddpm' (ancestral, `ddpm.py`; the variance of `model_var_type`)
      or 'ddim' (`ddim.py`).
    num_steps: number of steps (default T). Fewer than T respaces the schedule on
      `timestep_spacing`, a name in `schedules.SPACINGS`: 'uniform' (improved-diffusion's),
      'ddim', diffusers' 'leading' / 'trailing' / 'linspace', or 'quad'
      (see `schedules.space_timesteps`).
    eta: DDIM's eta in [0, 1] (0: deterministic given x_T; 1: DDPM-like variance); unused
      by 'ddpm'.
    model_mean_type, model_var_type, clip_denoised: as in `diffusion.p_mean_variance`
      (clip_denoised clips the predicted x_0 to [-1, 1]).

  Returns:
    a solver (`base.Solver`): run it with `sample` / `make_plan`, wrap it with
    `inpainting.replacement` or `repaint.make_plan`.

  Raises:
    ValueError: naming the bad argument.
  """
  if name not in SOLVERS:
    raise ValueError(f'unknown solver {name!r}; expected one of {SOLVERS}')
  schedule = base.respaced(schedule, num_steps, timestep_spacing)
  options = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
                 clip_denoised=clip_denoised)
  if name == 'ddim':
    return ddim.ddim(schedule, eta=eta, **options)
  return ddpm.ddpm(schedule, **options)


__all__ = [
    'SOLVERS', 'make_solver', 'base', 'ddim', 'ddpm', 'driver', 'guidance', 'inpainting',
    'repaint', 'OP_SKIP', 'OP_STEP', 'Plan', 'State', 'make_plan', 'run_chunk', 'sample',
    'classifier_free_guidance', 'masked_psnr',
]
