"""A noisy classifier of the digits, for classifier guidance (Dhariwal & Nichol 2021).

p_phi(y | x_t, t) on configs/digits.py's data and diffusion (16 x 16, T = 1000, linear
betas): the digits U-Net's encoder half with attention pooling (`jaxddpm.models.classifier`),
trained by cross-entropy at uniform t (`jaxddpm.objectives.classifier_objective`). Guide the
unconditional digits run with it:

  python run_train.py --config=configs/digits_classifier.py --workdir=runs/digits_clf
  python run_sample.py --workdir=runs/digits --classifier_workdir=runs/digits_clf \\
      --class_label=3 --classifier_scale=4
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'noisy_classifier'
  config.model.num_classes = 10  # the data pipeline's labels, the classifier's K
  config.model.pool = 'attention'
  config.model.pool_head_channels = 32
  config.model.dropout = 0.1

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.99
  config.optim.weight_decay = 0.05  # guided-diffusion trains its classifiers with AdamW

  config.training.num_train_steps = 2000
  config.training.sample_every = 0  # a classifier draws no samples
  config.training.eval_every = 1000
  config.training.checkpoint_every = 1000
  config.sampling.batch_size = 512  # the held-out accuracy's batch
  return config
