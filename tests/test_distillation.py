"""Progressive distillation: the target against float64 NumPy, a round on an analytic teacher,
the grid and the student's sampler; whole distillation runs of the tiny config."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxddpm import checkpoint
from jaxddpm import distill_layout
from jaxddpm import distillation
from jaxddpm import runs
from jaxddpm import sample
from jaxddpm import schedules
from jaxddpm import solvers
from jaxddpm import train_state
from jaxddpm import train_step

T = 100
MU, S = 0.3, 0.7  # data x ~ N(MU, S^2) per dimension: the optimal denoiser is known
ATOL = 2e-6  # relative to the largest |z''|: float32 tolerance


def _schedule():
  return schedules.make_schedule('linear', T)


def test_target_is_the_x_hat_whose_ddim_step_lands_on_z_tt():
  rng = np.random.default_rng(0)
  z_t, z_tt = rng.normal(size=(2, 5, 3))
  a_t, s_t = 0.3, np.sqrt(1 - 0.09)
  a_tt, s_tt = 0.8, 0.6
  got = np.asarray(distillation.distillation_target(
      jnp.asarray(z_t, jnp.float32), jnp.asarray(z_tt, jnp.float32), a_t, s_t, a_tt, s_tt))
  # float64: the DDIM step x -> a'' x + s'' (z_t - a_t x) / s_t is affine in x; solve for x.
  want = (z_tt - s_tt / s_t * z_t) / (a_tt - s_tt / s_t * a_t)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(a_tt * want + s_tt * (z_t - a_t * want) / s_t, z_tt, atol=1e-12)
  # At the data point (sigma'' = 0) the target is z'' itself.
  np.testing.assert_array_equal(
      np.asarray(distillation.distillation_target(jnp.asarray(z_t), jnp.asarray(z_tt), a_t, s_t,
                                                  1.0, 0.0)), np.asarray(z_tt, np.float32))


def test_grid_points_are_nested_integer_timesteps_with_snr_zero_at_the_top():
  schedule = schedules.make_schedule('linear', 1000)
  grid = distillation.make_time_grid(schedule, 256)
  t = np.asarray(grid.model_t)
  np.testing.assert_array_equal(t[1:], np.round(np.arange(1, 257) * 1000 / 256) - 1)
  assert t[-1] == 999 and len(set(t[1:])) == 256
  abar = np.asarray(schedule.alphas_cumprod64)
  np.testing.assert_allclose(np.asarray(grid.alpha)[1:-1], np.sqrt(abar[t[1:-1]]), rtol=1e-7)
  assert grid.alpha[0] == 1 and grid.sigma[0] == 0 and grid.alpha[-1] == 0 and grid.sigma[-1] == 1
  # Every coarser round's points are points of the first grid (j multiples of K / N).
  coarse = distillation.make_time_grid(schedule, 64)
  np.testing.assert_array_equal(np.asarray(coarse.model_t), t[::4])
  with pytest.raises(ValueError, match='K <= T'):
    distillation.make_time_grid(schedule, 1001)


def _gaussian_teacher(schedule):
  """The optimal eps network for x ~ N(MU, S^2), called with timesteps (as a run's network)."""
  abar = jnp.asarray(np.asarray(schedule.alphas_cumprod64), jnp.float32)

  def apply_fn(params, x, t, cond, key=None):
    a = abar[t][:, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S ** 2 + 1 - a)

  return apply_fn


def _affine_student(params, z, t, cond, key=None):
  """A student that can represent any per-timestep affine map (the teacher's steps are affine
  in z for Gaussian data): v = P[t] z + q[t]."""
  return params['P'][t] * z + params['q'][t]


@pytest.mark.parametrize('mean_type,weighting', [('v', 'truncated_snr'), ('x0', 'snr_plus_one')])
def test_one_round_on_an_analytic_teacher_matches_two_teacher_steps(mean_type, weighting):
  schedule = _schedule()
  k, n, dim = 8, 4, 3
  grid = distillation.make_time_grid(schedule, k)
  teacher = distillation.run_x_hat(_gaussian_teacher(schedule), schedule, grid, mean_type='eps',
                                   var_type='fixedlarge', clip=False)
  student = distillation.student_x_hat(_affine_student, grid, mean_type=mean_type, channels=dim)
  loss_fn = distillation.distillation_objective(student, teacher, grid, n, weighting=weighting)
  optim = ml_collections.ConfigDict(dict(
      lr=3e-2, warmup_steps=0, decay_steps=3000, beta1=0.9, beta2=0.999, eps=1e-12,
      weight_decay=0.0, grad_clip=0.0, ema_decay=0.0))
  steps = jax.jit(train_step.make_teacher_train_step(loss_fn, optim))
  params = {'P': jnp.zeros((T, dim)), 'q': jnp.zeros((T, dim))}
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
      opt_state=train_state.make_optimizer(optim).init(params), rng=jax.random.PRNGKey(0))
  x = MU + S * jax.random.normal(jax.random.PRNGKey(1), (3000, 512, dim))
  state, metrics = steps(state, {'x': x}, None)  # the analytic teacher has no parameters
  assert metrics['loss'][-1] < 1e-3 * metrics['loss'][0]
  # On fresh training inputs: the student's one step equals the teacher's two, every step.
  x = MU + S * jax.random.normal(jax.random.PRNGKey(2), (256, dim))
  eps = jax.random.normal(jax.random.PRNGKey(3), (256, dim))
  for j in range(k // n, k + 1, k // n):
    z = grid.alpha[j] * x + grid.sigma[j] * eps
    half = k // n // 2
    want = distillation.teacher_two_steps(teacher, None, grid, z, jnp.full((256,), j), half, {})
    x_hat = student(state.params, z, jnp.full((256,), j), {})
    got = distillation.ddim_step(x_hat, z, grid.alpha[j], grid.sigma[j], grid.alpha[j - 2 * half],
                                 grid.sigma[j - 2 * half])
    np.testing.assert_allclose(got, want, atol=ATOL * float(jnp.max(jnp.abs(want))), err_msg=j)


def test_student_sampler_is_ddim_on_the_rounds_points():
  """StudentDDIM through the sampling driver against a float64 NumPy recursion (an analytic
  x0 'student': the posterior mean of Gaussian data at each point's alpha, sigma)."""
  schedule = _schedule()
  grid = distillation.make_time_grid(schedule, 8)
  alpha64 = np.asarray(grid.alpha, np.float64)
  sigma64 = np.asarray(grid.sigma, np.float64)
  point_of = np.zeros(T, np.int32)  # the grid point the model is called at, by timestep
  point_of[np.asarray(grid.model_t)[1:]] = np.arange(1, 9)

  def model_fn(z, t, cond):
    del cond
    j = jnp.asarray(point_of)[t][:, None]
    a, s = grid.alpha[j], grid.sigma[j]
    return MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (z - a * MU)

  solver = distillation.student_solver(grid, 4, mean_type='x0', channels=3, clip_denoised=False)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  got = solvers.sample(model_fn, solvers.make_plan(solver), jax.random.PRNGKey(1), x_T=x_T)
  z = np.asarray(x_T, np.float64)
  for j in (8, 6, 4, 2):
    a, s, a2, s2 = alpha64[j], sigma64[j], alpha64[j - 2], sigma64[j - 2]
    x_hat = MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (z - a * MU)
    z = a2 * x_hat + s2 * (z - a * x_hat) / s
  np.testing.assert_allclose(np.asarray(got), z, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='do not divide'):
    distillation.student_solver(grid, 3, mean_type='v', channels=3)


# ---------------------------------------------------------------------------
# Whole distillations of a tiny teacher, in subprocesses (tests/train_subprocess.py).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'train_subprocess.py')
TEACHER = {'model.ch_mult': [1], 'model.attn_resolutions': [], 'training.num_train_steps': 4,
           'training.checkpoint_every': 4}
DISTILL = {'distill.start_steps': 2, 'distill.final_steps': 1, 'training.num_train_steps': 4,
           'training.checkpoint_every': 2, 'training.log_every': 1, 'training.sample_every': 0,
           'training.batch_size': 16, 'training.keep_checkpoints': 5, 'optim.lr': 1e-3,
           'optim.ema_decay': 0.9}


def _run(workdir, overrides, cache_dir, **env):
  environ = dict(os.environ)
  environ.update(NUM_DEVICES='2', JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', TF_CPP_MIN_LOG_LEVEL='3',
                 XLA_FLAGS='--xla_backend_optimization_level=0', PYTHONPATH=REPO)
  environ.update({k: str(v) for k, v in env.items()})
  proc = subprocess.run([sys.executable, RUNNER, str(workdir), json.dumps(overrides)],
                        env=environ, capture_output=True, text=True, cwd=REPO, timeout=600)
  summary = [json.loads(l[8:]) for l in proc.stdout.splitlines() if l.startswith('SUMMARY ')]
  return proc.returncode, summary[0] if summary else None, proc.stderr


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('teacher')
  code, _, err = _run(workdir, TEACHER, cache_dir)
  assert code == 0, err
  return str(workdir)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir, teacher):
  """An uninterrupted distillation 2 -> 1 steps of the tiny teacher."""
  workdir = tmp_path_factory.mktemp('distilled')
  code, summary, err = _run(workdir, {**DISTILL, 'distill.teacher': teacher}, cache_dir,
                            DISTILL=1)
  assert code == 0, err
  assert [r['steps'] for r in summary['rounds']] == [2, 1]
  assert all(r['trained_steps'] == 4 and np.isfinite(r['loss']) for r in summary['rounds'])
  return str(workdir)


