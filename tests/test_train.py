"""Training: the pure step against closed forms, and whole runs of the tiny config.

Whole runs happen in subprocesses (tests/train_subprocess.py) that share a
persistent compilation cache, so each distinct program (per device layout)
compiles once for the whole module.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
import toy_model
from jaxddpm import checkpoint
from jaxddpm import images as images_lib
from jaxddpm import train
from jaxddpm import train_state
from jaxddpm import factories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'train_subprocess.py')
STEPS = 8
BASE = {
    # One U-Net level without attention: the training system is under test here,
    # and this model compiles several times faster than configs/tiny.py's.
    'model.ch_mult': [1],
    'model.attn_resolutions': [],
    'training.num_train_steps': STEPS,
    'training.checkpoint_every': 4,
    'training.log_every': 2,
    'training.sample_every': 4,
    'training.keep_checkpoints': 5,
}


# ---------------------------------------------------------------------------
# Helpers.


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


def _env(cache_dir, num_devices=4, **extra):
  env = dict(os.environ)
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(
      NUM_DEVICES=str(num_devices),
      JAX_PLATFORMS='cpu',
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
      TF_CPP_MIN_LOG_LEVEL='3',
      # Compile quickly: these programs run a few steps only.
      XLA_FLAGS='--xla_backend_optimization_level=0',
      PYTHONPATH=REPO)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _start(workdir, overrides, env):
  return subprocess.Popen(
      [sys.executable, RUNNER, str(workdir), json.dumps({**BASE, **overrides})],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  summary = None
  for line in out.splitlines():
    if line.startswith('SUMMARY '):
      summary = json.loads(line[len('SUMMARY '):])
  return proc.returncode, summary, err


def _run(workdir, cache_dir, overrides=None, **env):
  code, summary, err = _finish(_start(workdir, overrides or {}, _env(cache_dir, **env)))
  return code, summary, err


def _params(workdir, ema, step=None):
  return jax.device_get(checkpoint.load_params(str(workdir), ema=ema, step=step))


def _tree_digest(directory):
  """Hash of every file under `directory` (names and contents)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The straight 8-step run on 4 devices that the other runs are compared to."""
  workdir = tmp_path_factory.mktemp('reference')
  code, summary, err = _run(workdir, cache_dir)
  assert code == 0, err
  return workdir, summary


# ---------------------------------------------------------------------------
# The pure step, on a toy model (fast to compile).


def _toy_setup(steps_per_call=1):
  config = tiny.get_config()
  config.optim.warmup_steps = 4
  config.optim.lr = 1e-2
  config.optim.ema_decay = 0.9
  model = toy_model.ToyModel()
  schedule = factories.schedule(config)
  state = train_state.create_train_state(config, model, jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 4, 4, 1), minval=-1, maxval=1)
  step = jax.jit(train.make_train_step(config, model, schedule))
  return config, state, images, step


def test_step_updates_follow_warmup_and_ema():
  _, state, images, step = _toy_setup()
  lrs = []
  for k in range(5):
    old = state
    state, metrics = step(state, {'x': images[k:k + 1]})
    lrs.append(float(metrics['lr'][0]))
    # ema <- decay * ema + (1 - decay) * params, decay = 0.9.
    ema_ref = jax.tree.map(lambda e, p: 0.9 * np.float64(e) + 0.1 * np.float64(p),
                           old.ema_params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state.ema_params, ema_ref)
    assert int(state.step) == k + 1
  # lr_k = lr * min(1, k / warmup) with lr = 1e-2, warmup = 4 (DDPM Appendix B).
  np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6)


def test_first_step_matches_hand_computed_clip_and_adam():
  config, state, images, _ = _toy_setup()
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.05
  config.optim.eps = 1.0  # large, so the clipped gradient's size shows in Adam's update
  model = toy_model.ToyModel()
  schedule = factories.schedule(config)
  state = train_state.create_train_state(config, model, jax.random.PRNGKey(0))
  x = images[0]
  new, metrics = jax.jit(train.make_train_step(config, model, schedule))(state, {'x': x[None]})

  # The same draws: step k uses fold_in(rng, k), split into (t, noise, dropout).
  t_rng, noise_rng, _ = jax.random.split(jax.random.fold_in(state.rng, 0), 3)
  t = jax.random.randint(t_rng, (x.shape[0],), 0, 100)
  noise = jax.random.normal(noise_rng, x.shape)
  abar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]

  def l_simple(params):  # DDPM eq. 14
    x_t = np.sqrt(abar) * x + np.sqrt(1 - abar) * noise
    return jnp.mean(jnp.square(noise - model.apply({'params': params}, x_t, t)))

  grads = jax.tree.map(np.float64, jax.grad(l_simple)(state.params))
  norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics['grad_norm'][0], norm, rtol=1e-5)
  assert norm > 0.05  # clipping is active
  # Adam's first step: m_hat = g, v_hat = g^2, update = -lr g / (|g| + eps), g clipped.
  expected = jax.tree.map(
      lambda p, g: np.float64(p) - 1e-2 * (g * 0.05 / norm) / (np.abs(g * 0.05 / norm) + 1.0),
      state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               new.params, expected)


def test_min_snr_weighting_in_the_train_step_matches_a_hand_computation():
  config, state, images, _ = _toy_setup()
  config.diffusion.weighting = 'min_snr'
  config.diffusion.min_snr_gamma = 5.0
  model = toy_model.ToyModel()
  schedule = factories.schedule(config)
  _, metrics = jax.jit(train.make_train_step(config, model, schedule))(state, {'x': images[:1]})
  x = np.float64(images[0])
  t_rng, noise_rng, _ = jax.random.split(jax.random.fold_in(state.rng, 0), 3)
  t = jax.random.randint(t_rng, (x.shape[0],), 0, 100)
  noise = np.float64(jax.random.normal(noise_rng, x.shape))
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
  x_t = np.sqrt(abar)[:, None, None, None] * x + np.sqrt(1 - abar)[:, None, None, None] * noise
  eps = np.float64(model.apply({'params': state.params}, jnp.float32(x_t), t))
  mse = np.mean((noise - eps) ** 2, axis=(1, 2, 3))
  snr = abar / (1 - abar)
  # Min-SNR-gamma (Hang et al. 2023) on the eps target: min(SNR, gamma) / SNR.
  expected = np.mean(np.minimum(snr, 5.0) / snr * mse)
  np.testing.assert_allclose(metrics['loss'][0], expected, rtol=1e-5)
  assert not np.isclose(expected, np.mean(mse), rtol=1e-3)  # the weighting matters here


def test_scan_of_k_steps_equals_k_calls():
  _, state, images, step = _toy_setup()
  one = state
  for k in range(4):
    one, _ = step(one, {'x': images[k:k + 1]})
  four, metrics = step(state, {'x': images[:4]})
  assert metrics['loss'].shape == (4,)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               one.params, four.params)
  assert int(four.step) == 4


def test_loss_aware_timesteps_keep_a_history():
  config = tiny.get_config()
  config.diffusion.timestep_sampler = 'loss_aware'
  model = toy_model.ToyModel()
  schedule = factories.schedule(config)
  state = train_state.create_train_state(config, model, jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 4, 4, 1), minval=-1, maxval=1)
  state, metrics = jax.jit(train.make_train_step(config, model, schedule))(state, {'x': images})
  # Three steps of 16 examples: 48 (t, loss) pairs recorded, one count per example.
  assert int(state.timestep_state.loss_counts.sum()) == 48
  assert np.all(np.isfinite(metrics['loss']))


def test_image_grid_layout():
  images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
  grid = images_lib.image_grid(images, padding=1)
  assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)  # 2 columns, 2 rows
  assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[4, 1, 0] == 255
  assert grid[0, 0, 0] == 0 and grid[4, 5, 0] == 0  # padding, empty cell


def test_steps_per_call_lands_on_every_interval():
  config = tiny.get_config()
  config.training.steps_per_call = 10
  assert train._steps_per_call(config, 0) == 2  # tiny: log_every=2, num_train_steps=8
  config.training.log_every = 100
  config.training.num_train_steps = 4000
  config.training.checkpoint_every = 1000
  assert train._steps_per_call(config, 0) == 10
  assert train._steps_per_call(config, 995) == 5


# ---------------------------------------------------------------------------
# Whole runs.


def test_end_to_end_smoke(reference):
  workdir, summary = reference
  assert summary['step'] == STEPS and np.isfinite(summary['loss'])
  assert summary['train_step_traces'] == 1  # compiled once for the whole run
  saved = json.load(open(workdir / 'config.json'))
  assert saved['model']['ch'] == 16 and saved['training']['num_train_steps'] == STEPS
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [2, 4, 6, 8]
  for key in ('loss', 'lr', 'grad_norm', 'steps_per_sec', 'images_per_sec'):
    assert all(np.isfinite(l[key]) for l in lines), key
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for step in (4, 8):
    grid = Image.open(workdir / 'samples' / f'step_{step:06d}.png')
    assert grid.size == (4 * 10 + 2, 4 * 10 + 2)  # 16 images of 8x8, 4 columns, padding 2
  assert checkpoint.saved_steps(str(workdir)) == [4, 8]
  for step in (4, 8):  # the data iterator's state, through Grain's Orbax handler
    with open(workdir / 'checkpoints' / str(step) / 'data' / 'process_0-of-1.json') as f:
      assert json.load(f)['next_step'] == step
  ema, raw = _params(workdir, ema=True), _params(workdir, ema=False)
  assert jax.tree.structure(ema) == jax.tree.structure(raw)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))


def test_resume_after_sigterm_and_sigkill_is_bitwise_exact(reference, tmp_path, cache_dir):
  ref_dir, _ = reference
  # SIGTERM at step 2: the run saves at the next step boundary and exits 128 + 15.
  # (tiny runs one step per call, so that boundary is step 3.)
  code, _, err = _run(tmp_path, cache_dir, SIGNAL_AT_LOG=f'2:{int(signal.SIGTERM)}')
  assert code == 128 + signal.SIGTERM, err
  assert checkpoint.saved_steps(str(tmp_path)) == [3]
  # Resumed from 3, then SIGKILLed at step 6, between checkpoints.
  code, _, err = _run(tmp_path, cache_dir, SIGNAL_AT_LOG=f'6:{int(signal.SIGKILL)}')
  assert code == -signal.SIGKILL, err
  # Step 4's checkpoint is written asynchronously; on a loaded machine the kill can come before
  # it is committed, and then the run resumes from 3. Either way it must end bitwise exact.
  assert checkpoint.saved_steps(str(tmp_path)) in ([3], [3, 4])
  # Resumed from the newest committed checkpoint, to the end.
  code, summary, err = _run(tmp_path, cache_dir)
  assert code == 0, err
  assert summary['step'] == STEPS and summary['train_step_traces'] == 1
  for ema in (False, True):
    _assert_trees_equal(_params(tmp_path, ema), _params(ref_dir, ema))


def test_workdir_without_data_states_resumes_bitwise_exact(reference, tmp_path, cache_dir):
  # Checkpoints written before the data iterator's state was saved hold no `data` item.
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '8')
  shutil.rmtree(workdir / 'checkpoints' / '4' / 'data')
  code, summary, err = _run(workdir, cache_dir)
  assert code == 0, err
  assert summary['trained_steps'] == 4
  for ema in (False, True):
    _assert_trees_equal(_params(workdir, ema), _params(ref_dir, ema))


def test_another_data_order_on_resume_is_refused(reference, tmp_path, monkeypatch):
  # The seed is outside config.json's compared sections; the saved data state catches it.
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  before = _tree_digest(workdir)
  monkeypatch.setattr(train, 'make_train_step', lambda *a, **k: pytest.fail('compute'))
  config = _configure(tiny.get_config(), BASE)
  config.seed = 1
  with pytest.raises(train.TrainError, match=r'Checkpoint 8 .*data order .*seed 0 \(saved\) '
                     r'vs 1'):
    train.train_and_evaluate(config, str(workdir))
  assert _tree_digest(workdir) == before


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(reference, tmp_path, cache_dir):
  ref_dir, _ = reference
  code, _, err = _run(tmp_path, cache_dir, NAN_AT_BATCH=5)
  assert code == 1
  assert 'at step 6' in err and 'step 4' in err, err
  assert checkpoint.saved_steps(str(tmp_path)) == [4]
  _assert_trees_equal(_params(tmp_path, True, step=4), _params(ref_dir, True, step=4))


def test_one_device_matches_four(reference, tmp_path, cache_dir):
  ref_dir, _ = reference
  code, _, err = _run(tmp_path, cache_dir, {'training.sample_every': 0}, num_devices=1)
  assert code == 0, err
  for ema in (False, True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                 _params(tmp_path, ema), _params(ref_dir, ema))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(reference, tmp_path, cache_dir):
  ref_dir, _ = reference
  port = _free_port()
  procs = [
      _start(tmp_path, {'training.sample_every': 0}, _env(cache_dir, num_devices=2,
                                JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                                JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i))
      for i in range(2)]
  results = [_finish(p) for p in procs]
  for code, summary, err in results:
    assert code == 0, err
    assert summary['step'] == STEPS and summary['train_step_traces'] == 1
  for ema in (False, True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                 _params(tmp_path, ema), _params(ref_dir, ema))


def test_tfds_source_end_to_end(tmp_path, cache_dir):
  data_dir = tmp_path / 'tfds'
  overrides = {'data.dataset': 'cifar10', 'data.data_dir': str(data_dir),
               'data.random_flip': True, 'training.num_train_steps': 2,
               'training.sample_every': 0}
  code, summary, err = _run(tmp_path / 'run', cache_dir, overrides, MOCK_TFDS=20)
  assert code == 0, err
  assert summary['step'] == 2 and np.isfinite(summary['loss'])


def test_folder_source_end_to_end(tmp_path, cache_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(20):
    Image.fromarray(rng.randint(0, 256, (12, 10, 3), np.uint8)).save(folder / f'{i:02d}.png')
  overrides = {'data.dataset': 'folder', 'data.data_dir': str(folder),
               'training.num_train_steps': 2, 'training.sample_every': 0}
  code, summary, err = _run(tmp_path / 'run', cache_dir, overrides)
  assert code == 0, err
  assert summary['step'] == 2 and np.isfinite(summary['loss'])


# ---------------------------------------------------------------------------
# Bad inputs: one clear message, nonzero exit, checkpoints untouched, no compute.


def _configure(config, changes):
  for field, value in changes.items():
    node = config
    *path, leaf = field.split('.')
    for p in path:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


@pytest.mark.parametrize('changes, message', [
    ({'data.dataset': 'no_such_dataset_xyz'}, 'Unknown dataset'),
    ({'data.image_size': 9, 'model.ch_mult': [1, 2]}, 'image_size = 9: must be divisible by 2'),
    ({'training.batch_size': 6}, 'not divisible by the 4 devices'),
    ({'model.ch': 32}, 'different run'),
    ({'diffusion.model_mean_type': 'score'}, 'model_mean_type'),
])
def test_bad_config_fails_before_compute(reference, tmp_path, monkeypatch, changes, message):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  before = _tree_digest(workdir)

  def no_compute(*args, **kwargs):
    raise AssertionError('computation started')

  monkeypatch.setattr(train, 'make_train_step', no_compute)
  monkeypatch.setattr(train_state, 'create_train_state', no_compute)
  config = _configure(_configure(tiny.get_config(), BASE), changes)
  with pytest.raises(train.TrainError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert _tree_digest(workdir) == before


def test_checkpoints_without_config_json_are_not_resumed(reference, tmp_path, monkeypatch):
  # Nothing would say which diffusion the checkpoints were trained with: refuse to guess.
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  os.remove(workdir / 'config.json')
  before = _tree_digest(workdir)
  monkeypatch.setattr(train, 'make_train_step', lambda *a, **k: pytest.fail('compute'))
  config = _configure(tiny.get_config(), BASE)
  config.diffusion.beta_end = 0.03
  with pytest.raises(train.TrainError, match='holds checkpoints but no config.json'):
    train.train_and_evaluate(config, str(workdir))
  assert _tree_digest(workdir) == before


def test_changed_model_or_optimizer_structure_is_named(reference, tmp_path, monkeypatch):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  os.remove(workdir / 'config.json')  # so only the checkpoint itself can tell
  monkeypatch.setattr(train, 'make_train_step', lambda *a, **k: pytest.fail('compute'))
  monkeypatch.setattr(train.workdir_lib, 'check_compatible', lambda *a, **k: None)
  before = _tree_digest(workdir)
  config = _configure(tiny.get_config(), BASE)
  config.model.ch = 32
  with pytest.raises(train.TrainError, match=r'Checkpoint 8 .* holds a different model '
                     r'.*params/conv_in/bias: saved \(16,\), wanted \(32,\)'):
    train.train_and_evaluate(config, str(workdir))
  config = _configure(tiny.get_config(), BASE)
  config.optim.grad_clip = 0.0  # Adam without the clipping stage: another optax state tree
  with pytest.raises(train.TrainError, match='optimizer state of another structure'):
    train.train_and_evaluate(config, str(workdir))
  assert _tree_digest(workdir) == before


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(train.TrainError, match='Cannot write to workdir'):
    train.train_and_evaluate(tiny.get_config(), str(blocker / 'run'))


def test_cli_reports_error_and_exits_nonzero(reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  before = _tree_digest(workdir)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'run_train.py'), '--config=configs/tiny.py',
       f'--workdir={workdir}', '--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()',
       '--config.model.ch=32'],
      env=_env(str(tmp_path / 'cache')), capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('run_train.py: error:')]
  assert len(errors) == 1 and 'model.ch: 16 (saved) vs 32' in errors[0], proc.stderr
  assert _tree_digest(workdir) == before


def test_uint8_conversion_and_quantisation():
  """to_uint8 is round((x + 1) 127.5) clipped; quantize lands floats and uint8 alike on the
  8-bit grid 2k/255 - 1 (what a saved PNG holds)."""
  x = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0], np.float32)
  want = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255)
  np.testing.assert_array_equal(images_lib.to_uint8(x), want.astype(np.uint8))
  np.testing.assert_array_equal(images_lib.to_uint8(want.astype(np.uint8)), want)
  np.testing.assert_allclose(images_lib.quantize(x), want / 127.5 - 1, atol=1e-7)
  np.testing.assert_array_equal(images_lib.quantize(x),
                                images_lib.quantize(images_lib.to_uint8(x)))
