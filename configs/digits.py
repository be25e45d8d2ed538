"""scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16.

Real data that ships with scikit-learn (1797 images), so this trains offline
on a laptop CPU and gives recognisable digits within minutes:

  python run_train.py --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'digits'
  config.data.image_size = 16  # 8x8 upsampled (bilinear) so the U-Net has 3 levels
  config.data.channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.data.eval_split = 'test'

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.model.norm_groups = 8

  config.diffusion.num_timesteps = 1000

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995  # short run: average over the last ~200 steps

  config.training.batch_size = 64
  config.training.num_train_steps = 2000
  # Scanning 10 steps per call runs under 2% faster on a 2-core CPU (benchmarks/bench.py):
  # not worth coarser logging and stop checks.
  config.training.steps_per_call = 1
  config.training.log_every = 100
  config.training.checkpoint_every = 1000
  config.training.sample_every = 500
  config.training.eval_every = 1000
  config.training.num_sample_grid = 64

  config.sampling.solver = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.num_samples = 256
  config.sampling.batch_size = 256

  config.eval.num_samples = 512
  config.eval.bpd_num_examples = 128
  return config
