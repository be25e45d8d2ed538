"""Import of diffusers UNet2DModel weights: parity with PyTorch outputs, workdirs, clear errors.

The fixtures under tests/fixtures/diffusers_* and their PyTorch outputs were
written by tests/fixtures/make_diffusers_unet_fixture.py (torch + diffusers);
these tests need neither.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxddpm
from jaxddpm import convert
from jaxddpm import models
from jaxddpm import factories

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
DDPM = os.path.join(FIXTURES, 'diffusers_ddpm')
COND = os.path.join(FIXTURES, 'diffusers_cond')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _io(src):
  with np.load(os.path.join(src, 'io.npz')) as f:
    return dict(f)


def _run(model_fn, io):
  return np.asarray(model_fn(io['x'], io['t'], {'label': io['y']} if 'y' in io else {}))


def _assert_matches_pytorch(out, io):
  """float32 parity: max error within 1e-5 of the output's scale."""
  ref = io['out']
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize('src', [DDPM, COND], ids=['ddpm', 'cond'])
def test_outputs_match_diffusers(src):
  config, params = convert.convert_diffusers(src)
  io = _io(src)
  model = factories.create_model(config)
  _assert_matches_pytorch(_run(models.make_model_fn(model, params), io), io)
  # The scheduler maps to the same betas (linear; squaredcos_cap_v2 = improved DDPM's cosine).
  betas = factories.schedule(config).betas
  np.testing.assert_allclose(np.asarray(betas), io['betas'], rtol=1e-6, atol=1e-9)


def test_config_mapping():
  config, _ = convert.convert_diffusers(DDPM)
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (16, (1, 2, 2), 1, (8,))
  assert (m.num_heads, m.num_head_channels, m.norm_groups, m.norm_eps) == (1, 0, 8, 1e-6)
  assert (m.flip_sin_to_cos, m.freq_shift, m.downsample_padding) == (False, 1.0, 'same')
  assert (config.data.image_size, config.data.channels) == (16, 3)
  assert (config.diffusion.model_mean_type, config.diffusion.model_var_type) == ('eps', 'fixedsmall')
  assert config.sampling.clip_denoised and config.sampling.num_steps == 1000

  config, params = convert.convert_diffusers(COND)
  m = config.model
  assert (m.num_classes, m.num_head_channels, m.downsample_padding) == (10, 4, 'symmetric')
  assert (m.flip_sin_to_cos, m.freq_shift) == (True, 0.0)
  assert (config.diffusion.beta_schedule, config.diffusion.num_timesteps) == ('cosine', 500)
  assert (config.diffusion.model_mean_type, config.diffusion.model_var_type) == ('v', 'learned_range')
  assert not config.sampling.clip_denoised
  assert factories.model_config(config).out_channels == 2
  # diffusers' 10 class rows plus our zero null-class row.
  emb = params['class_embed']['embedding']
  assert emb.shape == (11, 32) and not emb[10].any()


def test_workdir_round_trip_and_no_overwrite(tmp_path):
  workdir = str(tmp_path / 'run')
  convert.convert_to_workdir(COND, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['ch_mult'] == [1, 2]  # JSON lists; the model takes them
  config, params, model_fn = jaxddpm.load_run(workdir)
  assert config.model.num_classes == 10
  io = _io(COND)
  _assert_matches_pytorch(_run(model_fn, io), io)
  _, raw_params, _ = jaxddpm.load_run(workdir, ema=False)
  np.testing.assert_array_equal(raw_params['conv_out']['kernel'], params['conv_out']['kernel'])

  before = sorted(os.listdir(workdir))
  with pytest.raises(convert.ConversionError, match='not empty'):
    convert.convert_to_workdir(DDPM, workdir)
  assert sorted(os.listdir(workdir)) == before


def _tensors_and_config(src):
  unet_cfg, _, tensors = convert.read_diffusers_dir(src)
  return unet_cfg, tensors


def _unet_config(unet_cfg):
  fields = convert.model_fields_from_diffusers(unet_cfg)
  return models.UNetConfig(image_size=fields['data']['image_size'], in_channels=fields['data']['channels'],
                           out_channels=fields['out_channels'], **fields['model'])


def test_weight_problems_name_the_tensor():
  unet_cfg, tensors = _tensors_and_config(DDPM)
  ucfg = _unet_config(unet_cfg)
  # The fixture uses the pre-0.15 attention names; both spellings are accepted.
  assert 'down_blocks.1.attentions.0.query.weight' in tensors
  convert.convert_unet_weights(tensors, ucfg)

  missing = dict(tensors)
  del missing['up_blocks.0.resnets.1.conv1.weight']
  with pytest.raises(convert.ConversionError, match=r'missing tensor up_blocks\.0\.resnets\.1\.conv1\.weight'):
    convert.convert_unet_weights(missing, ucfg)

  extra = dict(tensors, **{'mid_block.resnets.2.conv1.weight': np.zeros((3, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match=r'unused tensor mid_block\.resnets\.2\.conv1\.weight'):
    convert.convert_unet_weights(extra, ucfg)

  wrong = dict(tensors)
  wrong['conv_in.weight'] = np.zeros((16, 3, 5, 5), np.float32)
  with pytest.raises(convert.ConversionError, match=r'conv_in\.weight: shape \(16, 3, 5, 5\)'):
    convert.convert_unet_weights(wrong, ucfg)


@pytest.mark.parametrize('change,message', [
    ({'down_block_types': ['DownBlock2D', 'SkipDownBlock2D', 'DownBlock2D']},
     r"down_block_types\[1\]='SkipDownBlock2D' is not supported"),
    ({'up_block_types': ['UpBlock2D', 'UpBlock2D', 'UpBlock2D']}, 'disagree on attention'),
    ({'resnet_time_scale_shift': 'scale_shift'}, "resnet_time_scale_shift='scale_shift' is not supported"),
    ({'time_embedding_type': 'fourier'}, "time_embedding_type='fourier'"),
    ({'block_out_channels': [16, 24, 32]}, 'not multiples of 16'),
    ({'some_new_option': 1}, r"unknown keys \['some_new_option'\]"),
])
def test_unsupported_configs_are_named(change, message):
  unet_cfg, _ = _tensors_and_config(DDPM)
  with pytest.raises(convert.ConversionError, match=message):
    convert.model_fields_from_diffusers({**unet_cfg, **change})


@pytest.mark.parametrize('change,message', [
    ({'variance_type': 'learned_range'}, r'out_channels=3 does not fit in_channels=3'),
    ({'beta_schedule': 'exp'}, "beta_schedule='exp' is not supported"),
    ({'trained_betas': [0.1, 0.2]}, 'trained_betas'),
])
def test_unsupported_schedulers_are_named(tmp_path, change, message):
  src = str(tmp_path / 'src')
  shutil.copytree(DDPM, src)
  path = os.path.join(src, 'scheduler_config.json')
  with open(path) as f:
    sched = json.load(f)
  with open(path, 'w') as f:
    json.dump({**sched, **change}, f)
  with pytest.raises(convert.ConversionError, match=message):
    convert.convert_diffusers(src)


def test_cli_errors_are_one_clear_line(tmp_path):
  src = str(tmp_path / 'src')
  shutil.copytree(DDPM, src)
  with open(os.path.join(src, 'config.json')) as f:
    cfg = json.load(f)
  cfg['down_block_types'][0] = 'CrossAttnDownBlock2D'
  with open(os.path.join(src, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxddpm.convert', f'--from_diffusers={src}', f'--workdir={workdir}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert "down_block_types[0]='CrossAttnDownBlock2D' is not supported" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(workdir)
