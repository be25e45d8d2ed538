"""Text-to-image, offline: two digits side by side, generated from a caption naming them.

The `digit_pairs` data set (`jaxddpm.data.digit_pairs`): 16 x 32 canvases of two of
scikit-learn's digits (each half prepared like the `digits` data set), captioned from
templates such as "a 3 on the left and a 7 on the right" or "three, then seven". Ten of
the 100 ordered pairs never appear in training (`digit_pairs.UNSEEN_PAIRS`: (d, d + 3 mod
10)), so a prompt naming one of them measures compositional generalisation. The captions
are tokenized by a word-level tokenizer built from them (WORKDIR/tokenizer.json) and
encoded by a small transformer trained with the U-Net (GLIDE); the U-Net cross-attends to
its token features and adds their pooled mean to the time embedding; 10% of captions are
dropped to the empty prompt for classifier-free guidance.

  python run_train.py --config=configs/digit_pairs.py --workdir=runs/digit_pairs
  python run_sample.py --workdir=runs/digit_pairs --guidance_scale=3 \\
      --prompt="a 3 on the left and a 7 on the right"
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'digit_pairs'
  config.data.image_size = 16
  config.data.image_width = 32
  config.data.channels = 1
  config.data.random_flip = False  # a flip would swap the digits the caption names
  config.data.eval_split = 'test'
  config.data.max_text_length = 16

  # 16 channels at 16 x 32, where the 8 x 8 digits carry little detail, and 32 / 64 below:
  # 2.5x cheaper than 32 channels throughout, so that 3000 steps fit in 40 CPU minutes.
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_head_channels = 32
  config.model.dropout = 0.0
  config.model.norm_groups = 8
  config.model.text.encoder = 'transformer'
  config.model.text.width = 64
  config.model.text.num_layers = 2
  config.model.text.num_heads = 4
  config.model.text.caption_dropout = 0.1

  config.diffusion.num_timesteps = 1000

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.995

  config.training.batch_size = 64
  config.training.num_train_steps = 3000
  config.training.steps_per_call = 1
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.training.eval_every = 0
  config.training.num_sample_grid = 64

  config.sampling.solver = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.num_samples = 100
  config.sampling.batch_size = 250
  config.sampling.guidance_scale = 3.0
  return config
