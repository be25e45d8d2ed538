"""ImageNet 64x64 -> 256x256 super-resolution, the last stage of a cascade, for GPUs/TPUs.

  python run_train.py --config=configs/imagenet_sr.py --workdir=runs/imagenet_sr
  python run_sample.py --workdir=runs/imagenet64 --sr_workdir=runs/imagenet_sr

Sources of the values:
  * architecture: the 64 -> 256 model of Cascaded Diffusion Models (Ho et al. 2021,
    appendix): 128 base channels, multipliers (1, 2, 4, 4, 8, 8), 3 ResBlocks per level;
    Adam at 1e-4. These were read from the paper's table, with no released code to check
    them against.
  * attention at 32, 16 and 8 with 4 heads, 1000 linear-schedule steps, and sampling with
    250 respaced steps: guided-diffusion's 64 -> 256 upsampler (its README's flags).
  * noise-conditioning augmentation (CDM sec. 4.3): s ~ U[0, 1) at training, so one model
    covers every strength, and the strength picked after training by a sweep of
    --aug_level. 0.2 is a starting point (imagen-pytorch's default; Imagen sweeps 0.1-0.3).
  * batch 256 and 1M steps are SR3's settings (Saharia et al. 2021); CDM does not give them.

ImageNet comes through tensorflow-datasets ('imagenet2012', whose files must be downloaded
by hand into data.data_dir first); the low-res input is the 256x256 crop shrunk 4x with the
antialiased bicubic resize.
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'imagenet2012'
  config.data.eval_split = 'validation'
  config.data.image_size = 256
  config.data.low_res_size = 64
  config.data.channels = 3
  config.data.random_flip = True

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 4, 4, 8, 8)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (32, 16, 8)
  config.model.num_heads = 4
  config.model.dropout = 0.0
  config.model.dtype = 'bfloat16'
  config.model.remat = True

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.aug_max = 1.0

  config.optim.lr = 1e-4
  config.optim.warmup_steps = 10_000
  config.optim.ema_decay = 0.9999

  config.training.batch_size = 256
  config.training.num_train_steps = 1_000_000
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000
  config.training.eval_every = 50_000
  config.training.num_sample_grid = 16

  config.sampling.solver = 'ddpm'
  config.sampling.num_steps = 250
  config.sampling.num_samples = 1000
  config.sampling.batch_size = 64
  config.sampling.aug_level = 0.2
  config.sampling.train_grid_steps = 50

  config.eval.num_samples = 1000
  config.eval.bpd_num_examples = 0
  return config
