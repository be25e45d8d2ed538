"""A text-to-image run end to end on tiny digit_pairs: tokenizer, training, resume, prompts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digit_pairs
from jaxddpm import config_utils
from jaxddpm import data as data_lib
from jaxddpm import sample
from jaxddpm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_text_config():
  config = digit_pairs.get_config()
  config.data.image_size = 8
  config.data.image_width = 16
  config.data.num_workers = 0
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.num_head_channels = 0
  config.model.norm_groups = 4
  config.model.text.width = 16
  config.model.text.num_layers = 1
  config.model.text.num_heads = 2
  config.diffusion.num_timesteps = 100
  config.optim.warmup_steps = 2
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.sampling.num_steps = 5
  config.sampling.batch_size = 8
  return config


@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('text') / 'run')
  config = tiny_text_config()
  config_utils.validate_config(config)
  config.training.num_train_steps = 2
  train.train_and_evaluate(config, workdir)
  config.training.num_train_steps = 4  # resumed: the saved tokenizer, the same config
  summary = train.train_and_evaluate(config, workdir)
  assert summary['trained_steps'] == 2 and summary['step'] == 4
  return workdir


def test_the_run_keeps_its_tokenizer_and_its_size_in_the_config(text_run):
  tokenizer = data_lib.load_tokenizer(os.path.join(text_run, 'tokenizer.json'))
  saved = sample._read_config(text_run)  # pylint: disable=protected-access
  assert saved.model.text.vocab_size == tokenizer.get_vocab_size()
  assert tuple(saved.model.text.null_tokens) == data_lib.null_tokens(tokenizer, 16)
  assert tuple(saved.model.text.null_tokens) == tuple(data_lib.encode(tokenizer, [''], 16)[0])


def test_prompts_are_sampled_and_stored(text_run, tmp_path):
  lines = ['a 3 on the left and a 7 on the right', 'five, then one', '']
  out = sample.sample_run(text_run, prompts=lines, num_samples=3, guidance_scale=2.0,
                          output_dir=str(tmp_path / 'out'), progress=False)
  with np.load(os.path.join(out['output_dir'], 'samples.npz')) as f:
    assert list(f['prompts']) == lines
    assert f['images'].shape == (3, 8, 16, 1)
  # One prompt for all; a negative prompt changes the guided samples.
  kw = dict(num_samples=2, guidance_scale=2.0, progress=False, seed=1)
  plain = sample.sample_run(text_run, prompts=['3 and 7'], output_dir=str(tmp_path / 'a'), **kw)
  negative = sample.sample_run(text_run, prompts=['3 and 7'], negative_prompt='7 and 3',
                               output_dir=str(tmp_path / 'b'), **kw)
  assert not np.array_equal(plain['samples'], negative['samples'])


def test_bad_prompts_are_one_error(text_run, tmp_path):
  with pytest.raises(sample.SampleError, match='2 prompts for 3 samples'):
    sample.sample_run(text_run, prompts=['a', 'b'], num_samples=3, progress=False,
                      output_dir=str(tmp_path / 'x'))
  with pytest.raises(sample.SampleError, match='negative prompt'):
    sample.sample_run(text_run, prompts=['a'], negative_prompt='b', num_samples=1,
                      guidance_scale=0.0, progress=False, output_dir=str(tmp_path / 'y'))


def test_cli_prompts_file_and_its_errors(text_run, tmp_path):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('a 1 on the left and a 2 on the right\n9 to the right of 8\n')
  run = lambda *args: subprocess.run(
      [sys.executable, 'run_sample.py', f'--workdir={text_run}', '--steps=3', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  ok = run(f'--prompts_file={prompts_file}', '--guidance_scale=1',
           f'--output_dir={tmp_path / "cli"}')
  assert ok.returncode == 0, ok.stderr
  with np.load(tmp_path / 'cli' / 'samples.npz') as f:
    assert len(f['images']) == 2 and f['prompts'][1] == '9 to the right of 8'
  bad = run(f'--prompts_file={tmp_path / "missing.txt"}')
  assert bad.returncode == 1 and 'cannot read the prompts file' in bad.stderr
  assert 'Traceback' not in bad.stderr
