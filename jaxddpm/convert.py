r"""Imports diffusers `UNet2DModel` weights (e.g. the official DDPM checkpoints) into a workdir.

  python -m jaxddpm.convert --from_diffusers=ddpm-cifar10-32 --workdir=runs/ddpm-cifar10

The source folder is a diffusers model folder (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`, with `scheduler_config.json`
beside it) or a pipeline folder with `unet/` and `scheduler/` subfolders, as
published for google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256,
ddpm-bedroom-256, ddpm-cat-256 and their ddpm-ema-* variants. Safetensors
files are read with the `safetensors` NumPy API, so torch is not needed
(it is for `.bin` files).

The result is a workdir like a trained run's: `config.json` (the full run
config) and a params-only checkpoint at step 0 (params = EMA params), so
`run_sample.py --workdir` and `jaxddpm.load_run` work on it. Anything that
cannot be mapped exactly (a block type this U-Net does not have, a missing,
unused or wrongly shaped tensor) is an error naming it; nothing is loaded
partially.
"""

import importlib.util
import json
import os
import sys
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from jaxddpm import config_utils
from jaxddpm import diffusion
from jaxddpm import models
from jaxddpm import factories

WEIGHT_NAME = 'diffusion_pytorch_model'

# UNet2DModel.__init__ defaults (diffusers 0.42): what diffusers assumes for keys a config.json lacks.
DIFFUSERS_UNET_DEFAULTS = {
    'sample_size': None, 'in_channels': 3, 'out_channels': 3, 'center_input_sample': False,
    'time_embedding_type': 'positional', 'time_embedding_dim': None, 'freq_shift': 0,
    'flip_sin_to_cos': True,
    'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    'mid_block_type': 'UNetMidBlock2D',
    'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    'block_out_channels': (224, 448, 672, 896), 'layers_per_block': 2, 'mid_block_scale_factor': 1,
    'downsample_padding': 1, 'downsample_type': 'conv', 'upsample_type': 'conv', 'dropout': 0.0,
    'act_fn': 'silu', 'attention_head_dim': 8, 'norm_num_groups': 32, 'attn_norm_num_groups': None,
    'norm_eps': 1e-5, 'resnet_time_scale_shift': 'default', 'add_attention': True,
    'class_embed_type': None, 'num_class_embeds': None, 'num_train_timesteps': None,
}
# DDPMScheduler.__init__ defaults.
DIFFUSERS_SCHEDULER_DEFAULTS = {
    'num_train_timesteps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02, 'beta_schedule': 'linear',
    'trained_betas': None, 'variance_type': 'fixed_small', 'clip_sample': True,
    'prediction_type': 'epsilon', 'thresholding': False, 'clip_sample_range': 1.0,
}
# diffusers name -> ours. scaled_linear is linspace(sqrt(b0), sqrt(b1))**2, our 'quad'; squaredcos_cap_v2
# is improved DDPM's cosine with max_beta 0.999, our 'cosine'.
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine',
                  'sigmoid': 'sigmoid'}
VARIANCE_TYPES = {'fixed_small': 'fixedsmall', 'fixed_small_log': 'fixedsmall',
                  'fixed_large': 'fixedlarge', 'fixed_large_log': 'fixedlarge',
                  'learned': 'learned', 'learned_range': 'learned_range'}
PREDICTION_TYPES = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}
DOWN_BLOCKS = {'DownBlock2D': False, 'AttnDownBlock2D': True}  # type -> has attention
UP_BLOCKS = {'UpBlock2D': False, 'AttnUpBlock2D': True}
# Attention tensor names of diffusers < 0.15, which diffusers still loads.
DEPRECATED_ATTENTION_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


class ConversionError(ValueError):
  """The source cannot be converted exactly; the message names the key or tensor."""


def _require(cfg: Mapping[str, Any], key: str, allowed, where: str):
  value = cfg[key]
  if value not in allowed:
    raise ConversionError(f'{where}: {key}={value!r} is not supported (supported: {list(allowed)})')
  return value


