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

from configs import digits_distill


def get_config():
  # The rounds' structure is digits_distill's; these are the paper's CIFAR-10 values.
  config = digits_distill.get_config()
  config.distill.start_steps = 256

  config.optim.lr = 5e-5
  config.optim.ema_decay = 0.0  # no EMA: the EMA is the parameters

  t = config.training
  t.batch_size = 128
  t.num_train_steps = 50_000
  t.log_every = 500
  t.checkpoint_every = 5_000
  t.keep_checkpoints = 3
  t.sample_every = 10_000

  config.eval.num_samples = 10_000
  return config
