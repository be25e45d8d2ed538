"""Progressive distillation of a CIFAR-10 DDPM (Salimans & Ho 2022, sec. 5 and appendix E).

Start from the converted official weights (README, "Official weights"):

  python -m jaxddpm.convert --from_diffusers=ddpm-cifar10-32 --workdir=runs/ddpm-cifar10
  python run_train.py --config=configs/cifar_distill.py \
      --config.distill.teacher=runs/ddpm-cifar10 --workdir=runs/cifar_pd

The paper's CIFAR-10 settings: 50k updates per round at batch 128, Adam with lr 5e-5
annealed linearly to 0 within each round, no EMA, dropout 0, a v-parameterised student with
truncated-SNR weighting. The paper's first student takes 1024 steps of a continuous-time
teacher; a discrete DDPM teacher has 1000 timesteps, and the distillation grid uses only
timesteps it was trained on (jaxddpm.distillation), so here the first student takes 256
steps of a 512-point grid: 9 rounds, 256 -> 128 -> ... -> 1.
"""

import ml_collections

from configs import default


def get_config():
  base = default.get_config()
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.distill = d = ml_collections.ConfigDict()
  d.teacher = ''
  d.start_steps = 256
  d.final_steps = 1
  d.student_mean_type = 'v'
  d.weighting = 'truncated_snr'
  d.dropout = 0.0

  config.optim = base.optim
  config.optim.lr = 5e-5
  config.optim.warmup_steps = 0
  config.optim.ema_decay = 0.0  # no EMA: the EMA is the parameters
  config.optim.grad_clip = 1.0

  config.training = base.training
  config.training.batch_size = 128
  config.training.num_train_steps = 50_000
  config.training.log_every = 500
  config.training.checkpoint_every = 5_000
  config.training.sample_every = 10_000
  config.training.eval_every = 0

  config.eval = base.eval
  config.eval.num_samples = 10_000
  return config