def model_fields_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our config fields for a diffusers UNet2DModel config.json dict.

  Returns {'model': {...config.model fields}, 'data': {image_size, channels},
  'out_channels': int}. Raises ConversionError for anything our U-Net cannot
  express exactly.
  """
  where = 'unet config.json'
  cls = cfg.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    raise ConversionError(f'{where}: _class_name={cls!r}; only UNet2DModel can be converted')
  unknown = sorted(k for k in cfg if not k.startswith('_') and k not in DIFFUSERS_UNET_DEFAULTS)
  if unknown:
    raise ConversionError(f'{where}: unknown keys {unknown}')
  cfg = {**DIFFUSERS_UNET_DEFAULTS, **cfg}
  _require(cfg, 'time_embedding_type', ['positional'], where)
  _require(cfg, 'act_fn', ['silu', 'swish'], where)
  _require(cfg, 'center_input_sample', [False], where)
  _require(cfg, 'mid_block_type', ['UNetMidBlock2D'], where)
  _require(cfg, 'mid_block_scale_factor', [1], where)
  _require(cfg, 'resnet_time_scale_shift', ['default'], where)
  _require(cfg, 'add_attention', [True], where)
  _require(cfg, 'class_embed_type', [None], where)
  _require(cfg, 'downsample_type', ['conv'], where)
  _require(cfg, 'upsample_type', ['conv'], where)
  _require(cfg, 'attn_norm_num_groups', [None, cfg['norm_num_groups']], where)
  _require(cfg, 'downsample_padding', [0, 1], where)

  widths = [int(c) for c in cfg['block_out_channels']]
  ch = widths[0]
  if any(w % ch for w in widths):
    raise ConversionError(f'{where}: block_out_channels={widths} are not multiples of {ch}')
  _require(cfg, 'time_embedding_dim', [None, 4 * ch], where)
  down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
  if not len(down) == len(up) == len(widths):
    raise ConversionError(f'{where}: {len(down)} down blocks, {len(up)} up blocks and '
                          f'{len(widths)} block_out_channels must agree')
  for i, block in enumerate(down):
    if block not in DOWN_BLOCKS:
      raise ConversionError(f'{where}: down_block_types[{i}]={block!r} is not supported '
                            f'(supported: {list(DOWN_BLOCKS)})')
  for i, block in enumerate(up):
    if block not in UP_BLOCKS:
      raise ConversionError(f'{where}: up_block_types[{i}]={block!r} is not supported '
                            f'(supported: {list(UP_BLOCKS)})')
  size = cfg['sample_size']
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ConversionError(f'{where}: sample_size={size} is not square')
    size = size[0]
  if not isinstance(size, int):
    raise ConversionError(f'{where}: sample_size={size!r} must be an integer')
  attn_resolutions = []
  for level, block in enumerate(down):
    up_block = up[len(up) - 1 - level]
    # Our U-Net puts attention at a resolution on both paths, diffusers per block.
    if DOWN_BLOCKS[block] != UP_BLOCKS[up_block]:
      raise ConversionError(f'{where}: down_block_types[{level}]={block!r} and '
                            f'up_block_types[{len(up) - 1 - level}]={up_block!r} disagree on attention')
    if DOWN_BLOCKS[block]:
      attn_resolutions.append(size // 2 ** level)
  num_classes = cfg['num_class_embeds'] or 0
  head_dim = cfg['attention_head_dim']
  return {
      'model': {
          'ch': ch,
          'ch_mult': tuple(w // ch for w in widths),
          'num_res_blocks': int(cfg['layers_per_block']),
          'attn_resolutions': tuple(attn_resolutions),
          'dropout': float(cfg['dropout']),
          'num_classes': int(num_classes),
          'num_heads': 1,
          # diffusers' heads = width // attention_head_dim per block; None means one head.
          'num_head_channels': 0 if head_dim is None else int(head_dim),
          'resblock_updown': False,
          'resamp_with_conv': True,
          'norm_groups': int(cfg['norm_num_groups']),
          'norm_eps': float(cfg['norm_eps']),
          'flip_sin_to_cos': bool(cfg['flip_sin_to_cos']),
          'freq_shift': float(cfg['freq_shift']),
          'downsample_padding': 'same' if cfg['downsample_padding'] == 0 else 'symmetric',
      },
      'data': {'image_size': size, 'channels': int(cfg['in_channels'])},
      'out_channels': int(cfg['out_channels']),
  }


def diffusion_fields_from_scheduler(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our config.diffusion fields (and sampling.clip_denoised) for a DDPMScheduler config dict."""
  where = 'scheduler_config.json'
  cfg = {**DIFFUSERS_SCHEDULER_DEFAULTS, **cfg}
  if cfg['trained_betas'] is not None:
    raise ConversionError(f'{where}: trained_betas is not supported')
  _require(cfg, 'thresholding', [False], where)
  if cfg['clip_sample']:
    _require(cfg, 'clip_sample_range', [1, 1.0], where)
  return {
      'diffusion': {
          'num_timesteps': int(cfg['num_train_timesteps']),
          'beta_schedule': BETA_SCHEDULES[_require(cfg, 'beta_schedule', BETA_SCHEDULES, where)],
          'beta_start': float(cfg['beta_start']),
          'beta_end': float(cfg['beta_end']),
          'model_mean_type': PREDICTION_TYPES[_require(cfg, 'prediction_type', PREDICTION_TYPES, where)],
          'model_var_type': VARIANCE_TYPES[_require(cfg, 'variance_type', VARIANCE_TYPES, where)],
      },
      'clip_denoised': bool(cfg['clip_sample']),
  }


