"""Classifier guidance and composition through the sampling shell (`jaxddpm.control`):
exact identities (scale 0 is the unguided sampler; one composed condition of weight 1 + w is
classifier-free guidance w), the recorded labels and outputs, and one clear error each for
bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from jaxddpm import sample
from jaxddpm import sample_io
from jaxddpm import train
from tests import test_noisy_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_clf_config(num_timesteps=100):
  config = test_noisy_classifier.tiny_classifier_config()
  config.diffusion.num_timesteps = num_timesteps
  config.training.num_train_steps = 2
  config.training.eval_every = 0
  config.training.checkpoint_every = 2
  return config


@pytest.fixture(scope='module')
def runs_dir(tmp_path_factory, make_sample_workdir):
  root = tmp_path_factory.mktemp('control')
  base = make_sample_workdir(root / 'base', tiny.get_config())
  conditional = tiny.get_config()
  conditional.model.num_classes = 10
  conditional.model.class_dropout = 0.1
  cond_run = make_sample_workdir(root / 'cond', conditional)
  energy = tiny.get_config()
  energy.model.num_classes = 10
  energy.model.class_dropout = 0.1
  energy.model.energy = True
  energy_run = make_sample_workdir(root / 'energy', energy)
  clf = str(root / 'clf')
  train.train_and_evaluate(tiny_clf_config(), clf)
  return dict(root=root, base=base, cond=cond_run, energy=energy_run, clf=clf)


def _sample(runs_dir, name, workdir, **kwargs):
  kwargs.setdefault('num_samples', 8)
  kwargs.setdefault('batch_size', 8)
  return sample.sample_run(workdir, output_dir=str(runs_dir['root'] / name), progress=False,
                           **kwargs)


@pytest.mark.parametrize('solver', ['ddim', 'ddpm'])
def test_classifier_guidance_at_scale_0_is_the_unguided_sampler(runs_dir, solver):
  """The eps shift (DDIM) and the mean shift (DDPM) both vanish at s = 0, to the bit; at
  s > 0 they move the samples, and the labels asked for are the ones recorded."""
  plain = _sample(runs_dir, f'plain_{solver}', runs_dir['base'], solver=solver, steps=5)
  control = dict(classifier_workdir=runs_dir['clf'], classifier_scale=0.0)
  zero = _sample(runs_dir, f'zero_{solver}', runs_dir['base'], solver=solver, steps=5,
                 class_label=3, control=control)
  np.testing.assert_array_equal(zero['samples'], plain['samples'])
  np.testing.assert_array_equal(zero['labels'], np.full(8, 3))
  control['classifier_scale'] = 50.0
  moved = _sample(runs_dir, f'moved_{solver}', runs_dir['base'], solver=solver, steps=5,
                  class_label=3, control=control)
  assert np.abs(moved['samples'] - plain['samples']).max() > 1e-3
  saved = np.load(os.path.join(moved['output_dir'], 'samples.npz'))
  np.testing.assert_array_equal(saved['labels'], np.full(8, 3))


def test_without_a_class_the_classifier_labels_are_drawn(runs_dir):
  out = _sample(runs_dir, 'drawn', runs_dir['base'], num_samples=16, batch_size=16,
                control=dict(classifier_workdir=runs_dir['clf'], classifier_scale=1.0))
  assert out['labels'].shape == (16,) and len(set(out['labels'].tolist())) > 1
  assert out['labels'].min() >= 0 and out['labels'].max() < 10


def test_a_class_conditional_model_is_guided_toward_its_own_label(runs_dir):
  plain = _sample(runs_dir, 'cond_plain', runs_dir['cond'], class_label=4)
  zero = _sample(runs_dir, 'cond_zero', runs_dir['cond'], class_label=4,
                 control=dict(classifier_workdir=runs_dir['clf'], classifier_scale=0.0))
  np.testing.assert_array_equal(zero['samples'], plain['samples'])


def test_one_composed_label_is_classifier_free_guidance(runs_dir):
  """eps(null) + (1 + w)(eps(c) - eps(null)) = (1 + w) eps(c) - w eps(null)."""
  guided = _sample(runs_dir, 'cfg', runs_dir['cond'], class_label=4, guidance_scale=2.0)
  composed = _sample(runs_dir, 'composed', runs_dir['cond'],
                     control=dict(compose_labels=[4], label_weights='3'))
  np.testing.assert_allclose(composed['samples'], guided['samples'], atol=2e-5)
  np.testing.assert_array_equal(composed['labels'], np.full((8, 1), 4))
  saved = np.load(os.path.join(composed['output_dir'], 'samples.npz'))
  np.testing.assert_array_equal(saved['compose_weights'], [3.0])


def test_two_composed_labels_are_the_weighted_sum(runs_dir):
  """Weights (1, -1) on (4, 4) cancel to the null prediction: the unconditional samples."""
  null = _sample(runs_dir, 'null', runs_dir['cond'],
                 control=dict(compose_labels=[4], label_weights='0'))
  cancelled = _sample(runs_dir, 'cancel', runs_dir['cond'],
                      control=dict(compose_labels=[4, 4], label_weights='1,-1'))
  np.testing.assert_allclose(cancelled['samples'], null['samples'], atol=2e-5)


@pytest.mark.parametrize('workdir, method', [('cond', 'hmc'), ('energy', 'mala')])
def test_correctors_follow_the_composition(runs_dir, workdir, method):
  """The corrector's score (ULA / HMC) or energy (MALA / MHMC) is the composed one: weights
  (1, -1) on (4, 4) cancel to the null condition with correctors too; the correctors move the
  samples and cost K L + 1 (HMC) or K + 1 (MALA) evaluations at each inner level."""
  steps, k = 5, 2
  corrector = dict(corrector=method, corrector_steps=k, corrector_step_scale=0.2)
  null = _sample(runs_dir, f'{method}_null', runs_dir[workdir], steps=steps,
                 control=dict(compose_labels=[4], label_weights='0', **corrector))
  cancelled = _sample(runs_dir, f'{method}_cancel', runs_dir[workdir], steps=steps,
                      control=dict(compose_labels=[4, 4], label_weights='1,-1', **corrector))
  np.testing.assert_allclose(cancelled['samples'], null['samples'], atol=1e-4)
  plain = _sample(runs_dir, f'{method}_plain', runs_dir[workdir], steps=steps,
                  control=dict(compose_labels=[4], label_weights='0'))
  assert np.abs(plain['samples'] - null['samples']).max() > 1e-3
  per_level = k * 3 + 1 if method == 'hmc' else k + 1
  assert null['nfe'] == plain['nfe'] + (steps - 1) * per_level, (null['nfe'], plain['nfe'])
  opts = dict(solver='ddim', steps=steps, seed=0, class_label=None, guidance_scale=0.0,
              num_samples=8, batch_size=8,
              corrector=dict(method=method, num_steps=k, step_scale=0.2, num_leapfrog=3))
  name = os.path.basename(sample_io.default_output_dir('w', opts, step=0))
  assert ('_hmc2L3x0.2_' if method == 'hmc' else '_mala2x0.2_') in name, name


@pytest.mark.parametrize('workdir, kwargs, match', [
    ('base', dict(control=dict(classifier_workdir='base')), 'not a noisy classifier'),
    ('base', dict(control=dict(classifier_workdir='missing')), 'classifier_workdir'),
    ('base', dict(control=dict(classifier_scale=2.0)), 'needs classifier_workdir'),
    ('base', dict(control=dict(classifier_workdir='clf', classifier_scale=-1.0)), '>= 0'),
    ('base', dict(class_label=12, control=dict(classifier_workdir='clf')), 'range'),
    ('base', dict(class_label=3), 'classifier_workdir'),
    ('base', dict(control=dict(compose_labels=[1, 2])), 'not class-conditional'),
    ('cond', dict(control=dict(compose_labels=[1, 2], label_weights='1')), '2 conditions'),
    ('cond', dict(control=dict(compose_labels=[1, 2], label_weights='a,b')), 'numbers'),
    ('cond', dict(control=dict(compose_labels=[11])), 'out of range'),
    ('cond', dict(guidance_scale=1.0, control=dict(compose_labels=[1])), 'guidance_scale'),
    ('cond', dict(control=dict(label_weights='1')), 'needs compose_labels'),
    ('cond', dict(control=dict(weights='1')), 'unknown control'),
    ('base', dict(control=dict(corrector_steps=2)), 'need corrector'),
    ('base', dict(control=dict(corrector='gibbs')), 'unknown corrector'),
    ('base', dict(control=dict(corrector='mala')), 'energy-parameterised'),
    ('base', dict(control=dict(corrector='ula', corrector_steps=0)), '>= 1'),
    ('base', dict(control=dict(corrector='hmc', corrector_step_scale=-1.0)), 'step_scale > 0'),
    ('base', dict(solver='dpmpp_2m', control=dict(corrector='ula')), 'multistep'),
    ('base', dict(solver='ddpm', control=dict(corrector='ula', classifier_workdir='clf')),
     'classifier guidance'),
    ('energy', dict(class_label=1, guidance_scale=1.0, control=dict(corrector='mala')),
     'composition of one condition'),
])
def test_bad_arguments_are_one_clear_error(runs_dir, workdir, kwargs, match):
  control = kwargs.get('control', {})
  if control.get('classifier_workdir') in ('base', 'clf'):
    control['classifier_workdir'] = runs_dir[control['classifier_workdir']]
  elif control.get('classifier_workdir') == 'missing':
    control['classifier_workdir'] = str(runs_dir['root'] / 'missing')
  with pytest.raises(sample.SampleError, match=match):
    _sample(runs_dir, 'never', runs_dir[workdir], **kwargs)
  assert not os.path.exists(runs_dir['root'] / 'never')


def test_a_classifier_of_another_schedule_is_refused(runs_dir):
  other = str(runs_dir['root'] / 'clf_other')
  train.train_and_evaluate(tiny_clf_config(num_timesteps=50), other)
  with pytest.raises(sample.SampleError, match='schedule'):
    _sample(runs_dir, 'never', runs_dir['base'], control=dict(classifier_workdir=other))


def test_the_cli_guides_and_fails_in_one_line(runs_dir):
  ok = subprocess.run(
      [sys.executable, 'run_sample.py', f'--workdir={runs_dir["base"]}',
       f'--classifier_workdir={runs_dir["clf"]}', '--class_label=2', '--classifier_scale=2',
       '--num_samples=4', '--steps=3'], cwd=ROOT, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  names = os.listdir(os.path.join(runs_dir['base'], 'samples'))
  assert len(names) == 1 and 'classifier2' in names[0] and 'class2' in names[0], names
  out = os.path.join(runs_dir['base'], 'samples', names[0])
  np.testing.assert_array_equal(np.load(os.path.join(out, 'samples.npz'))['labels'], [2] * 4)
  bad = subprocess.run(
      [sys.executable, 'run_sample.py', f'--workdir={runs_dir["base"]}',
       f'--classifier_workdir={runs_dir["base"]}', '--num_samples=4'],
      cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith('run_sample.py: error:')
  assert 'Traceback' not in bad.stderr