def _round_params(workdir, steps, ema):
  return jax.device_get(checkpoint.load_params(distill_layout.round_dir(workdir, steps), ema=ema,
                                               step=4))


def test_rounds_start_from_their_teacher_and_keep_every_student(reference, teacher):
  rounds = distill_layout.finished_rounds(reference)
  assert sorted(rounds) == [1, 2]
  config = runs.read_config(rounds[1])
  assert config.distill.teacher_kind == 'student' and config.distill.round_steps == 1
  assert config.diffusion.model_mean_type == 'v' and config.optim.decay_steps == 4
  assert runs.read_config(rounds[2]).distill.teacher_kind == 'run'
  # The learning rate is annealed to 0 within each round (lr * (1 - k / 4), logged per step).
  lines = [json.loads(l) for l in open(os.path.join(rounds[2], 'metrics.jsonl'))]
  np.testing.assert_allclose([l['lr'] for l in lines], [1e-3, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-6)
  # Each student moved away from its teacher (it was initialised from it).
  t_params = jax.device_get(checkpoint.load_params(teacher, ema=True))
  for steps in (2, 1):
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(_round_params(reference, steps, False)), jax.tree.leaves(t_params))]
    assert any(moved)


def test_killed_mid_round_resumes_bit_exactly(reference, teacher, tmp_path, cache_dir):
  overrides = {**DISTILL, 'distill.teacher': teacher}
  # SIGKILL after the logged step 3 of the first round (its checkpoint at step 2 is on disk
  # unless the asynchronous save had not been committed; the rerun then starts over).
  code, _, err = _run(tmp_path, overrides, cache_dir, DISTILL=1,
                      SIGNAL_AT_LOG=f'3:{int(signal.SIGKILL)}')
  assert code == -signal.SIGKILL, err
  assert distill_layout.finished_rounds(str(tmp_path)) == {}
  code, summary, err = _run(tmp_path, overrides, cache_dir, DISTILL=1)
  assert code == 0, err
  assert summary['rounds'][0]['trained_steps'] in (2, 4)
  for steps in (2, 1):
    for ema in (False, True):
      jax.tree.map(np.testing.assert_array_equal, _round_params(str(tmp_path), steps, ema),
                   _round_params(reference, steps, ema))
  # Rerun once more: every round is finished, nothing trains.
  code, summary, err = _run(tmp_path, overrides, cache_dir, DISTILL=1)
  assert code == 0 and summary['rounds'] == [], err


