"""Every config file loads and validates; cifar.py is the DDPM paper's run; bad values are named."""

import importlib
import json
import pathlib

import ml_collections
import pytest

from jaxddpm import config_utils
from jaxddpm import diffusion
from jaxddpm import factories

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
ALL_NAMES = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem != '__init__')
# Distillation configs hold the rounds' settings; the model, schedule and data are the teacher's.
DISTILL_NAMES = [n for n in ALL_NAMES if n.endswith('_distill')]
CONFIG_NAMES = [n for n in ALL_NAMES if n not in DISTILL_NAMES]


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def test_config_files_found():
  assert {'default', 'cifar', 'digits', 'tiny'} <= set(CONFIG_NAMES)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_loads_and_validates(name):
  config = load(name)
  assert isinstance(config, ml_collections.ConfigDict)
  for group in ('data', 'model', 'diffusion', 'optim', 'training', 'sampling'):
    assert group in config, group
  config_utils.validate_config(config)
  schedule = factories.schedule(config)
  assert schedule.num_timesteps == config.diffusion.num_timesteps
  factories.diffusion_types(config)
  # workdir/config.json round trip: tuples come back as lists and still validate.
  restored = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  config_utils.validate_config(restored)


@pytest.mark.parametrize('name', DISTILL_NAMES)
def test_distillation_configs_validate_and_make_valid_rounds(name):
  from jaxddpm import distill  # pylint: disable=g-import-not-at-top
  config = load(name)
  config.distill.teacher = 'runs/teacher'
  assert distill.is_distillation(config)
  distill.check_config(config)
  config_utils.validate_config(config)
  teacher = load('cifar' if name.startswith('cifar') else 'digits')
  steps = distill.round_steps(config)
  assert steps[-1] == 1 and 2 * steps[0] <= teacher.diffusion.num_timesteps
  for index, n in enumerate(steps):
    round_config = distill.round_config(config, teacher, n, index)
    config_utils.validate_config(round_config)
    assert factories.is_distilled(round_config) and round_config.sampling.num_steps == n


def test_cifar_distill_has_the_papers_settings():
  config = load('cifar_distill')  # Salimans & Ho 2022, appendix E (CIFAR-10)
  assert (config.training.num_train_steps, config.training.batch_size) == (50_000, 128)
  assert (config.optim.lr, config.optim.ema_decay, config.distill.dropout) == (5e-5, 0.0, 0.0)
  assert (config.distill.student_mean_type, config.distill.weighting) == ('v', 'truncated_snr')


def test_cifar_is_the_ddpm_paper_run():
  config = load('cifar')
  assert (config.data.dataset, config.data.image_size, config.data.channels) == ('cifar10', 32, 3)
  assert config.data.random_flip
  d = config.diffusion
  assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end) == (1000, 'linear', 1e-4,
                                                                         0.02)
  assert (d.model_mean_type, d.model_var_type, d.loss_type) == ('eps', 'fixedlarge', 'mse')
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.dropout) == (
      128, (1, 2, 2, 2), 2, (16,), 0.1)
  o = config.optim
  assert (o.lr, o.warmup_steps, o.grad_clip, o.ema_decay) == (2e-4, 5000, 1.0, 0.9999)
  assert (config.training.batch_size, config.training.num_train_steps) == (128, 800_000)
  assert float(factories.schedule(config).alphas_cumprod[-1]) == pytest.approx(
      4.04e-5, rel=2e-3)


BAD_VALUES = [
    ('diffusion.beta_schedule', 'cosin'),
    ('diffusion.num_timesteps', 1),
    ('diffusion.num_timesteps', 0),
    ('diffusion.beta_start', 0.0),
    ('diffusion.beta_end', 1.5),
    ('diffusion.beta_start', 0.05),  # above beta_end = 0.02
    ('diffusion.model_mean_type', 'epsilon'),
    ('diffusion.model_var_type', 'fixed'),
    ('diffusion.loss_type', 'l2'),
    ('diffusion.timestep_sampler', 'importance'),
    ('data.channels', 2),
    ('data.image_size', 0),
    ('data.image_size', 36),  # not divisible by 2**3 for ch_mult (1, 2, 2, 2)
    ('data.low_res_size', 32),  # not below image_size 32
    ('data.low_res_size', -1),
    ('diffusion.aug_max', 1.5),
    ('sampling.aug_level', -0.1),
    ('model.ch', 0),
    ('model.ch_mult', ()),
    ('model.ch_mult', (1, 0)),
    ('model.attn_resolutions', (12,)),
    ('model.norm_groups', 24),  # does not divide 128
    ('model.num_heads', 3),  # does not divide the width 256 at resolution 16
    ('model.dropout', 1.0),
    ('model.num_classes', -1),
    ('model.dtype', 'float8'),
    ('optim.lr', 0.0),
    ('optim.warmup_steps', -1),
    ('optim.ema_decay', 1.5),
    ('optim.beta2', 1.0),
    ('training.batch_size', 0),
    ('training.batch_size', -8),
    ('training.steps_per_call', 0),
    ('sampling.sampler', 'euler'),
    ('sampling.solver', 'euler'),
    ('sampling.spacing', 'karas'),
    ('sampling.order', 4),
    ('sampling.s_churn', -1.0),
    ('sampling.s_noise', 0.0),
    ('sampling.thresholding', 1.0),
    ('diffusion.weighting', 'snr'),
    ('diffusion.min_snr_gamma', 0.0),
    ('sampling.num_steps', 0),
    ('sampling.num_steps', 1),  # run_sample.py --steps needs 2 or more too
    ('sampling.num_steps', 1001),  # more than T
    ('sampling.eta', -0.1),
    ('sampling.batch_size', 0),
]


@pytest.mark.parametrize('field, value', BAD_VALUES)
def test_validate_config_names_field_and_value(field, value):
  config = load('cifar')
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ValueError) as info:
    config_utils.validate_config(config)
  message = str(info.value)
  assert f'config.{field} = {value!r}' in message, message


def test_any_loss_goes_with_any_variance():
  config = load('tiny')
  for var_type in diffusion.VAR_TYPES:
    for loss_type in diffusion.LOSS_TYPES:
      config.diffusion.model_var_type = var_type
      config.diffusion.loss_type = loss_type
      config_utils.validate_config(config)


def test_partial_config_validates():
  config_utils.validate_config(ml_collections.ConfigDict({'training': {'batch_size': 4}}))
  with pytest.raises(ValueError, match='config.training.batch_size = 0'):
    config_utils.validate_config(ml_collections.ConfigDict({'training': {'batch_size': 0}}))
