"""The README's Python example runs as written (on a tiny run instead of runs/digits)."""

import os
import re

import numpy as np
from PIL import Image

from configs import tiny

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _python_example() -> str:
  text = open(README).read()
  block = re.search(r'From Python:\n\n```python\n(.*?)```', text, re.S)
  assert block, 'the README lost its Python example'
  return block.group(1)


def test_python_example_runs(tmp_path, make_sample_workdir, monkeypatch):
  (tmp_path / 'run').mkdir()
  workdir = make_sample_workdir(tmp_path / 'run', tiny.get_config())
  code = _python_example()
  assert "'runs/digits'" in code
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code.replace("'runs/digits'", repr(workdir)), 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  images = namespace['images']
  assert images.dtype == np.uint8 and images.shape == (16, 8, 8, 1)
  assert len(np.unique(images)) > 16  # real samples, not a constant image
  grid = np.asarray(Image.open(tmp_path / 'digits.png'))
  assert grid.shape == (4 * 10 + 2, 4 * 10 + 2)  # 4 x 4 cells of 8 + 2 padding
  assert namespace['config'].data.image_size == 8
  assert callable(namespace['model_fn'])


def test_run_sample_equals_run_sample_cli_loop(tmp_path, make_sample_workdir):
  # run.sample and sample_run are one loop: same seed and settings, same images.
  import jaxddpm  # pylint: disable=g-import-not-at-top
  from jaxddpm import sample  # pylint: disable=g-import-not-at-top
  (tmp_path / 'run').mkdir()
  workdir = make_sample_workdir(tmp_path / 'run', tiny.get_config())
  images = jaxddpm.load_run(workdir).sample(6, solver='ddpm', steps=8, seed=1, batch_size=4)
  result = sample.sample_run(workdir, sampler='ddpm', steps=8, num_samples=6, batch_size=4,
                             seed=1, output_dir=str(tmp_path / 'out'), progress=False)
  np.testing.assert_array_equal(images, result['images'])
