"""Cascades and upscaling (jaxddpm.cascade, run_sample.py --sr_workdir) on tiny random runs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jaxddpm import cascade
from jaxddpm import parallel
from jaxddpm import sample
from jaxddpm import sample_io

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sr_config(image_size, low_res_size):
  config = tiny.get_config()
  config.data.image_size = image_size
  config.data.low_res_size = low_res_size
  config.data.num_workers = 0
  config.sampling.aug_level = 0.2
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory, make_sample_workdir):
  """A base run (8x8), SR stages 8 -> 16 and 16 -> 32, and an SR run that takes 4x4."""
  made = {'base': make_sample_workdir(tmp_path_factory.mktemp('base'), tiny.get_config())}
  for name, (size, low) in {'sr16': (16, 8), 'sr32': (32, 16), 'sr_from4': (8, 4)}.items():
    made[name] = make_sample_workdir(tmp_path_factory.mktemp(name), _sr_config(size, low))
  return made


def _cli(*args):
  return subprocess.run([sys.executable, 'run_sample.py', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_three_stage_cascade_from_one_command(runs, tmp_path):
  out = tmp_path / 'cascade'
  proc = _cli(f'--workdir={runs["base"]}', f'--sr_workdir={runs["sr16"]}',
              f'--sr_workdir={runs["sr32"]}', '--num_samples=3', '--batch_size=4',
              '--solver=ddim', '--steps=3', '--sr_steps=3', f'--output_dir={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  final = np.load(out / 'samples.npz')['images']
  assert final.shape == (3, 32, 32, 1) and final.dtype == np.uint8
  assert np.load(out / 'stage_0' / 'samples.npz')['images'].shape == (3, 8, 8, 1)
  assert np.load(out / 'stage_1' / 'samples.npz')['images'].shape == (3, 16, 16, 1)
  assert (out / 'grid.png').exists()
  # The same command again is refused: earlier outputs are never replaced.
  again = _cli(f'--workdir={runs["base"]}', f'--sr_workdir={runs["sr16"]}',
               '--num_samples=3', '--steps=3', '--sr_steps=3', f'--output_dir={out}')
  assert again.returncode == 1 and 'already holds' in again.stderr


def test_stage_size_mismatch_is_one_error_before_sampling(runs, tmp_path):
  out = tmp_path / 'never'
  proc = _cli(f'--workdir={runs["base"]}', f'--sr_workdir={runs["sr_from4"]}',
              '--steps=3', f'--output_dir={out}')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('run_sample.py: error: stage 0'), proc.stderr[-2000:]
  assert 'is 8x8x1' in lines[-1] and 'takes 4x4x1 inputs' in lines[-1]
  assert 'Traceback' not in proc.stderr and not out.exists()


def test_cascade_stage_matches_upscaling_its_input(runs, tmp_path):
  """Stage 1 of a cascade is `upscale` of stage 0's samples with the stage's seed."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  result = cascade.sample_cascade(runs['base'], [runs['sr16']], output_dir=str(tmp_path / 'c'),
                                  sr_kwargs=dict(steps=3, progress=False, mesh=mesh),
                                  solver='ddim', steps=3, num_samples=2, progress=False,
                                  mesh=mesh)
  config, params = cascade._load(runs['sr16'])  # pylint: disable=protected-access
  direct = cascade.upscale(config, params, result['stages'][0], steps=3, stage=1,
                           progress=False, mesh=mesh)[0]
  np.testing.assert_array_equal(result['images'], direct)


