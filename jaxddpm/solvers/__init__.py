"""Solvers of the reverse process: (init, step) pairs on one chunked `lax.scan` driver.

  solver = make_solver(schedule, 'dpmpp_2m', num_steps=20)   # 20 model evaluations
  x_0 = sample(model_fn, make_plan(solver), key, (16, 32, 32, 3))

Modules:
  base        the solver protocol, the noise-level `Grid`, the x_0 prediction, respacing
  ddpm, ddim  ancestral DDPM (learned variances included), DDIM(eta), on a respaced schedule
  dpm_solver  DPM-Solver++ 2M, 3M and 2M SDE (Lu et al. 2022)
  unipc       UniPC-bh2 predictor-corrector, order 2 and 3 (Zhao et al. 2023)
  multistep   the linear multistep step those two share (coefficient tables, float64 host-side)
  heun        Heun's method with stochastic churn (EDM, Karras et al. 2022, Algorithm 2)
  time_grids  time_uniform / logSNR / karras times on the model's trained noise levels
  driver      `Plan`, `make_plan`, `run_chunk`, `sample`: the one sampling loop
  inpainting  `replacement(solver, known, mask)`, a step wrapper; `masked_psnr`
  repaint     `repaint.make_plan(solver, jump_length, resample)`, a plan-level wrapper
  guidance    `classifier_free_guidance(model_fn, w, cond_spec)`, a model_fn wrapper
  classifier_guidance  `classifier_guided(model_fn, classifier_fn, schedule, s)` (eps shift,
              a model_fn wrapper) and `classifier_mean_shift(ddpm_solver, classifier_fn, s)`
  composition `compose(model_fn, weights, cond_spec)`: AND / NOT of conditions, a model_fn wrapper
  correctors  `with_correctors(solver, 'ula' | 'hmc', num_steps=K)`: MCMC at every level

Indices are 0-based as in `jaxddpm.schedules` (index t is the paper's t+1). `num_steps` is
the number of model evaluations (NFE) of every solver. DDPM and DDIM with fewer steps than
the model was trained with run on a respaced schedule (improved DDPM sec. 4: betas
recomputed from the kept alphas_cumprod), whose `timestep_map` makes the model see the
original timesteps. The few-step solvers step between trained noise levels chosen by
`time_grids` (continuous spacings are rounded to the nearest level, and the solver uses that
level's sigma), so the model always sees integer timesteps at their own noise level.
"""

from __future__ import annotations

from jaxddpm import schedules as schedules_lib
from jaxddpm.solvers import base
from jaxddpm.solvers import classifier_guidance
from jaxddpm.solvers import composition
from jaxddpm.solvers import correctors
from jaxddpm.solvers import ddim
from jaxddpm.solvers import ddpm
from jaxddpm.solvers import dpm_solver
from jaxddpm.solvers import driver
from jaxddpm.solvers import guidance
from jaxddpm.solvers import heun
from jaxddpm.solvers import inpainting
from jaxddpm.solvers import multistep
from jaxddpm.solvers import repaint
from jaxddpm.solvers import time_grids
from jaxddpm.solvers import unipc
from jaxddpm.solvers.classifier_guidance import classifier_guided, classifier_mean_shift
from jaxddpm.solvers.composition import compose, compose_energy, stack_conditions
from jaxddpm.solvers.correctors import with_correctors
from jaxddpm.solvers.driver import OP_SKIP, OP_STEP, Plan, State, make_plan, run_chunk, sample
from jaxddpm.solvers.guidance import classifier_free_guidance
from jaxddpm.solvers.inpainting import masked_psnr

