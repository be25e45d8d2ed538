"""Progressive distillation of the digits quickstart run (Salimans & Ho 2022).

  python run_train.py --config=configs/digits_distill.py \
      --config.distill.teacher=runs/digits --workdir=runs/digits_pd

Rounds 32 -> 16 -> ... -> 1 steps (6 rounds), each 1000 Adam updates with the learning rate
annealed linearly to 0, the previous student as the next teacher; a v-parameterised student
with truncated-SNR weighting (PD sec. 4). The first teacher takes 64 DDIM steps on a grid of
64 of its 1000 timesteps, which keeps the whole distillation near an hour and a quarter on
a 2-core CPU; start higher with --config.distill.start_steps=128 or 256. With 400 updates a
round the 4-step student reached 1.41x the teacher's DDPM-200 digits FID, with 1000 see the
README.
"""

import ml_collections

from configs import default


def get_config():
  base = default.get_config()
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.distill = d = ml_collections.ConfigDict()
  d.teacher = ''  # the teacher's workdir (required)
  d.start_steps = 32  # the first student's steps; its teacher takes 64
  d.final_steps = 1
  d.student_mean_type = 'v'  # v | x0 (PD appendix D; eps cannot predict x at SNR 0)
  d.weighting = 'truncated_snr'  # truncated_snr: max(SNR, 1) | snr_plus_one: SNR + 1
  d.dropout = 0.0

  config.optim = base.optim
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 0
  config.optim.ema_decay = 0.99
  config.optim.grad_clip = 1.0

  config.training = base.training
  config.training.batch_size = 64
  config.training.num_train_steps = 1000  # updates per round
  config.training.steps_per_call = 1
  config.training.log_every = 50
  config.training.checkpoint_every = 250
  config.training.keep_checkpoints = 2
  config.training.sample_every = 1000
  config.training.eval_every = 0
  config.training.num_sample_grid = 64

  config.eval = base.eval
  config.eval.num_samples = 512
  return config
