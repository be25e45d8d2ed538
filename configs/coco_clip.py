"""Text-to-image on COCO captions at 64x64 with a frozen pretrained CLIP text encoder, for GPUs/TPUs.

  python run_train.py --config=configs/coco_clip.py --workdir=runs/coco_clip \\
      [--config.model.text.clip_dir=PATH/clip-vit-large-patch14]
  python run_sample.py --workdir=runs/coco_clip --guidance_scale=3 \\
      --prompt="a red bus parked beside a brick building"
  python run_sample.py --workdir=runs/coco_clip --sr_workdir=runs/sr --prompts_file=prompts.txt

The text encoder is openai/clip-vit-large-patch14's text tower (Stable Diffusion 1.x's;
`jaxddpm.clip`), loaded from a local Hugging Face folder (config.json, model.safetensors,
tokenizer.json), by default ./clip-vit-large-patch14:

  huggingface-cli download openai/clip-vit-large-patch14 config.json model.safetensors \\
      tokenizer.json tokenizer_config.json special_tokens_map.json \\
      --local-dir clip-vit-large-patch14

It is frozen and runs inside the jitted train step on each batch's 77 tokens: its
last hidden states [B, 77, 768] are attended to by cross-attention after every
self-attention block, and its projected EOS feature [B, 768] is added to the time
embedding (Imagen sec. 2.2; SDXL adds its pooled CLIP feature the same way). The run
saves the encoder's architecture and tokenizer, and its weights are in every checkpoint,
so sampling needs no folder.

Sources of the values:
  * the 64x64 base model: improved-diffusion / guided-diffusion's ImageNet-64 U-Net
    (192 channels, multipliers (1, 2, 3, 4), 3 ResBlocks, attention at 32, 16 and 8 with
    64 channels per head, BigGAN up/down blocks, dropout 0.1, the cosine schedule,
    Adam 1e-4), the resolution of GLIDE's and Imagen's base models.
  * 10% of captions dropped to the empty prompt and guidance scale 3 at sampling (GLIDE
    sec. 3 trains with 20% dropped and samples at 3; Imagen drops 10%).
  * COCO's Karpathy splits through tensorflow-datasets ('coco_captions', 5 captions an
    image, one drawn anew each epoch); images center-cropped and resized to 64.
Batch 256 and 500k steps are a budget of this recipe, not a published run's.
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'coco_captions'
  config.data.split = 'train'
  config.data.eval_split = 'val'
  config.data.image_size = 64
  config.data.channels = 3
  config.data.random_flip = False  # captions name left and right
  config.data.max_text_length = 77  # CLIP's context

  config.model.ch = 192
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (32, 16, 8)
  config.model.num_head_channels = 64
  config.model.resblock_updown = True
  config.model.dropout = 0.1
  config.model.dtype = 'bfloat16'
  config.model.text.encoder = 'clip'
  config.model.text.clip_dir = 'clip-vit-large-patch14'  # a local Hugging Face CLIP folder
  config.model.text.caption_dropout = 0.1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = 'cosine'

  config.optim.lr = 1e-4
  config.optim.warmup_steps = 5_000
  config.optim.ema_decay = 0.9999

  config.training.batch_size = 256
  config.training.num_train_steps = 500_000
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000
  config.training.eval_every = 0
  config.training.num_sample_grid = 16

  config.sampling.solver = 'dpmpp_2m'
  config.sampling.num_steps = 25
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  config.sampling.guidance_scale = 3.0
  return config
