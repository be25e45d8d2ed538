"""`python -m jaxddpm.data.prepare`: an image folder -> ArrayRecord shards that train like it."""

import hashlib
import json
import os
import subprocess
import sys

from array_record.python import array_record_module
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from jaxddpm import data
from jaxddpm.data import prepare
from jaxddpm.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """21 PNG/JPEG files of mixed sizes and modes in three class subfolders, and a stray file."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.RandomState(1)
  for i in range(21):
    sub = root / ('bird', 'cat', 'dog')[i % 3]
    sub.mkdir(exist_ok=True)
    h, w = 9 + i % 4, 7 + i % 5
    image = Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
    if i % 4 == 0:
      image = image.convert('L')
    image.save(sub / f'{i:03d}.{"jpg" if i % 2 else "png"}')
  (root / 'README.txt').write_text('not an image')
  return str(root)


@pytest.fixture(scope='module')
def converted(folder, tmp_path_factory):
  output = str(tmp_path_factory.mktemp('out') / 'shards')
  metadata = prepare.convert(folder, output, num_shards=3)
  return output, metadata


def test_records_are_the_files_in_the_folder_order(folder, converted):
  output, metadata = converted
  files, classes, labels = sources.list_image_files(folder)
  assert metadata['num_examples'] == 21 and metadata['classes'] == classes == ['bird', 'cat', 'dog']
  with open(os.path.join(output, 'metadata.json')) as f:
    assert json.load(f) == metadata
  assert len(metadata['shards']) == 3
  records = []
  for name in metadata['shards']:  # read back with array_record itself, not through Grain
    reader = array_record_module.ArrayRecordReader(os.path.join(output, name))
    records += reader.read_all()
    reader.close()
  assert len(records) == 21
  for path, label, record in zip(files, labels, records):
    with open(path, 'rb') as f:
      assert record == int(label).to_bytes(8, 'little') + f.read()


@pytest.mark.parametrize('num_classes', [0, 3])
def test_training_batches_equal_the_folders(folder, converted, num_classes):
  config = tiny.get_config()
  config.data.image_size, config.data.channels, config.data.random_flip = 8, 3, True
  config.model.num_classes = num_classes
  config.training.batch_size = 8
  config.data.dataset, config.data.data_dir = 'folder', folder
  from_folder = [data.create_train_pipeline(config, process_index=p, process_count=2)
                 for p in range(2)]
  config.data.dataset, config.data.data_dir = 'array_record', converted[0]
  from_shards = [data.create_train_pipeline(config, process_index=p, process_count=2)
                 for p in range(2)]
  assert isinstance(from_shards[0].source, data.ArrayRecordSource)
  for step in (0, 1, 2, 5):  # 5 * 8 examples: the second epoch
    for a, b in zip(from_folder, from_shards):
      want, got = a.batch(step), b.batch(step)
      np.testing.assert_array_equal(got['x'], want['x'])
      assert got['cond'].keys() == want['cond'].keys() == ({'label'} if num_classes else set())
      if num_classes:
        np.testing.assert_array_equal(got['cond']['label'], want['cond']['label'])
  config.data.dataset, config.data.data_dir = 'folder', folder
  want = list(data.eval_batches(config, batch_size=5))
  config.data.dataset, config.data.data_dir = 'array_record', converted[0]
  got = list(data.eval_batches(config, batch_size=5))
  assert len(got) == len(want) == 5
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g['x'], w['x'])


def test_a_folder_that_is_not_converted_is_one_error(tmp_path):
  config = tiny.get_config()
  config.data.dataset, config.data.data_dir = 'array_record', str(tmp_path)
  with pytest.raises(data.DatasetError, match='no metadata.json'):
    data.create_source(config.data, split='train')


def _digest(directory):
  h = hashlib.sha256()
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      with open(os.path.join(root, name), 'rb') as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'jaxddpm.data.prepare', *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=120)


def test_cli_converts_and_refuses_bad_input_in_one_line(folder, tmp_path):
  out = tmp_path / 'ok'
  proc = _cli(f'--folder={folder}', f'--output={out}')
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ['images.array_record-00000-of-00001', 'metadata.json']
  before = _digest(out)
  empty = tmp_path / 'empty'
  empty.mkdir()
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'a.png').write_bytes(b'not a png')
  for args, message in [
      ((f'--folder={folder}', f'--output={out}'), 'is not empty; nothing was written'),
      ((f'--folder={tmp_path / "missing"}', f'--output={tmp_path / "o1"}'), 'does not exist'),
      ((f'--folder={empty}', f'--output={tmp_path / "o2"}'), 'holds no .png/.jpg/.jpeg files'),
      ((f'--folder={broken}', f'--output={tmp_path / "o3"}'), 'a.png is not a readable image'),
      ((f'--output={tmp_path / "o4"}',), 'Flag --folder must have a value'),
  ]:
    proc = _cli(*args)
    assert proc.returncode == 1, (args, proc.stderr)
    errors = [l for l in proc.stderr.splitlines() if 'error:' in l]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert 'Traceback' not in proc.stderr
  assert _digest(out) == before  # the user's folder is untouched
  # A failed conversion leaves nothing behind, not even its temporary folder.
  assert sorted(os.listdir(tmp_path)) == ['broken', 'empty', 'ok']
