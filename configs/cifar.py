"""CIFAR-10 exactly as in DDPM (Ho, Jain, Abbeel 2020), the 35.7M-parameter model.

  python run_train.py --config=configs/cifar.py --workdir=runs/cifar

Paper targets: FID 3.17, IS 9.46, NLL <= 3.75 bits/dim (Table 1).
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True  # Appendix B: random horizontal flips for CIFAR-10

  config.diffusion.num_timesteps = 1000  # Sec. 4: T = 1000
  config.diffusion.beta_schedule = 'linear'  # Sec. 4: linearly increasing betas
  config.diffusion.beta_start = 1e-4  # Sec. 4: beta_1 = 1e-4
  config.diffusion.beta_end = 0.02  # Sec. 4: beta_T = 0.02
  config.diffusion.model_mean_type = 'eps'  # Sec. 3.2: eps-prediction parameterisation
  config.diffusion.loss_type = 'mse'  # Sec. 3.4, eq. 14: L_simple
  config.diffusion.model_var_type = 'fixedlarge'  # Sec. 3.2: sigma_t^2 = beta_t (CIFAR-10 choice)

  config.model.ch = 128  # Appendix B: 35.7M-param CIFAR-10 model
  config.model.ch_mult = (1, 2, 2, 2)  # Appendix B: 32 -> 16 -> 8 -> 4 resolutions
  config.model.num_res_blocks = 2  # Appendix B: two residual blocks per resolution
  config.model.attn_resolutions = (16,)  # Appendix B: self-attention at 16x16
  config.model.dropout = 0.1  # Appendix B: dropout 0.1 on CIFAR-10

  config.optim.lr = 2e-4  # Appendix B: Adam, learning rate 2e-4 for 32x32
  config.optim.warmup_steps = 5000  # Appendix B: linear warmup over 5000 steps
  config.optim.grad_clip = 1.0  # Reference code: gradient norm clipped to 1.0
  config.optim.ema_decay = 0.9999  # Appendix B: EMA of parameters with decay 0.9999

  config.training.batch_size = 128  # Appendix B: batch size 128
  config.training.num_train_steps = 800_000  # Appendix B: 800k steps for CIFAR-10
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000
  config.training.eval_every = 50_000

  config.sampling.solver = 'ddpm'  # Algorithm 2, all 1000 steps
  config.sampling.num_steps = 1000
  config.sampling.num_samples = 50_000  # Table 1: FID on 50k samples
  config.sampling.batch_size = 256
  return config