def _weight_map(ucfg: models.UNetConfig) -> dict[str, tuple[str, str]]:
  """Our module path ('down_1_block_0/conv1') -> (diffusers module prefix, layer kind)."""
  num_levels = len(ucfg.ch_mult)
  mapping = {
      'conv_in': ('conv_in', 'conv'),
      'temb_dense0': ('time_embedding.linear_1', 'dense'),
      'temb_dense1': ('time_embedding.linear_2', 'dense'),
      'class_embed': ('class_embedding', 'embed'),
      'norm_out': ('conv_norm_out', 'norm'),
      'conv_out': ('conv_out', 'conv'),
  }

  def resblock(ours, theirs):
    for a, b, kind in [('norm1', 'norm1', 'norm'), ('conv1', 'conv1', 'conv'),
                       ('temb_proj', 'time_emb_proj', 'dense'), ('norm2', 'norm2', 'norm'),
                       ('conv2', 'conv2', 'conv'), ('nin_shortcut', 'conv_shortcut', 'conv')]:
      mapping[f'{ours}/{a}'] = (f'{theirs}.{b}', kind)

  def attention(ours, theirs):
    for a, b, kind in [('norm', 'group_norm', 'norm'), ('q', 'to_q', 'dense'), ('k', 'to_k', 'dense'),
                       ('v', 'to_v', 'dense'), ('proj_out', 'to_out.0', 'dense')]:
      mapping[f'{ours}/{a}'] = (f'{theirs}.{b}', kind)

  for level in range(num_levels):
    theirs = f'down_blocks.{level}'
    for i in range(ucfg.num_res_blocks):
      resblock(f'down_{level}_block_{i}', f'{theirs}.resnets.{i}')
      attention(f'down_{level}_attn_{i}', f'{theirs}.attentions.{i}')
    mapping[f'down_{level}_downsample/conv'] = (f'{theirs}.downsamplers.0.conv', 'conv')
    theirs = f'up_blocks.{num_levels - 1 - level}'
    for i in range(ucfg.num_res_blocks + 1):
      resblock(f'up_{level}_block_{i}', f'{theirs}.resnets.{i}')
      attention(f'up_{level}_attn_{i}', f'{theirs}.attentions.{i}')
    mapping[f'up_{level}_upsample/conv'] = (f'{theirs}.upsamplers.0.conv', 'conv')
  resblock('mid_block_0', 'mid_block.resnets.0')
  attention('mid_attn', 'mid_block.attentions.0')
  resblock('mid_block_1', 'mid_block.resnets.1')
  return mapping


