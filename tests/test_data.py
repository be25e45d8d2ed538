"""Input pipelines: values against independent references, order as a pure function of (seed, step)."""

import os

import grain
import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets

from configs import tiny
from jaxddpm import data


@pytest.fixture(scope='module')
def digits_images():
  return sk_datasets.load_digits()


def _pipeline(source, **kw):
  kw.setdefault('global_batch_size', 64)
  kw.setdefault('seed', 0)
  return data.Pipeline(source, **kw)


def test_digits_values_and_split(digits_images):
  train = data.digits_source('train', 8, 1)
  test = data.digits_source('test', 8, 1)
  assert len(train) == 1500 and len(test) == data.DIGITS_NUM_TEST == 297
  ref = digits_images.images.astype(np.float64) / 8.0 - 1.0  # 0..16 -> [-1, 1]
  np.testing.assert_array_equal(train.images[..., 0], ref[:1500].astype(np.float32))
  np.testing.assert_array_equal(test.images[..., 0], ref[1500:].astype(np.float32))
  np.testing.assert_array_equal(test.labels, digits_images.target[1500:])
  assert train.images.min() == -1.0 and train.images.max() == 1.0


def test_digits_upsampled_bilinear(digits_images):
  src = data.digits_source('train', 16, 1)
  assert src.images.shape == (1500, 16, 16, 1)
  ref = np.asarray(jax.image.resize(
      digits_images.images[:10].astype(np.float32) / 8.0 - 1.0, (10, 16, 16), 'bilinear'))
  np.testing.assert_allclose(src.images[:10, ..., 0], ref, atol=1e-5)
  assert src.images.min() >= -1.0 and src.images.max() <= 1.0


def test_order_is_pure_function_of_seed_and_step():
  src = data.digits_source('train', 8, 1)
  a, b = _pipeline(src), _pipeline(src)
  for step in (0, 7, 23, 500):  # 500 * 64 examples: epoch 21
    np.testing.assert_array_equal(a.batch(step)['x'], b.batch(step)['x'])
  other_seed = _pipeline(src, seed=1)
  assert not np.array_equal(a.global_indices(3), other_seed.global_indices(3))
  # The prefetching iterator, started mid-run, yields exactly batch(step).
  it = a.iterate(11)
  for step in range(11, 20):
    np.testing.assert_array_equal(next(it)['x'], b.batch(step)['x'])
  it.close()


def test_every_epoch_visits_every_example_once():
  src = data.ArraySource(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1))
  p = _pipeline(src, global_batch_size=4)
  stream = np.concatenate([p.global_indices(s) for s in range(5)])  # 20 = two epochs
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:])  # reshuffled each epoch
  # The order is Grain's: a shuffle reseeded with the epoch, then repeat.
  expected = grain.MapDataset.range(10).shuffle(seed=0).repeat()
  np.testing.assert_array_equal(stream, [expected[i] for i in range(20)])
  images = np.concatenate([p.batch(s)['x'][:, 0, 0, 0] for s in range(5)])
  np.testing.assert_array_equal(images, stream.astype(np.float32))


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  """24 PNG/JPEG files of mixed sizes in two class subfolders."""
  root = tmp_path_factory.mktemp('photos')
  rng = np.random.RandomState(0)
  for i in range(24):
    h, w = (10 + i % 5, 8 + 2 * (i % 3))
    image = Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
    sub = root / ('cats' if i % 3 else 'dogs')
    sub.mkdir(exist_ok=True)
    image.save(sub / f'{i:02d}.{"png" if i % 2 else "jpg"}')
  return str(root)


def _pil_reference(path, size):
  """uint8 [size, size, 3]: PIL alone, central square then bicubic resize."""
  with Image.open(path) as im:
    im = im.convert('RGB')
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size),
                                                                           Image.BICUBIC))


def test_folder_batches_match_pil_and_the_8_bit_grid(photo_folder):
  src = data.FolderSource(photo_folder, 6, 3)
  p = _pipeline(src, global_batch_size=8)
  for step in (0, 4):  # 4 * 8 examples: the second epoch
    x = p.batch(step)['x']
    ref = np.stack([_pil_reference(src.files[i], 6) for i in p.global_indices(step)])
    assert x.dtype == np.float32
    np.testing.assert_array_equal(np.round((x.astype(np.float64) + 1) * 127.5), ref)
    np.testing.assert_allclose(x, ref / 127.5 - 1, rtol=0, atol=1e-7)