def test_upscale_folder_writes_each_name_and_refuses_a_wrong_size(runs, tmp_path):
  folder = tmp_path / 'low'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.jpg'):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / name)
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / 'c.png')
  bad = _cli(f'--sr_workdir={runs["sr16"]}', f'--low_res_images={folder}', '--sr_steps=3',
             f'--output_dir={tmp_path / "x"}')
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert 'c.png' in bad.stderr and 'is 5x5x1' in bad.stderr and 'takes 8x8x1' in bad.stderr
  os.remove(folder / 'c.png')
  out = tmp_path / 'up'
  good = _cli(f'--sr_workdir={runs["sr16"]}', f'--low_res_images={folder}', '--sr_steps=3',
              f'--output_dir={out}')
  assert good.returncode == 0, good.stderr[-2000:]
  for name in ('a.png', 'b.png'):
    assert np.asarray(Image.open(out / name)).shape == (16, 16)


def test_held_out_metrics_and_comparison(runs, tmp_path):
  mesh = parallel.make_mesh(jax.devices()[:1])
  result = cascade.evaluate_held_out(runs['sr16'], samples_per_input=2, num_examples=3,
                                     output_dir=str(tmp_path / 'eval'), steps=3,
                                     progress=False, mesh=mesh)
  assert result['images'].shape == (2, 3, 16, 16, 1)
  metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  for key in ('sr_psnr', 'bicubic_psnr', 'mean_psnr', 'sr_ssim', 'sr_consistency',
              'sr_hf_share', 'truth_hf_share'):
    assert np.isfinite(metrics[key]), key
  comparison = np.asarray(Image.open(tmp_path / 'eval' / 'comparison.png'))
  assert comparison.shape == (3 * 18 + 2, 4 * 18 + 2)


def test_bad_super_resolution_input_is_one_error(runs, tmp_path):
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(sample.SampleError, match='not a super-resolution run'):
    cascade.evaluate_held_out(runs['base'], output_dir=str(tmp_path / 'a'))
  config, params = cascade._load(runs['sr16'])  # pylint: disable=protected-access
  low = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(sample.SampleError, match='aug_level = 1.5 must be in'):
    cascade.upscale(config, params, low, aug_level=1.5, progress=False, mesh=mesh)
  with pytest.raises(sample.SampleError, match='takes uint8 8x8x1'):
    cascade.upscale(config, params, np.zeros((2, 4, 4, 1), np.uint8), progress=False, mesh=mesh)
  with pytest.raises(sample.SampleError, match='give it low-res images'):
    sample.sample_run(runs['sr16'], output_dir=str(tmp_path / 'b'), progress=False, mesh=mesh)
  proc = _cli(f'--low_res_images={tmp_path}')
  assert proc.returncode == 1 and 'needs --sr_workdir' in proc.stderr


def _initial_cond(config, low, aug_level):
  """The conditioning a sampling batch starts with (sample.py's init, as the loop runs it)."""
  # pylint: disable=protected-access
  opts = sample._resolve(config, solver='ddim', sampler=None, steps=3, eta=None,
                         solver_options=None, num_samples=len(low), batch_size=len(low), seed=0,
                         class_label=None, guidance_scale=None, mesh_size=1)
  opts.update(sample_io.low_res_inputs(config, low, aug_level, len(low)))
  init = sample._init_fn(sample._plan(config, opts, None, 1, 10), opts, 0,
                         (len(low), 16, 16, 1))
  key = jax.random.key(0)
  return init(key, key, sample._given(opts, 0)).cond


def test_aug_level_noises_the_input_the_sampler_sees(runs):
  """aug_level 0 hands the network the low-res input itself; 1 replaces it by unit noise."""
  config, _ = cascade._load(runs['sr16'])  # pylint: disable=protected-access
  low = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
  as_float = low.astype(np.float32) / 127.5 - 1.0
  clean = _initial_cond(config, low, 0.0)
  np.testing.assert_array_equal(clean['low_res'], as_float)
  np.testing.assert_array_equal(clean['aug_level'], np.zeros(64))
  noised = np.asarray(_initial_cond(config, low, 1.0)['low_res'])
  assert abs(np.corrcoef(noised.ravel(), as_float.ravel())[0, 1]) < 0.05
  np.testing.assert_allclose(noised.std(), 1.0, atol=0.05)