def _to_ours(kind: str, leaf: str, w: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in our layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  if kind == 'conv' and leaf == 'kernel':
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
  if kind == 'dense' and leaf == 'kernel':
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # attention projections stored as 1x1 convs
      w = w[:, :, 0, 0]
    return w.T if w.ndim == 2 else w
  return w


def convert_unet_weights(tensors: Mapping[str, np.ndarray], ucfg: models.UNetConfig):
  """Our params pytree (float32 NumPy) from a diffusers UNet2DModel state dict.

  Every parameter of `UNet(ucfg)` must be found with the right shape and every
  tensor must be used; otherwise ConversionError lists the offending tensors.
  A class embedding gains a zero row for our null class (index num_classes).
  """
  abstract = jax.eval_shape(models.init_params, models.UNet(ucfg), jax.random.key(0))
  mapping = _weight_map(ucfg)
  leaf_names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}
  used, missing, mismatched = set(), [], []

  def convert_leaf(path, spec):
    keys = [p.key for p in path]
    module, leaf = '/'.join(keys[:-1]), keys[-1]
    prefix, kind = mapping[module]
    name = f'{prefix}.{leaf_names[leaf]}'
    if name not in tensors:
      for new, old in DEPRECATED_ATTENTION_NAMES.items():
        if prefix.endswith('.' + new):
          alias = f'{prefix[:-len(new)]}{old}.{leaf_names[leaf]}'
          if alias in tensors:
            name = alias
    if name not in tensors:
      missing.append(name)
      return None
    used.add(name)
    w = _to_ours(kind, leaf, np.asarray(tensors[name], np.float32))
    if kind == 'embed':
      w = np.concatenate([w, np.zeros((1, w.shape[1]), np.float32)])  # our null class row
    if w.shape != spec.shape:
      mismatched.append(f'{name}: shape {tuple(tensors[name].shape)} does not fit {"/".join(keys)} '
                        f'{spec.shape}')
      return None
    return w

  params = jax.tree.map_with_path(convert_leaf, abstract)
  unused = sorted(set(tensors) - used)
  problems = ([f'missing tensor {n}' for n in missing] + mismatched
              + [f'unused tensor {n}' for n in unused])
  if problems:
    shown = '; '.join(problems[:8]) + (f'; ... ({len(problems)} problems)' if len(problems) > 8 else '')
    raise ConversionError(f'weights do not match the converted architecture: {shown}')
  return params


def _find_weights(unet_dir: str) -> str:
  for ext in ('safetensors', 'bin'):
    path = os.path.join(unet_dir, f'{WEIGHT_NAME}.{ext}')
    if os.path.isfile(path):
      return path
  raise ConversionError(f'no {WEIGHT_NAME}.safetensors or .bin in {unet_dir}')


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """A state dict as float32 NumPy arrays, from .safetensors (no torch) or .bin (needs torch)."""
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      tensors = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'cannot read {path}: {e}') from e
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(f'{path} is a PyTorch pickle; reading it needs torch '
                            '(pip install torch), or convert it to .safetensors') from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f'cannot read {path}: {e}') from e


def read_diffusers_dir(src: str):
  """(unet config dict, scheduler config dict or None, tensors) of a diffusers folder."""
  if not os.path.isdir(src):
    raise ConversionError(f'{src!r} is not a directory')
  unet_dir, sched_dir = src, src
  if os.path.isfile(os.path.join(src, 'unet', 'config.json')):  # a pipeline folder
    unet_dir, sched_dir = os.path.join(src, 'unet'), os.path.join(src, 'scheduler')
  if not os.path.isfile(os.path.join(unet_dir, 'config.json')):
    raise ConversionError(f'no config.json in {src!r} (nor in {src!r}/unet)')
  unet_cfg = _read_json(os.path.join(unet_dir, 'config.json'))
  sched_path = os.path.join(sched_dir, 'scheduler_config.json')
  sched_cfg = _read_json(sched_path) if os.path.isfile(sched_path) else None
  return unet_cfg, sched_cfg, load_tensors(_find_weights(unet_dir))