def test_image_sources_decode_to_uint8_in_grain():
  """What Grain's workers compute and ship for an image source is uint8; float only after."""
  record = {'image': _png_bytes(np.full((5, 7, 3), 200, np.uint8)), 'label': 3}
  decoded = data.transforms.DecodeImage(3).map(record)
  assert decoded['x'].dtype == np.uint8 and decoded['x'].shape == (5, 7, 3)
  cropped = data.transforms.CenterCropResize(4).map(decoded)
  np.testing.assert_array_equal(cropped['x'], np.full((4, 4, 3), 200, np.uint8))
  batch = data.transforms.to_model_batch(
      {'x': np.stack([cropped['x']]), 'label': np.array([3])}, with_labels=True)
  np.testing.assert_array_equal(batch['x'], np.full((1, 4, 4, 3), 200 / 127.5 - 1, np.float32))
  assert batch['cond']['label'].dtype == np.int32


def test_uint8_to_float_is_x_over_127_5_minus_1_in_float32():
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  got = data.uint8_to_float(values)
  assert got.dtype == np.float32
  # Bitwise the float32 expression the pipeline has always used (the behaviour fixture and
  # resumed runs depend on it), and within float32 rounding of the exact value.
  np.testing.assert_array_equal(got, values.astype(np.float32) / np.float32(127.5) - np.float32(1))
  np.testing.assert_allclose(got, values / 127.5 - 1, rtol=0, atol=2**-24)
  assert got[0, 0] == -1 and got[-1, -1] == 1


def _png_bytes(array):
  import io  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG')
  return out.getvalue()


def test_workers_do_not_change_the_batches_or_the_state(photo_folder):
  """0 and 2 Grain worker processes, with decoding, flips and labels, give bitwise the same
  stream, and the same iterator state."""
  src = data.FolderSource(photo_folder, 6, 3, with_labels=True)
  kw = dict(global_batch_size=8, with_labels=True, random_flip=True, process_index=1,
            process_count=2)
  ref = _pipeline(src, num_workers=0, **kw)
  assert next(iter(ref.grain_dataset(0)))['x'].dtype == np.uint8
  it = _pipeline(src, num_workers=2, **kw).iterate(5)
  try:
    for step in range(5, 12):
      got, want = next(it), ref.batch(step)
      np.testing.assert_array_equal(got['x'], want['x'])
      np.testing.assert_array_equal(got['cond']['label'], want['cond']['label'])
    assert it.get_state() == ref.iterate(12).get_state() == {
        'next_step': 12, 'seed': 0, 'num_examples': 24, 'global_batch_size': 8,
        'random_flip': True, 'with_labels': True}
  finally:
    it.close()


def test_iterator_state_moves_the_stream_and_refuses_another_order():
  src = data.digits_source('train', 8, 1)
  p = _pipeline(src)
  it = p.iterate(2)
  next(it)
  state = it.get_state()
  assert state['next_step'] == 3
  other = _pipeline(src).iterate(0)
  other.set_state(state)
  np.testing.assert_array_equal(next(other)['x'], p.batch(3)['x'])
  assert other.get_state()['next_step'] == 4
  with pytest.raises(data.DatasetError, match=r'seed 0 \(saved\) vs 1'):
    _pipeline(src, seed=1).iterate(0).set_state(state)
  with pytest.raises(data.DatasetError, match=r'num_examples 1500 \(saved\) vs 297'):
    _pipeline(data.digits_source('test', 8, 1)).iterate(0).set_state(state)
  it.close()
  other.close()


def test_num_workers_default_fits_the_machine():
  src = data.ArraySource(np.zeros((4, 1, 1, 1), np.float32))
  workers = _pipeline(src, global_batch_size=2, num_workers=-1).num_workers
  assert workers == data.default_num_workers() == max(0, min(4, (os.cpu_count() or 1) - 1))


def test_processes_read_their_slice_of_the_global_batch():
  src = data.digits_source('train', 8, 1)
  whole = _pipeline(src, with_labels=True, random_flip=True).batch(9)
  parts = [_pipeline(src, with_labels=True, random_flip=True, process_index=p,
                     process_count=4).batch(9) for p in range(4)]
  for get in (lambda b: b['x'], lambda b: b['cond']['label']):
    np.testing.assert_array_equal(np.concatenate([get(p) for p in parts]), get(whole))
  with pytest.raises(data.DatasetError, match='divisible'):
    _pipeline(src, global_batch_size=6, process_count=4)


def test_random_flip_mirrors_about_half():
  src = data.digits_source('train', 8, 1)
  plain = _pipeline(src).batch(4)['x']
  flipped = _pipeline(src, random_flip=True).batch(4)['x']
  mirrored = np.array([not np.array_equal(a, b) and np.array_equal(a[:, ::-1], b)
                       for a, b in zip(plain, flipped)])
  same = np.array([np.array_equal(a, b) for a, b in zip(plain, flipped)])
  assert np.all(mirrored | same)
  assert 16 < mirrored.sum() < 48