SOLVERS = ('ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'unipc', 'heun')
# The solvers that step on `time_grids` (the others on a respaced schedule).
FEW_STEP_SOLVERS = ('dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'unipc', 'heun')
# The options each solver takes besides the prediction's (mean/variance type, clipping,
# thresholding), which all take.
OPTIONS = {
    'ddpm': ('timestep_spacing',),
    'ddim': ('timestep_spacing', 'eta'),
    'dpmpp_2m': ('timestep_spacing', 'lower_order_final'),
    'dpmpp_3m': ('timestep_spacing', 'lower_order_final'),
    'dpmpp_2m_sde': ('timestep_spacing', 'lower_order_final'),
    'unipc': ('timestep_spacing', 'lower_order_final', 'order'),
    'heun': ('timestep_spacing', 's_churn', 's_tmin', 's_tmax', 's_noise'),
}
DEFAULT_FEW_STEPS = 20
# Option values that change nothing (eta = 0 is deterministic DDIM, s_churn = 0 no churn, ...):
# given to a solver that does not take the option, they are not an error.
NEUTRAL = {'eta': 0.0, 's_churn': 0.0, 's_tmin': 0.0, 's_tmax': float('inf'), 's_noise': 1.0}


def spacings(name: str) -> tuple[str, ...]:
  """The timestep spacings solver `name` takes (the first is its default)."""
  if name in ('ddpm', 'ddim'):
    return schedules_lib.SPACINGS
  if name == 'heun':
    return ('karras', 'logSNR', 'time_uniform')
  return ('logSNR', 'time_uniform', 'karras')


def min_steps(name: str, order: int | None = None) -> int:
  """The fewest model evaluations (`--steps`) solver `name` can take."""
  return {'dpmpp_3m': 3, 'unipc': order or 2, 'heun': 3}.get(name, 2)


def check_options(name: str, **options) -> None:
  """Raises ValueError when an option `name` does not take is given (not None, and not at a
  `NEUTRAL` value).

  E.g. check_options('dpmpp_2m', eta=0.5): DDIM's eta means nothing to DPM-Solver++.
  """
  if name not in SOLVERS:
    raise ValueError(f'unknown solver {name!r}; expected one of {SOLVERS}')
  given = {k for k, v in options.items() if v is not None and v != NEUTRAL.get(k, None)}
  extra = sorted(k for k in given if k not in OPTIONS[name])
  if extra:
    takers = sorted({s for k in extra for s in SOLVERS if k in OPTIONS[s]})
    raise ValueError(f'solver {name!r} does not take {", ".join(extra)} (taken by '
                     f'{", ".join(takers)}); {name} takes {", ".join(OPTIONS[name])}')


def make_solver(schedule: schedules_lib.Schedule, name: str = 'ddpm', *,
                num_steps: int | None = None, eta: float | None = None,
                timestep_spacing: str | None = None, order: int | None = None,
                lower_order_final: bool | None = None, s_churn: float | None = None,
                s_tmin: float | None = None, s_tmax: float | None = None,
                s_noise: float | None = None, thresholding: float | None = None,
                model_mean_type: str = 'eps', model_var_type: str = 'fixedlarge',
                clip_denoised: bool = True):
  """The solver `name` on `schedule` with `num_steps` model evaluations. Host-side.

  Args:
    schedule: the schedule the model was trained with ([T] arrays).
    name: one of SOLVERS: 'ddpm' (ancestral, `ddpm.py`), 'ddim' (`ddim.py`), 'dpmpp_2m',
      'dpmpp_3m', 'dpmpp_2m_sde' (DPM-Solver++, `dpm_solver.py`), 'unipc' (`unipc.py`) or
      'heun' (EDM, `heun.py`).
    num_steps: model evaluations (NFE), at least `min_steps(name)`; default T for ddpm / ddim,
      20 for the others. ddpm / ddim respace the schedule to that many steps; heun takes
      N = (num_steps + 1) // 2 sigmas and 2N - 1 evaluations (`solver.nfe`).
    timestep_spacing: one of `spacings(name)`, default the first: for ddpm / ddim a name of
      `schedules.SPACINGS` (`schedules.space_timesteps`; default 'uniform'), for the others
      one of `time_grids.TIME_SPACINGS` (default 'logSNR', for heun 'karras').
    eta: DDIM's eta in [0, 1] (default 0: deterministic given x_T). ddim only.
    order: UniPC's order, 2 (default) or 3. unipc only.
    lower_order_final: lower the order of the last steps (default True). DPM-Solver++, UniPC.
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (default 0, 0, inf, 1). heun only.
    thresholding: dynamic thresholding's percentile of x0_hat, e.g. 0.995 (default off;
      `diffusion.dynamic_threshold`). Every solver.
    model_mean_type, model_var_type, clip_denoised: as in `diffusion.p_mean_variance`
      (clip_denoised clips the predicted x_0 to [-1, 1]). Every solver takes every mean type;
      all but ddpm use only the mean of a learned-variance model.

  Returns:
    a solver (`base.Solver`): run it with `sample` / `make_plan`, wrap it with
    `inpainting.replacement` or (single-step solvers) `repaint.make_plan`.

  Raises:
    ValueError: naming the bad argument: an unknown solver, fewer steps than its minimum, an
      option it does not take (e.g. eta for dpmpp_2m, s_churn for anything but heun).
  """
  check_options(name, eta=eta, timestep_spacing=timestep_spacing, order=order,
                lower_order_final=lower_order_final, s_churn=s_churn, s_tmin=s_tmin,
                s_tmax=s_tmax, s_noise=s_noise)
  spacing = timestep_spacing or spacings(name)[0]
  if spacing not in spacings(name):
    raise ValueError(f'solver {name!r} takes the timestep spacings {spacings(name)}, '
                     f'got {spacing!r}')
  steps = num_steps
  if steps is None:
    steps = schedule.num_timesteps if name in ('ddpm', 'ddim') else DEFAULT_FEW_STEPS
  if steps < min_steps(name, order):
    raise ValueError(f'solver {name!r} needs at least {min_steps(name, order)} model '
                     f'evaluations (steps), got {steps}')
  prediction = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
                    clip_denoised=clip_denoised, thresholding=thresholding)
  if name in ('ddpm', 'ddim'):
    schedule = base.respaced(schedule, steps, spacing)
    if name == 'ddim':
      return ddim.ddim(schedule, eta=0.0 if eta is None else eta, **prediction)
    return ddpm.ddpm(schedule, **prediction)
  if name == 'heun':
    churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return heun.heun(schedule, steps, spacing=spacing,
                     **{k: v for k, v in churn.items() if v is not None}, **prediction)
  lower = True if lower_order_final is None else bool(lower_order_final)
  if name == 'unipc':
    return unipc.unipc(schedule, steps, order=order or 2, spacing=spacing,
                       lower_order_final=lower, **prediction)
  return dpm_solver.dpm_solver_pp(schedule, steps, order=3 if name == 'dpmpp_3m' else 2,
                                  stochastic=name == 'dpmpp_2m_sde', spacing=spacing,
                                  lower_order_final=lower, **prediction)


__all__ = [
    'SOLVERS', 'FEW_STEP_SOLVERS', 'OPTIONS', 'NEUTRAL', 'make_solver', 'check_options', 'min_steps',
    'spacings', 'base', 'ddim', 'ddpm', 'dpm_solver', 'driver', 'guidance', 'heun',
    'inpainting', 'multistep', 'repaint', 'time_grids', 'unipc', 'OP_SKIP', 'OP_STEP', 'Plan', 'State', 'make_plan', 'run_chunk', 'sample',
    'classifier_free_guidance', 'masked_psnr', 'classifier_guidance', 'composition',
    'correctors', 'classifier_guided', 'classifier_mean_shift', 'compose', 'stack_conditions',
    'with_correctors',
]
