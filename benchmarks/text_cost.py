r"""What a frozen CLIP text encoder inside the jitted train step costs, by XLA's FLOP count.

  python benchmarks/text_cost.py [--config=configs/coco_clip.py] [--batch_size=8]

A text-to-image run on a frozen encoder can run the encoder in every train step (what
jaxddpm does: `model.text.encoder = 'clip'`, the tower a frozen submodule of the U-Net)
or cache its features once per caption and feed them in (`UNetConfig.context_dim`). This
compares the train step's FLOPs per example both ways, for the config's U-Net and
openai/clip-vit-large-patch14's text tower (architecture only: random, abstract
parameters; nothing is run, so it needs no weights and no accelerator). Caching would keep
77 x 768 features per caption: about 70 GB in bfloat16 for COCO's 590k captions.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO_ROOT, 'configs', 'coco_clip.py'), 'A text-to-image config.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Examples per (abstract) train step.')

# openai/clip-vit-large-patch14's text tower (its config.json's text_config).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
              eos_token_id=49407, projection_dim=768, with_projection=True)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxddpm import factories, models, train, train_state  # pylint: disable=g-import-not-at-top

  arch = models.CLIPTextConfig(**CLIP_L)
  config = _CONFIG.value
  length = int(config.data.max_text_length)
  with config.unlocked():
    config.model.text.encoder = 'clip'
    config.model.text.vocab_size = arch.vocab_size
    config.model.text.null_tokens = (49406,) + (49407,) * (length - 1)
    config.model.text.clip_arch = json.dumps(dataclasses.asdict(arch))
  b = _BATCH.value
  size = factories.image_shape(config)
  schedule = factories.schedule(config)
  cached_cfg = dataclasses.replace(factories.model_config(config), text=None,
                                   context_dim=arch.hidden_size, pooled_dim=arch.projection_dim)
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct((1, b, *shape), dtype)
  rows = {
      'CLIP in the step': (factories.create_model(config),
                           {'tokens': spec(length, dtype=jnp.int32)}),
      'cached features': (models.create('unet', cached_cfg),
                          {'context': spec(length, arch.hidden_size),
                           'context_mask': spec(length, dtype=jnp.int32),
                           'pooled': spec(arch.projection_dim)}),
  }
  figures = {}
  for name, (model, cond) in rows.items():
    state = jax.eval_shape(lambda k, m=model: train_state.create_train_state(config, m, k),
                           jax.random.key(0))
    step = train.make_train_step(config, model, schedule)
    lowered = jax.jit(step).lower(state, {'x': spec(*size), 'cond': cond})
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    figures[name] = (float(lowered.cost_analysis()['flops']) / b, params)
  print('| train step | GFLOP / example | parameters (M) |')
  print('|---|---|---|')
  for name, (flops, params) in figures.items():
    print(f'| {name} | {flops / 1e9:.1f} | {params / 1e6:.1f} |')
  ratio = figures['CLIP in the step'][0] / figures['cached features'][0]
  print(f'the encoder in the step: {ratio:.3f}x the FLOPs of the step on cached features')


if __name__ == '__main__':
  app.run(main)
