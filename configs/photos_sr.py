"""4x super-resolution (16x16 -> 64x64) of photographs, offline: the `photos` data set.

The photographs bundled with scikit-image and scikit-learn (`jaxddpm.data.photos`): random
64x64 crops of 15 photographs scaled to a 128-pixel short side for training, the tiles of
three held-out photographs (chelsea, coffee, flower) for evaluation. The low-res input is
the crop shrunk 4x by PIL's antialiased bicubic resize; the U-Net sees it upsampled and
concatenated to x_t (SR3), with noise-conditioning augmentation s ~ U[0, 0.5) at training
(CDM sec. 4.3) and s = config.sampling.aug_level at sampling; the model is v-parameterised
and diffuses the residual over the upsampled input (below).

  python run_train.py --config=configs/photos_sr.py --workdir=runs/photos_sr
  python run_sample.py --sr_workdir=runs/photos_sr --sr_samples_per_input=8
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'photos'
  config.data.image_size = 64
  config.data.low_res_size = 16
  config.data.photo_size = 128
  config.data.channels = 3
  config.data.random_flip = True
  config.data.eval_split = 'test'

  # Thin at 64x64 (16 channels), wider below: 3x fewer FLOPs than 32 channels throughout.
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4, 4)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.model.norm_groups = 8

  config.diffusion.num_timesteps = 1000
  # v-prediction (Salimans & Ho 2022): x0 = alpha_t x_t - sigma_t v stays accurate where
  # SNR -> 0. An eps model's x0 = (x_t - sigma_t eps) / alpha_t multiplies its error by
  # 1 / alpha_t (30x at t = 900 of the linear schedule): after 1000 steps of this config
  # an eps model predicted x0 at 6 dB PSNR there and sampled noise.
  config.diffusion.model_mean_type = 'v'
  # The residual x - up(low_res) as the diffused variable (SRDiff): with the image itself as
  # x_0, 1000 steps of this model sampled at 17.5 dB PSNR against bicubic's 26.7; the
  # residual model starts from the upsampled input and learns the detail on top of it.
  config.diffusion.sr_residual = True
  # The residual's std is 0.18: times 3 it spreads like an image, and 1000 steps of the
  # unscaled residual left its samples grainy (the signal is buried at most noise levels).
  config.diffusion.sr_residual_scale = 3.0
  config.diffusion.aug_max = 0.5

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995

  config.training.batch_size = 16
  config.training.num_train_steps = 2000
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.training.eval_every = 1000
  config.training.num_sample_grid = 18

  config.sampling.solver = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.num_samples = 18
  config.sampling.batch_size = 18
  config.sampling.aug_level = 0.1
  config.sampling.clip_denoised = False  # the scaled residual is not in [-1, 1]
  config.sampling.train_grid_steps = 20

  config.eval.num_samples = 0  # all 18 held-out tiles
  config.eval.bpd_num_examples = 0
  return config