def test_sampling_picks_the_round_by_its_steps(reference):
  result = sample.sample_run(reference, steps=1, num_samples=4, batch_size=4,
                             output_dir=None, progress=False)
  assert result['images'].shape == (4, 8, 8, 1)
  assert os.path.dirname(os.path.dirname(result['output_dir'])) == distill_layout.round_dir(
      reference, 1)
  with pytest.raises(sample.SampleError, match=r'no round .* for 4 steps; finished rounds: 2, 1'):
    sample.sample_run(reference, steps=4, num_samples=4)
  # A round's student samples only in its own step count.
  with pytest.raises(sample.SampleError, match='distilled for 2 step'):
    sample.sample_run(distill_layout.round_dir(reference, 2), steps=3, num_samples=4)


@pytest.mark.parametrize('teacher_of', ['missing', 'distillation', 'too_short'])
def test_bad_teacher_is_one_clear_error(teacher_of, reference, teacher, tmp_path):
  teachers = {'missing': str(tmp_path / 'nope'), 'distillation': reference, 'too_short': teacher}
  overrides = {**DISTILL, 'distill.teacher': teachers[teacher_of]}
  if teacher_of == 'too_short':
    overrides['distill.start_steps'] = 64  # a 128-point grid on a 100-step teacher
  code, _, err = _run(tmp_path / 'pd', overrides, str(tmp_path / 'cache'), DISTILL=1)
  assert code == 1
  assert {'missing': 'does not exist', 'distillation': 'is a distillation run',
          'too_short': 'at least 128 timesteps'}[teacher_of] in err
  assert 'Traceback' not in err
