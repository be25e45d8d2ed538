"""Default configuration: every field a run can set, with neutral values.

Experiment configs (`cifar.py`, `digits.py`, ...) import this and override a
few fields, so every run has the same tree and command-line overrides look the
same everywhere (`--config.training.batch_size=64`).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'cifar10'  # tfds name, 'digits', 'folder' or 'array_record'
  data.split = 'train'
  data.eval_split = 'test'
  data.image_size = 32
  data.channels = 3
  data.random_flip = True
  data.data_dir = ''  # tfds data_dir, the image folder, or jaxddpm.data.prepare's output
  data.center_crop = True
  # Grain worker processes that decode and augment; -1: min(4, cores - 1). The data
  # order does not depend on it.
  data.num_workers = -1
  # Super-resolution: > 0 gives every example cond['low_res'], x downsampled to this side
  # (antialiased bicubic, jaxddpm.data.transforms.bicubic_resize), and makes the model an SR model.
  data.low_res_size = 0
  data.photo_size = 128  # photos: each photograph's short side before cropping
  data.image_width = 0  # 0: square image_size x image_size; else the width (digit_pairs: 32)
  data.max_text_length = 16  # captioned data: tokens per prompt (padded / truncated)

  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'  # the denoiser, from the model registry (jaxddpm.models)
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.num_classes = 0  # 0: unconditional
  model.class_dropout = 0.0  # label dropout to the null class (classifier-free guidance)
  model.num_heads = 1
  model.num_head_channels = 0  # > 0: heads = width // num_head_channels (overrides num_heads)
  model.resblock_updown = False  # BigGAN-style up/down ResBlocks
  model.resamp_with_conv = True
  model.norm_groups = 32
  model.norm_eps = 1e-6
  # Timestep embedding and downsampling variants. The defaults are the DDPM
  # reference code's; converted diffusers models set theirs.
  model.flip_sin_to_cos = False  # [sin, cos] order
  model.freq_shift = 1.0  # frequencies exp(-log(10000) i / (half - freq_shift))
  model.downsample_padding = 'same'  # 'same' (TF, DDPM) | 'symmetric' (pad 1 each side)
  model.dtype = 'float32'  # compute dtype; params stay float32
  model.remat = False
  # Energy-parameterised denoiser: eps = grad_x 1/2 ||x + f(x, t)||^2 (jaxddpm.models.
  # make_energy_fn), for Metropolis-adjusted correctors; needs eps prediction.
  model.energy = False
  # Text-to-image (captioned data): '' none | 'transformer', a text transformer trained with
  # the U-Net on a word-level tokenizer built from the training captions (GLIDE) | 'clip',
  # a frozen pretrained CLIP text encoder from the Hugging Face folder clip_dir. The
  # U-Net cross-attends to its token features and adds its pooled feature to the time
  # embedding (jaxddpm.models.text, layers.CrossAttnBlock).
  model.text = text = ml_collections.ConfigDict()
  text.encoder = ''
  text.width = 64
  text.num_layers = 2
  text.num_heads = 4
  text.caption_dropout = 0.1  # to the empty prompt, for classifier-free guidance
  text.clip_dir = ''
  text.vocab_size = 0  # set at the start of training from the run's tokenizer
  text.null_tokens = (0,)  # the empty prompt's tokens, set with vocab_size
  text.clip_arch = ''  # 'clip': the encoder's architecture (JSON), set from clip_dir

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.model_mean_type = 'eps'  # eps | x0 | v
  diffusion.model_var_type = 'fixedlarge'  # fixedlarge | fixedsmall | learned | learned_range
  diffusion.loss_type = 'mse'  # mse | kl | hybrid
  diffusion.timestep_sampler = 'uniform'  # uniform | loss_aware
  # Weight of each example's MSE (jaxddpm.objectives): uniform (DDPM's L_simple) | min_snr
  # (Hang et al. 2023) | truncated_snr | snr_plus_one (Salimans & Ho 2022).
  diffusion.weighting = 'uniform'
  diffusion.min_snr_gamma = 5.0
  diffusion.cosine_s = 0.008  # cosine schedule offset (improved DDPM eq. 17)
  diffusion.max_beta = 0.999  # cosine schedule clipping (improved DDPM sec. 3.2)
  # SR models: noise-conditioning augmentation of low_res at training, s ~ U[0, aug_max)
  # (jaxddpm.diffusion.superres; CDM sec. 4.3). 0: a clean low-res input (SR3).
  diffusion.aug_max = 0.0
  # SR models: diffuse the residual x - up(low_res) instead of x (SRDiff; superres.py).
  diffusion.sr_residual = False
  diffusion.sr_residual_scale = 1.0  # the residual times this (its std near 0.5 is right)

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4
  optim.warmup_steps = 5000
  optim.decay_steps = 0  # > 0: anneal lr linearly to 0 at this step (distillation rounds)
  optim.grad_clip = 1.0
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.ema_decay = 0.9999

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global, across all devices and hosts
  training.num_train_steps = 800_000
  training.steps_per_call = 1  # train steps fused into one jitted call (lax.scan)
  training.log_every = 100
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  training.sample_every = 10_000
  training.eval_every = 0  # 0: no evaluation during training
  training.num_sample_grid = 64

  config.sampling = sampling = ml_collections.ConfigDict()
  # ddpm | ddim | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde | unipc | heun (jaxddpm.solvers).
  sampling.solver = 'ddpm'
  sampling.num_steps = 1000  # model evaluations (NFE)
  # The solver's options (0 / '': its default; each solver takes only its own):
  sampling.eta = 0.0  # ddim
  sampling.spacing = ''  # ddpm/ddim: uniform | ddim | leading | trailing | linspace | quad;
  #                        others: logSNR | time_uniform | karras
  sampling.order = 0  # unipc: 2 or 3
  sampling.s_churn = 0.0  # heun: EDM's stochastic churn S_churn, S_tmin, S_tmax, S_noise
  sampling.s_tmin = 0.0
  sampling.s_tmax = float('inf')
  sampling.s_noise = 1.0
  sampling.thresholding = 0.0  # every solver: dynamic thresholding percentile, e.g. 0.995
  sampling.clip_denoised = True
  sampling.num_samples = 64
  sampling.batch_size = 64
  sampling.guidance_scale = 0.0
  sampling.aug_level = 0.0  # SR models: the augmentation level s of the low-res input
  # Cheap sampler for the grids written during training.
  sampling.train_grid_sampler = 'ddim'
  sampling.train_grid_steps = 50

  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 1000  # samples for FID/KID during training
  ev.bpd_num_examples = 256  # held-out images for bits/dim during training
  ev.inception_weights = ''  # path to pt_inception-2015-12-05 weights
  return config
