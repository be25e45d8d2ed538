"""Choosing a solver in the shell: run_sample.py --solver / --steps and the solver options,
config.sampling.solver and its old name sampler, and one clear error for each bad choice."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from jaxddpm import config_utils
from jaxddpm import factories
from jaxddpm import sample
from jaxddpm import sample_io

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_sample_workdir):
  return make_sample_workdir(tmp_path_factory.mktemp('tiny'), tiny.get_config())


@pytest.fixture
def no_sampling(monkeypatch):
  """Sampling fails the test: the error under test must come before it."""

  def fail(*args, **kwargs):
    raise AssertionError('sampling started: the check came too late')

  monkeypatch.setattr(sample, '_sample', fail)


def _run(workdir, out, **kw):
  kw = dict(dict(num_samples=4, batch_size=4, seed=1), **kw)
  return sample.sample_run(workdir, output_dir=str(out), progress=False, **kw)


def test_few_step_solvers_sample_a_run(workdir, tmp_path, write_inpainting_inputs):
  heun = _run(workdir, tmp_path / 'heun', solver='heun', steps=6,
              solver_options=dict(s_churn=2.0, spacing='logSNR'))
  assert heun['nfe'] == 5 and heun['images'].shape == (4, 8, 8, 1)  # N = 3 sigmas: 2N - 1
  again = _run(workdir, tmp_path / 'again', solver='heun', steps=6,
               solver_options=dict(s_churn=2.0, spacing='logSNR'))
  np.testing.assert_array_equal(again['images'], heun['images'])
  name = os.path.basename(sample_io.default_output_dir(
      str(workdir), dict(solver='heun', steps=6, settings=dict(spacing='logSNR', s_churn=2.0),
                         seed=1, class_label=None, guidance_scale=0.0, num_samples=4,
                         batch_size=4), step=0))
  assert name == 'heun_6steps_logSNR_churn2_seed1_n4_batch4_step0'
  image, image_path, mask_path = write_inpainting_inputs(tmp_path)
  filled = _run(workdir, tmp_path / 'fill', solver='unipc', steps=6, inpaint_image=image_path,
                inpaint_mask=mask_path)
  assert filled['nfe'] == 6
  np.testing.assert_array_equal(filled['images'][:, :, :4, 0],
                                np.broadcast_to(image[:, :4], (4, 8, 4)))


def test_sampler_is_the_old_name_of_solver(workdir, tmp_path, no_sampling):
  """A workdir saved before the rename has only config.sampling.sampler: it still chooses."""
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  new_keys = set(factories.SOLVER_OPTIONS) - {'eta'}
  saved['sampling'] = {('sampler' if k == 'solver' else k): v
                       for k, v in saved['sampling'].items() if k not in new_keys}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  old = sample.runs.read_config(str(tmp_path))
  assert 'solver' not in old.sampling and config_utils.sampling_solver(old.sampling) == 'ddim'
  settings = sample._solver_settings(old, solver=None, sampler=None, steps=None, eta=None,
                                     solver_options=None)
  assert (settings['solver'], settings['steps']) == ('ddim', old.sampling.num_steps)
  with pytest.raises(sample.SampleError, match='sampler is the old name of solver'):
    _run(workdir, tmp_path / 'never', solver='ddim', sampler='ddpm')
  config = tiny.get_config()
  config.sampling.sampler = 'ddpm'
  with pytest.raises(ValueError, match=r"config.sampling.sampler = 'ddpm': is the old name"):
    config_utils.validate_config(config)


def test_config_options_go_with_the_configs_solver():
  config = tiny.get_config()
  config.sampling.solver, config.sampling.eta = 'ddim', 0.5
  assert factories.solver_settings(config)['eta'] == 0.5
  other = factories.solver_settings(config, solver='dpmpp_2m', steps=10)
  assert other == dict(solver='dpmpp_2m', steps=10)  # the ddim eta stays with ddim
  with pytest.raises(ValueError, match="'dpmpp_2m' does not take eta"):
    factories.solver_settings(config, solver='dpmpp_2m', eta=0.5)


@pytest.mark.parametrize('kw,match', [
    (dict(solver='euler'), "unknown solver 'euler'"),
    (dict(solver='dpmpp_2m', eta=0.5), "'dpmpp_2m' does not take eta"),
    (dict(solver='ddim', solver_options=dict(s_churn=5.0)), "'ddim' does not take s_churn"),
    (dict(solver='dpmpp_2m', solver_options=dict(order=3)), "'dpmpp_2m' does not take order"),
    (dict(solver='dpmpp_3m', steps=2), 'needs at least 3 model evaluations'),
    (dict(solver='heun', solver_options=dict(spacing='trailing')), 'timestep spacings'),
    (dict(solver='ddpm', steps=101), r'steps = 101 must be in \[2, 100\]'),
])
def test_bad_solver_choices_are_sample_errors(workdir, tmp_path, no_sampling, kw, match):
  with pytest.raises(sample.SampleError, match=match):
    _run(workdir, tmp_path / 'never', **kw)
  assert not os.path.exists(tmp_path / 'never')


def test_repaint_with_a_multistep_solver_is_an_error(workdir, tmp_path, no_sampling,
                                                    write_inpainting_inputs):
  _, image_path, mask_path = write_inpainting_inputs(tmp_path)
  with pytest.raises(sample.SampleError, match='dpmpp_2m .a multistep solver. cannot follow'):
    _run(workdir, tmp_path / 'never', solver='dpmpp_2m', steps=8, inpaint_image=image_path,
         inpaint_mask=mask_path, inpaint_resample=2, inpaint_jump_length=2)


@pytest.mark.parametrize('args,message', [
    (('--solver=dpmpp_2m', '--eta=0.5'), "solver 'dpmpp_2m' does not take eta"),
    (('--solver=heun', '--steps=2'), "solver 'heun' needs at least 3 model evaluations"),
    (('--solver=euler',), 'flag --solver=euler: value should be one of'),
])
def test_cli_bad_solver_choice_is_one_line(workdir, args, message):
  proc = subprocess.run([sys.executable, 'run_sample.py', f'--workdir={workdir}', *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith('run_sample.py:')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
