"""A tiny model on digits for tests and smoke runs (seconds on a CPU)."""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.image_size = 8
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.norm_groups = 8
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 100
  config.optim.warmup_steps = 10
  config.optim.ema_decay = 0.9
  config.training.batch_size = 16
  config.training.num_train_steps = 8
  config.training.log_every = 2
  config.training.checkpoint_every = 4
  config.training.sample_every = 0
  config.training.eval_every = 0
  config.training.num_sample_grid = 16
  config.sampling.solver = 'ddim'
  config.sampling.num_steps = 10
  config.sampling.num_samples = 16
  config.sampling.batch_size = 16
  config.sampling.train_grid_steps = 10
  config.eval.num_samples = 64
  config.eval.bpd_num_examples = 32
  return config
