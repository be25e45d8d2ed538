"""The default install: no TensorFlow, and what works without it."""

import configparser
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter in which importing TensorFlow fails, as after `pip install -e .`.
_WITHOUT_TENSORFLOW = r'''
import importlib.abc, sys

class _NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'No module named {name!r} (blocked by the test)')
    return None

sys.meta_path.insert(0, _NoTensorFlow())
sys.path.insert(0, sys.argv[1])
from configs import digits
from jaxddpm import data, evaluation, sample, train  # noqa: F401
config = digits.get_config()
pipeline = data.create_train_pipeline(config)
batch = pipeline.batch(0)
print('digits', len(pipeline.source), batch['x'].shape)
config.data.dataset = 'cifar10'
try:
  data.create_train_pipeline(config)
except data.DatasetError as e:
  print('tfds error:', e)
print('tensorflow imported:', any(m.split('.')[0] == 'tensorflow' for m in sys.modules))
'''


def test_default_install_requires_no_tensorflow():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, 'setup.cfg'))
  requires = parser['options']['install_requires'].split()
  # tensorboardX writes the event files; it needs neither TensorFlow nor TensorBoard.
  names = [r.split('>')[0].split('=')[0] for r in requires]
  assert 'tensorboardX' in names
  assert not [n for n in names if n.startswith('tensorflow') or n == 'tensorboard'], names
  extras = parser['options.extras_require']
  assert 'tensorflow-datasets' in extras['tfds'] and 'tensorflow-cpu' in extras['tfds']


def test_digits_without_tensorflow_and_a_clear_message_for_tfds_names():
  proc = subprocess.run([sys.executable, '-c', _WITHOUT_TENSORFLOW, REPO], capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == 'digits 1500 (64, 16, 16, 1)', proc.stdout
  assert lines[1].startswith("tfds error: data.dataset = 'cifar10' is read with "
                             'tensorflow-datasets, which is not installed')
  assert "pip install -e '.[tfds]'" in lines[1]
  assert lines[2] == 'tensorflow imported: False'