def default_config() -> ml_collections.ConfigDict:
  """configs/default.py of this repository: the full config tree every run has."""
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'default.py')
    if not os.path.isfile(path):
      raise ConversionError('configs/default.py not found; pass base_config') from None
    spec = importlib.util.spec_from_file_location('_jaxddpm_default_config', path)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
  return default.get_config()


def convert_diffusers(src: str, base_config: ml_collections.ConfigDict | None = None):
  """(config, params) of the diffusers UNet2DModel folder `src`.

  config is `base_config` (default: configs/default.py) with the model, data
  and diffusion fields of the source; params is a float32 NumPy pytree for
  `factories.create_model(config)`.
  """
  unet_cfg, sched_cfg, tensors = read_diffusers_dir(src)
  fields = model_fields_from_diffusers(unet_cfg)
  if sched_cfg is None:
    logging.warning('no scheduler_config.json in %s; using the DDPM scheduler defaults', src)
    sched_cfg = {}
  diff = diffusion_fields_from_scheduler(sched_cfg)
  channels = fields['data']['channels']
  learned = diff['diffusion']['model_var_type'] in diffusion.LEARNED_VAR_TYPES
  expected_out = 2 * channels if learned else channels
  if fields['out_channels'] != expected_out:
    raise ConversionError(
        f'unet config.json: out_channels={fields["out_channels"]} does not fit in_channels={channels} '
        f'with variance_type={sched_cfg.get("variance_type", "fixed_small")!r} (expected {expected_out})')

  config = base_config.copy_and_resolve_references() if base_config is not None else default_config()
  with config.unlocked():
    config.model.update(fields['model'])
    config.data.update(fields['data'])
    config.diffusion.update(diff['diffusion'])
    config.sampling.clip_denoised = diff['clip_denoised']
    # Ancestral sampling over all T steps, as the source scheduler does.
    num_timesteps = config.diffusion.num_timesteps
    config.sampling.num_steps = num_timesteps
    config.sampling.train_grid_steps = min(config.sampling.train_grid_steps, num_timesteps)
    if learned:
      config.diffusion.loss_type = 'hybrid'  # improved DDPM's loss for learned variances, for fine-tuning
  try:
    config_utils.validate_config(config)
  except ValueError as e:
    raise ConversionError(f'the converted config is invalid: {e}') from e
  params = convert_unet_weights(tensors, factories.model_config(config))
  return config, params


def convert_to_workdir(src: str, workdir: str, base_config: ml_collections.ConfigDict | None = None):
  """Converts `src` and writes workdir/config.json and a step-0 params checkpoint.

  Refuses a workdir that exists and is not empty, so no run is overwritten.
  Returns (config, params).
  """
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ConversionError(f'workdir {workdir!r} exists and is not empty; choose a new one')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConversionError(f'workdir {workdir!r} exists and is not a directory')
  config, params = convert_diffusers(src, base_config)
  # Imported here: Orbax is only needed to write, not to convert in memory.
  from jaxddpm import checkpoint  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  checkpoint.save_params(workdir, params, step=0, ema_params=params)
  return config, params


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  src, workdir = flags.FLAGS.from_diffusers, flags.FLAGS.workdir
  if not src or not workdir:
    raise app.UsageError('both --from_diffusers and --workdir are required')
  try:
    config, params = convert_to_workdir(src, workdir)
  except ConversionError as e:
    sys.exit(f'convert: error: {e}')
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  logging.info('Converted %s (%d params, %s, %dx%d) into %s', src, count, config.diffusion.model_var_type,
               config.data.image_size, config.data.image_size, workdir)


if __name__ == '__main__':
  # Defined here, not at import, so importing this module next to other CLIs adds no flags.
  flags.DEFINE_string('from_diffusers', None,
                      'diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.*).')
  flags.DEFINE_string('workdir', None, 'New run directory to write.')
  app.run(main)
