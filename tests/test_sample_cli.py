"""run_sample.py and jaxddpm.sample on a tiny run built in the test (configs/tiny.py)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from jaxddpm import parallel
from jaxddpm import sample

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_sample_workdir):
  return make_sample_workdir(tmp_path_factory.mktemp('tiny'), tiny.get_config())


@pytest.fixture(scope='module')
def conditional_workdir(tmp_path_factory, make_sample_workdir):
  config = tiny.get_config()
  config.model.num_classes = 3
  config.model.class_dropout = 0.1
  return make_sample_workdir(tmp_path_factory.mktemp('tiny_cond'), config)


def _run(workdir, out, mesh=None, **kw):
  kw = dict(dict(solver='ddpm', steps=8, num_samples=6, batch_size=4, seed=1), **kw)
  return sample.sample_run(workdir, output_dir=str(out), progress=False, mesh=mesh, **kw)


def test_same_seed_same_samples_on_1_and_4_devices(workdir, tmp_path):
  four = parallel.make_mesh()
  assert four.size == 4
  a = _run(workdir, tmp_path / 'a', mesh=four)
  b = _run(workdir, tmp_path / 'b', mesh=four)
  with np.load(tmp_path / 'a' / 'samples.npz') as fa, np.load(tmp_path / 'b' / 'samples.npz') as fb:
    assert sorted(fa.files) == ['images']
    assert fa['images'].dtype == np.uint8 and fa['images'].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(fa['images'], fb['images'])
  assert os.path.isfile(tmp_path / 'a' / 'grid.png')
  one = _run(workdir, tmp_path / 'c', mesh=parallel.make_mesh(jax.devices()[:1]))
  np.testing.assert_allclose(one['samples'], a['samples'], atol=1e-4)
  assert np.abs(one['images'].astype(int) - a['images'].astype(int)).max() <= 1
  other = _run(workdir, tmp_path / 'd', mesh=four, seed=2)
  assert np.abs(other['samples'] - a['samples']).max() > 0.1
  assert a['images'].std() > 5  # not a constant image


def test_class_conditional_and_guidance(conditional_workdir, tmp_path):
  fixed = _run(conditional_workdir, tmp_path / 'fixed', solver='ddim', class_label=2)
  np.testing.assert_array_equal(fixed['labels'], [2] * 6)
  with np.load(tmp_path / 'fixed' / 'samples.npz') as f:
    np.testing.assert_array_equal(f['labels'], fixed['labels'])
  drawn = _run(conditional_workdir, tmp_path / 'drawn', solver='ddim')
  assert set(drawn['labels'].tolist()) <= {0, 1, 2}
  guided = _run(conditional_workdir, tmp_path / 'guided', solver='ddim', class_label=2,
                guidance_scale=3.0)
  assert np.abs(guided['samples'] - fixed['samples']).max() > 1e-2


def test_cli_inpainting_writes_outputs_and_psnr(workdir, tmp_path, write_inpainting_inputs):
  image, image_path, mask_path = write_inpainting_inputs(tmp_path)
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, 'run_sample.py', f'--workdir={workdir}', '--sampler=ddpm', '--steps=6',
       '--num_samples=4', f'--inpaint_image={image_path}', f'--inpaint_mask={mask_path}',
       '--inpaint_resample=2', '--inpaint_jump_length=2', f'--output_dir={out}',
       '--save_individual'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'PSNR' in proc.stdout
  with np.load(out / 'samples.npz') as f:
    images, psnr = f['images'], f['psnr']
  assert images.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(images[:, :, :4, 0], np.broadcast_to(image[:, :4], (4, 8, 4)))
  fill = images[:, :, 4:, 0].astype(float) - image[:, 4:]
  want = 10 * np.log10(255.0 ** 2 / np.mean(fill ** 2, axis=(1, 2)))
  np.testing.assert_allclose(psnr, want, rtol=1e-4)
  with open(out / 'psnr.json') as f:
    np.testing.assert_allclose(json.load(f)['mean_psnr_db'], want.mean(), rtol=1e-4)
  assert sorted(os.listdir(out / 'images')) == [f'{i:06d}.png' for i in range(4)]
  assert os.path.isfile(out / 'grid.png')


def test_cli_error_is_one_line_and_nonzero_exit(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  tiny_config = tiny.get_config()
  (empty / 'config.json').write_text(tiny_config.to_json_best_effort())
  proc = subprocess.run([sys.executable, 'run_sample.py', f'--workdir={empty}'],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert 'run_sample.py: error: no checkpoint in' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_bad_input_raises_sample_error(workdir, conditional_workdir, tmp_path,
                                      write_inpainting_inputs):
  _, image_path, _ = write_inpainting_inputs(tmp_path)
  wrong = tmp_path / 'wrong'
  wrong.mkdir()
  _, _, bad_mask = write_inpainting_inputs(wrong, mask_size=6)
  cases = [
      (str(tmp_path), {}, 'no config.json'),
      (workdir, dict(steps=101), r'steps = 101 must be in \[2, 100\]'),
      (workdir, dict(guidance_scale=2.0), 'unconditional'),
      (workdir, dict(class_label=0), 'unconditional'),
      (conditional_workdir, dict(class_label=3), r'out of range \[0, 3\)'),
      (workdir, dict(inpaint_image=image_path, inpaint_mask=bad_mask), 'does not match'),
      (workdir, dict(inpaint_image=image_path), 'needs both'),
      (workdir, dict(eta=2.0), 'eta'),
  ]
  for wd, kw, match in cases:
    with pytest.raises(sample.SampleError, match=match):
      _run(wd, tmp_path / 'never', **kw)
    assert not os.path.exists(tmp_path / 'never')
