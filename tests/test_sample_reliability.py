"""Sampling never writes bad or mixed outputs, and a user's mistake is one clear error.

Issue 11 on the sampling side: non-finite samples (item 3), output dirs named by their
settings and never mixed (item 6), RePaint that would never jump back (item 10), a non-image
inpainting file and --steps=1 (item 11), --noruntime_tuning for run_sample.py (item 15).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from jaxddpm import sample
from jaxddpm import sample_io
from jaxddpm import schedules
from jaxddpm import solvers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, make_sample_workdir):
  return make_sample_workdir(tmp_path_factory.mktemp('tiny'), tiny.get_config())


@pytest.fixture
def no_sampling(monkeypatch):
  """Sampling fails the test: the error under test must come before it (loading the run,
  which names the output dir by the checkpoint step it reads, may come first)."""

  def fail(*args, **kwargs):
    raise AssertionError('sampling started: the check came too late')

  monkeypatch.setattr(sample, '_sample', fail)


def _run(workdir, out=None, **kw):
  # The settings of test_sample_cli.py, so both share the compiled sampler.
  kw = dict(dict(sampler='ddpm', steps=8, num_samples=6, batch_size=4, seed=1), **kw)
  return sample.sample_run(workdir, output_dir=None if out is None else str(out),
                           progress=False, **kw)


def test_nonfinite_samples_raise_and_write_nothing(tmp_path, make_sample_workdir):
  # Finite weights of 1e30 overflow float32 in the first convolution: every sample is NaN.
  (tmp_path / 'run').mkdir()
  wd = make_sample_workdir(tmp_path / 'run', tiny.get_config(), scale=1e30, step=7)
  message = (r'^6 of 6 samples are not finite \(NaN/Inf\) from the checkpoint at step 7: '
             r'the checkpoint may be damaged or the training diverged; nothing was written$')
  with pytest.raises(sample.SampleError, match=message):
    _run(wd)
  assert not os.path.exists(os.path.join(wd, 'samples'))  # the default dir made, then removed
  existing = tmp_path / 'existing'
  existing.mkdir()
  with pytest.raises(sample.SampleError, match=message):
    _run(wd, existing)
  assert os.listdir(existing) == []


def test_default_output_dir_is_named_by_every_setting(tmp_path, make_sample_workdir):
  config = tiny.get_config()
  config.model.num_classes = 3
  config.model.class_dropout = 0.1
  wd = make_sample_workdir(tmp_path, config, step=12)
  one = _run(wd, sampler='ddim', class_label=1)
  two = _run(wd, sampler='ddim', class_label=2)
  assert one['output_dir'] == os.path.join(
      wd, 'samples', 'ddim_8steps_eta0_seed1_class1_n6_batch4_step12')
  assert two['output_dir'] == os.path.join(
      wd, 'samples', 'ddim_8steps_eta0_seed1_class2_n6_batch4_step12')
  for result in (one, two):  # each dir holds its own samples
    with np.load(os.path.join(result['output_dir'], 'samples.npz')) as f:
      np.testing.assert_array_equal(f['images'], result['images'])
      np.testing.assert_array_equal(f['labels'], result['labels'])
  assert np.abs(one['samples'] - two['samples']).max() > 1e-2

  opts = dict(solver='ddim', steps=50, settings=dict(eta=0.5), seed=3, class_label=None,
              guidance_scale=2.0, num_samples=16, batch_size=8)
  name = lambda **kw: os.path.basename(sample_io.default_output_dir('w', opts, step=400, **kw))
  assert name() == 'ddim_50steps_eta0.5_seed3_guidance2_n16_batch8_step400'
  assert os.path.basename(sample_io.default_output_dir(
      'w', dict(opts, solver='ddpm', settings={}, guidance_scale=0.0), step=0)) == (
          'ddpm_50steps_seed3_n16_batch8_step0')
  assert os.path.basename(sample_io.default_output_dir('w', dict(
      opts, solver='unipc', steps=10, settings=dict(order=3, thresholding=0.995)), step=1)) == (
          'unipc_10steps_order3_thresh0.995_seed3_guidance2_n16_batch8_step1')
  image, mask = np.zeros((8, 8, 1), np.uint8), np.ones((8, 8, 1), np.float32)
  mask[:, 4:] = 0.0
  replacement = name(inpainting=(image, mask))
  assert replacement.startswith('ddim_50steps_eta0.5_seed3_guidance2_inpaint')
  assert replacement.endswith('_n16_batch8_step400')
  other_image = name(inpainting=(image + 1, mask))
  repaint = name(inpainting=(image, mask), inpaint_resample=3, inpaint_jump_length=5)
  assert len({replacement, other_image, repaint}) == 3
  assert '_repaint_r3j5_' in repaint


def test_existing_outputs_are_refused_before_sampling(workdir, tmp_path, no_sampling):
  out = tmp_path / 'out'
  (out / 'images').mkdir(parents=True)
  (out / 'images' / '000000.png').write_bytes(b'stale')
  (out / 'metrics.json').write_text('{"fid": 1.0}')
  with pytest.raises(sample.SampleError, match=(
      rf"^output dir '{out}' already holds images, metrics.json; pass another --output_dir or "
      r'delete it \(outputs of two samplings are never mixed\)$')):
    _run(workdir, out)
  assert sorted(os.listdir(out)) == ['images', 'metrics.json']
  assert (out / 'images' / '000000.png').read_bytes() == b'stale'


def test_unwritable_output_dir_fails_before_sampling(workdir, tmp_path, no_sampling):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(sample.SampleError,
                     match=rf"^cannot write to output dir '{blocker}/out': Not a directory$"):
    _run(workdir, blocker / 'out')
  with pytest.raises(sample.SampleError, match=rf"^output dir '{blocker}' is a file"):
    _run(workdir, blocker)


def test_repaint_that_never_jumps_back_is_an_error(workdir, tmp_path, no_sampling,
                                                   write_inpainting_inputs):
  solver = solvers.make_solver(schedules.make_schedule('linear', 100), num_steps=10)
  with pytest.raises(ValueError, match='RePaint jump length 10 >= 10 steps never jumps back'):
    solvers.repaint.make_plan(solver, resample=2, jump_length=10)
  plan = solvers.repaint.make_plan(solver, resample=2, jump_length=9)
  ops = np.asarray(plan.ops)[:plan.num_ops]
  assert (ops == solvers.repaint.OP_RENOISE).sum() == 9  # one jump point: (r - 1) L renoisings
  plain = solvers.repaint.make_plan(solver, jump_length=50)  # r = 1
  assert plain.num_ops == 10 and not plain.extra_ops
  _, image_path, mask_path = write_inpainting_inputs(tmp_path)
  with pytest.raises(sample.SampleError, match=(
      r'^inpaint_resample = 2, inpaint_jump_length = 8: RePaint jump length 8 >= 8 steps '
      r'never jumps back')):
    _run(workdir, tmp_path / 'never', inpaint_image=image_path, inpaint_mask=mask_path,
         inpaint_resample=2, inpaint_jump_length=8)
  assert not os.path.exists(tmp_path / 'never')


def test_non_image_inpainting_file_and_one_step_are_sample_errors(
    workdir, tmp_path, no_sampling, write_inpainting_inputs):
  text = tmp_path / 'notes.txt'
  text.write_text('not an image')
  _, image_path, mask_path = write_inpainting_inputs(tmp_path)
  cases = [
      (dict(inpaint_image=str(text), inpaint_mask=mask_path),
       rf"^'{text}' is not a readable image file$"),
      (dict(inpaint_image=image_path, inpaint_mask=str(text)),
       rf"^'{text}' is not a readable image file$"),
      (dict(steps=1), r'^steps = 1 must be in \[2, 100\]'),
  ]
  for kw, match in cases:
    with pytest.raises(sample.SampleError, match=match):
      _run(workdir, tmp_path / 'never', **kw)
    assert not os.path.exists(tmp_path / 'never')


def _cli(*args):
  return subprocess.run([sys.executable, 'run_sample.py', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def _error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith('run_sample.py:')]


def test_cli_noruntime_tuning_samples_and_a_rerun_is_refused(tmp_path, make_sample_workdir):
  (tmp_path / 'run').mkdir()
  wd = make_sample_workdir(tmp_path / 'run', tiny.get_config(), step=3)
  args = (f'--workdir={wd}', '--sampler=ddpm', '--steps=8', '--num_samples=6',
          '--batch_size=4', '--seed=1')
  proc = _cli(*args, '--noruntime_tuning')
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = os.path.join(wd, 'samples', 'ddpm_8steps_seed1_n6_batch4_step3')
  assert f'Wrote 6 samples (8 model evaluations each) to {out}' in proc.stdout
  tuned = _run(wd, tmp_path / 'tuned')  # in process: the runtime's compiler options
  with np.load(os.path.join(out, 'samples.npz')) as f:
    assert np.abs(f['images'].astype(int) - tuned['images'].astype(int)).max() <= 1
  again = _cli(*args)
  assert again.returncode == 1
  assert _error_lines(again) == [
      f'run_sample.py: error: output dir {out!r} already holds samples.npz, grid.png; pass '
      'another --output_dir or delete it (outputs of two samplings are never mixed)']
  assert 'Traceback' not in again.stderr


@pytest.mark.parametrize('flag,error', [
    ('--steps=1', 'steps = 1 must be in [2, 100]'),
    ('--output_dir={blocker}/out', "cannot write to output dir '{blocker}/out': Not a directory"),
])
def test_cli_mistakes_are_one_line_errors(workdir, tmp_path, flag, error):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  proc = _cli(f'--workdir={workdir}', flag.format(blocker=blocker))
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  [line] = _error_lines(proc)
  assert line.startswith('run_sample.py: error: ' + error.format(blocker=blocker))


def test_output_dir_names_the_checkpoint_actually_sampled(tmp_path, make_sample_workdir):
  # A stray empty step folder is the "latest" by name; sampling skips it, and so does the name.
  (tmp_path / 'run').mkdir()
  wd = make_sample_workdir(tmp_path / 'run', tiny.get_config(), step=5)
  os.makedirs(os.path.join(wd, 'checkpoints', '9'))
  result = _run(wd)
  assert os.path.basename(result['output_dir']).endswith('_step5'), result['output_dir']
  assert np.isfinite(result['samples']).all()