def test_labels_follow_images(digits_images):
  src = data.digits_source('train', 8, 1)
  p = _pipeline(src, with_labels=True)
  idx = p.global_indices(2)
  np.testing.assert_array_equal(p.batch(2)['cond']['label'], digits_images.target[idx])
  assert _pipeline(src).batch(2)['cond'] == {}


def _example(source, i):
  return data.examples(grain.MapDataset.source(source), source)[i]


def test_folder_center_crop_and_labels(tmp_path):
  rng = np.random.RandomState(0)
  centre = rng.randint(0, 256, (6, 6, 3), np.uint8)
  wide = np.full((6, 10, 3), 255, np.uint8)
  wide[:, 2:8] = centre  # a 6x10 image whose central 6x6 square is `centre`
  _write_png(str(tmp_path / 'cats' / 'a.png'), wide)
  _write_png(str(tmp_path / 'dogs' / 'b.png'), np.full((20, 20, 3), 40, np.uint8))
  (tmp_path / 'notes.txt').write_text('not an image')
  src = data.FolderSource(str(tmp_path), 6, 3, with_labels=True)
  assert len(src) == 2 and src.classes == ['cats', 'dogs']
  with open(tmp_path / 'cats' / 'a.png', 'rb') as f:
    assert src[0] == {'image': f.read(), 'label': 0}  # the record: the file, undecoded
  example = _example(src, 0)
  np.testing.assert_array_equal(example['x'], centre)
  assert example['label'] == 0
  example = _example(src, 1)  # constant image: any resize keeps the value
  np.testing.assert_array_equal(example['x'], np.full((6, 6, 3), 40, np.uint8))
  assert example['label'] == 1
  gray = data.FolderSource(str(tmp_path), 6, 1)
  luma = 0.299 * centre[..., 0] + 0.587 * centre[..., 1] + 0.114 * centre[..., 2]
  np.testing.assert_allclose(_example(gray, 0)['x'][..., 0], luma, atol=1.0)


def test_tfds_mock_cifar10(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    src = data.TFDSSource('cifar10', 'train', 32, 3, data_dir=str(tmp_path), with_labels=True)
    raw = tfds.data_source('cifar10', split='train', data_dir=str(tmp_path))
    assert len(src) == 12
    example = _example(src, 5)
    np.testing.assert_array_equal(example['x'], raw[5]['image'])
    assert example['label'] == int(raw[5]['label'])
    small = data.TFDSSource('cifar10', 'train', 8, 1, data_dir=str(tmp_path))
    assert _example(small, 5)['x'].shape == (8, 8, 1)


@pytest.mark.parametrize('dataset, field, message', [
    ('no_such_dataset_xyz', None, 'Unknown dataset'),
    ('folder', None, 'needs data.data_dir'),
    ('folder', '/nonexistent/images', 'does not exist'),
    ('digits', 'channels', 'grayscale'),
])
def test_bad_sources(dataset, field, message):
  config = tiny.get_config()
  config.data.dataset = dataset
  if field == 'channels':
    config.data.channels = 3
  elif field:
    config.data.data_dir = field
  with pytest.raises(data.DatasetError, match=message):
    data.create_source(config.data, split='train')


def test_empty_folder(tmp_path):
  with pytest.raises(data.DatasetError, match='no .png'):
    data.FolderSource(str(tmp_path), 8, 1)


def test_eval_batches_in_order(digits_images):
  config = tiny.get_config()
  assert next(data.eval_batches(config, batch_size=100, num_examples=250))['cond'] == {}
  config.model.num_classes = 10
  batches = list(data.eval_batches(config, batch_size=100, num_examples=250))
  assert [len(b['x']) for b in batches] == [100, 100, 50]
  np.testing.assert_array_equal(np.concatenate([b['cond']['label'] for b in batches]),
                                digits_images.target[1500:1750])
  x = np.concatenate([b['x'] for b in batches])[..., 0]
  np.testing.assert_array_equal(x, (digits_images.images[1500:1750] / 8.0 - 1.0).astype(np.float32))


def test_eval_batches_of_a_folder_in_file_order(photo_folder):
  config = tiny.get_config()
  config.data.dataset, config.data.data_dir = 'folder', photo_folder
  config.data.image_size, config.data.channels = 6, 3
  src = data.FolderSource(photo_folder, 6, 3)
  x = np.concatenate([b['x'] for b in data.eval_batches(config, batch_size=10)])
  assert len(x) == 24
  ref = np.stack([_pil_reference(f, 6) for f in src.files])
  np.testing.assert_array_equal(np.round((x.astype(np.float64) + 1) * 127.5), ref)
