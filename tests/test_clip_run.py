"""A text-to-image run on a frozen pretrained CLIP text encoder (the tiny fixture folder)."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxddpm import checkpoint
from jaxddpm import clip
from jaxddpm import config_utils
from jaxddpm import prompts
from jaxddpm import sample
from jaxddpm import train
from jaxddpm import train_state
from jaxddpm.data import text as text_data
from jaxddpm.models import text as text_lib
from test_text_run import tiny_text_config

CLIP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip_tiny')


@pytest.fixture(scope='module')
def clip_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('clip')
  folder = str(root / 'clip_tiny')
  shutil.copytree(CLIP_DIR, folder)
  config = tiny_text_config()
  config.model.text.encoder = 'clip'
  config.model.text.clip_dir = folder
  config_utils.validate_config(config)
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir, folder


def _saved_params(workdir):
  return checkpoint.load_params(workdir, ema=False), checkpoint.load_params(workdir, ema=True)


def test_the_encoder_stays_frozen_and_the_unet_trains(clip_run):
  workdir, folder = clip_run
  encoder = clip.load_clip_text(folder)
  params, ema = _saved_params(workdir)
  frozen = params[text_lib.FROZEN_NAME]
  # Bit for bit the folder's weights, in the parameters and in their average.
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.device_get(encoder.params))
  jax.tree.map(np.testing.assert_array_equal, ema[text_lib.FROZEN_NAME], frozen)
  assert set(params) > {text_lib.FROZEN_NAME}
  saved = sample._read_config(workdir)  # pylint: disable=protected-access
  assert saved.model.text.clip_arch  # the run samples without the folder


def test_the_optimizer_keeps_no_moments_for_the_frozen_encoder():
  config = tiny_text_config()
  config.optim.warmup_steps = 0  # a nonzero first learning rate
  params = {'frozen_clip_text': {'w': np.ones((3,), np.float32)},
            'conv': {'w': np.ones((2,), np.float32)}}
  tx = train_state.make_optimizer(config.optim, frozen=True)
  state = tx.init(params)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['frozen_clip_text']['w'], 0.0)
  assert np.all(np.asarray(updates['conv']['w']) != 0.0)
  sizes = [np.size(a) for a in jax.tree.leaves(state)]
  # Adam's two moments of the trained 2-vector (and counts), none of the frozen 3-vector.
  assert sum(s == 3 for s in sizes) == 0 and sum(s == 2 for s in sizes) == 2


def test_prompts_are_tokenized_as_the_clip_tokenizer_does(clip_run):
  workdir, folder = clip_run
  config = sample._read_config(workdir)  # pylint: disable=protected-access
  lines = ['a 3 on the left and a 7 on the right', 'five, then one', '']
  got = prompts.prompt_inputs(config, workdir, lines, None,
                              {'num_samples': 3, 'guidance_scale': 0.0})['tokens']
  want, _ = clip.load_clip_text(folder).tokenize(lines, max_length=16)
  np.testing.assert_array_equal(got, want)
  tokenizer = text_data.load_tokenizer(os.path.join(workdir, 'tokenizer.json'))
  assert tuple(config.model.text.null_tokens) == tuple(want[2])
  assert text_data.null_tokens(tokenizer, 16) == tuple(want[2])


def test_the_run_samples_with_prompts_without_the_folder(clip_run, tmp_path):
  workdir, folder = clip_run
  moved = folder + '.moved'
  os.rename(folder, moved)
  try:
    out = sample.sample_run(workdir, prompts=['3 and 7'], num_samples=2, guidance_scale=2.0,
                            output_dir=str(tmp_path / 'out'), progress=False)
  finally:
    os.rename(moved, folder)
  assert out['images'].shape == (2, 8, 16, 1)
  assert np.all(np.isfinite(out['samples']))


def test_a_bad_clip_folder_is_one_error(tmp_path):
  folder = str(tmp_path / 'clip')
  shutil.copytree(CLIP_DIR, folder)
  os.remove(os.path.join(folder, 'model.safetensors'))
  config = tiny_text_config()
  config.model.text.encoder = 'clip'
  config.model.text.clip_dir = folder
  with pytest.raises(train.TrainError, match='model.safetensors'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(str(tmp_path / 'run'))
