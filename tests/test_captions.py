"""Captioned data: digit_pairs, folder and COCO captions, the word tokenizer, token batches."""

import json
import pickle
import re

import grain
import numpy as np
from PIL import Image
import pytest
import tokenizers

from configs import tiny
from jaxddpm import data
from jaxddpm.data import digit_pairs
from jaxddpm.data import text
from jaxddpm.evaluation import digit_pairs as pair_eval

WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
# Each template read back independently: (regex, whether group 1 is the right digit).
PATTERNS = [
    (r'(an?) (\w+) on the left and (an?) (\w+) on the right', False),
    (r'(\w+) to the right of (\w+)', True),
    (r'(\w+) to the left of (\w+)', False),
    (r'(\w+), then (\w+)', False),
    (r'(\w+) and (\w+)', False),
]


def _digit(word):
  return int(word) if word.isdigit() else WORDS.index(word)


def _parse(caption):
  """((left, right) named by a digit_pairs caption, the PATTERNS index); checks articles."""
  for index, (pattern, right_first) in enumerate(PATTERNS):
    match = re.fullmatch(pattern, caption)
    if match:
      groups = match.groups()
      if len(groups) == 4:
        for article, word in (groups[:2], groups[2:]):
          assert article == ('an' if _digit(word) == 8 else 'a'), caption
        groups = groups[1], groups[3]
      a, b = (_digit(g) for g in groups)
      return ((b, a) if right_first else (a, b)), index
  raise AssertionError(f'no template reads {caption!r}')


@pytest.fixture(scope='module')
def train():
  return digit_pairs.digit_pairs_source('train', 16, 32, 1)


@pytest.fixture(scope='module')
def test_split():
  return digit_pairs.digit_pairs_source('test', 16, 32, 1)


@pytest.fixture(scope='module')
def tokenizer(train):
  return text.build_word_tokenizer(data.captions(train))


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# --- digit_pairs --------------------------------------------------------------------------


def test_elements_are_pure_functions_of_split_and_index(train):
  again = digit_pairs.digit_pairs_source('train', 16, 32, 1)
  assert len(train) == 90 * digit_pairs.TRAIN_CANVASES_PER_PAIR == 18000
  for i in (0, 17, 9999, 17999):
    _same(train[i], train[i])
    _same(train[i], again[i])
  e = train[123]
  assert e['x'].shape == (16, 32, 1) and e['x'].dtype == np.float32
  assert (e['left'], e['right']) == train.pair(123)
  assert e['label'] == 10 * e['left'] + e['right'] and isinstance(e['text'], str)
  assert not np.array_equal(train[0]['x'], train[90]['x'])  # same pair, other canvas


def test_halves_are_the_digits_images_and_the_splits_are_disjoint(train, test_split):
  for split, source, n in (('train', train, 400), ('test', test_split, 400)):
    digits = data.digits_source(split, 16, 1)
    for i in range(0, len(source), len(source) // n):
      a, b = source.image_indices(i)
      e = source[i]
      np.testing.assert_array_equal(e['x'][:, :16], digits.images[a])
      np.testing.assert_array_equal(e['x'][:, 16:], digits.images[b])
      assert (digits.labels[a], digits.labels[b]) == (e['left'], e['right'])
  # Train canvases are made of train images only, test canvases of test images only, and
  # no 8x8 digit is in both splits.
  np.testing.assert_array_equal(train.images, data.digits_source('train', 16, 1).images)
  np.testing.assert_array_equal(test_split.images, data.digits_source('test', 16, 1).images)
  train_bytes = {im.tobytes() for im in train.images}
  assert not train_bytes & {im.tobytes() for im in test_split.images}


def test_unseen_pairs_are_held_out_of_training_only(train, test_split):
  unseen = set(digit_pairs.UNSEEN_PAIRS)
  assert len(unseen) == 10
  assert sorted(l for l, _ in unseen) == sorted(r for _, r in unseen) == list(range(10))
  train_pairs = {train.pair(i) for i in range(len(train))}
  assert not train_pairs & unseen and len(train_pairs) == 90
  assert train_pairs == set(digit_pairs.SEEN_PAIRS)
  test_pairs = [test_split.pair(i) for i in range(len(test_split))]
  assert set(test_pairs) == set(digit_pairs.PAIRS) and len(set(test_pairs)) == 100
  assert all(test_pairs.count(p) == digit_pairs.TEST_CANVASES_PER_PAIR for p in unseen)
  e = test_split[test_pairs.index((7, 0))]
  assert (e['left'], e['right']) == (7, 0)


def test_every_caption_names_its_digits_in_order(train):
  forms = set()
  for i in range(len(train)):
    e = train[i]
    pair, template = _parse(e['text'])
    assert pair == (e['left'], e['right']), e['text']
    forms.add((template, any(c.isdigit() for c in e['text'])))
  # Every template, in numerals and in words.
  assert forms == {(t, n) for t in range(len(digit_pairs.TEMPLATES)) for n in (True, False)}
  assert digit_pairs.caption(3, 7) == 'a 3 on the left and a 7 on the right'
  assert digit_pairs.caption(8, 7, 1, words=True) == 'seven to the right of eight'
  assert digit_pairs.caption(3, 8, 0, words=True) == 'a three on the left and an eight on the right'
  everything = data.captions(train)
  assert len(everything) == 90 * len(digit_pairs.TEMPLATES) * 2
  assert {train[i]['text'] for i in range(0, len(train), 7)} <= set(everything)
  assert all(_parse(c)[0] in digit_pairs.SEEN_PAIRS for c in everything)


def test_shapes_are_checked():
  with pytest.raises(data.DatasetError, match='image_width must be'):
    digit_pairs.digit_pairs_source('train', 16, 0, 1)
  config = tiny.get_config()
  config.data.image_width = 16
  with pytest.raises(data.DatasetError, match='only digit_pairs images are not square'):
    data.create_source(config.data, split='train')
  config.data.dataset, config.data.image_size, config.data.image_width = 'digit_pairs', 8, 16
  assert data.create_source(config.data, split='test')[0]['x'].shape == (8, 16, 1)


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trip_null_unknown_and_truncation(tokenizer, tmp_path):
  assert [tokenizer.token_to_id(t) for t in text.SPECIAL_TOKENS] == [0, 1, 2, 3]
  ids = data.encode(tokenizer, ['Three, then 7', '7 to the left of 3'], 10)
  assert ids.dtype == np.int32 and ids.shape == (2, 10)
  assert [tokenizer.id_to_token(int(i)) for i in ids[0]] == (
      ['[BOS]', 'three', ',', 'then', '7', '[EOS]'] + ['[PAD]'] * 4)
  assert tokenizer.decode(ids[1].tolist()) == '7 to the left of 3'
  null = data.null_tokens(tokenizer, 6)
  assert null == (2, 3, 0, 0, 0, 0) == tuple(data.encode(tokenizer, [''], 6)[0])
  np.testing.assert_array_equal(data.encode(tokenizer, ['a zebra 7'], 5)[0],
                                [2, tokenizer.token_to_id('a'), 1, tokenizer.token_to_id('7'), 3])
  long = data.encode(tokenizer, ['a 3 on the left and a 7 on the right'], 5)[0]
  assert [tokenizer.id_to_token(int(i)) for i in long] == ['[BOS]', 'a', '3', 'on', '[EOS]']
  path = str(tmp_path / 'run' / text.TOKENIZER_FILE)
  data.save_tokenizer(tokenizer, path)
  loaded = data.load_tokenizer(str(tmp_path / 'run'))
  assert loaded.get_vocab() == tokenizer.get_vocab()
  np.testing.assert_array_equal(data.encode(loaded, ['3 and 7', ''], 8),
                                data.encode(tokenizer, ['3 and 7', ''], 8))
  with pytest.raises(data.DatasetError, match='No tokenizer'):
    data.load_tokenizer(str(tmp_path / 'missing.json'))


def test_encode_ignores_a_tokenizer_s_own_padding(tokenizer):
  """A pretrained tokenizer.json (CLIP's) may pad to its own length: same ids, same pad."""
  padded = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  padded.enable_padding(length=20, pad_id=0, pad_token='[PAD]')
  texts = ['3 and 7', 'seven to the right of three', '']
  np.testing.assert_array_equal(data.encode(padded, texts, 12), data.encode(tokenizer, texts, 12))


def test_vocabulary_does_not_depend_on_caption_order(train):
  captions = data.captions(train)
  assert (text.build_word_tokenizer(captions).get_vocab()
          == text.build_word_tokenizer(captions[::-1]).get_vocab())


def test_tokenize_map_pickles_for_grain_workers(tokenizer):
  tokenize = pickle.loads(pickle.dumps(text.Tokenize(tokenizer, 8)))
  out = tokenize.map({'text': '3 and 7', 'x': np.zeros(2)})
  assert set(out) == {'x', 'tokens'} and out['tokens'].dtype == np.int32
  np.testing.assert_array_equal(out['tokens'], data.encode(tokenizer, ['3 and 7'], 8)[0])


# --- pipeline -----------------------------------------------------------------------------


def test_pipeline_batches_of_tokens_are_a_pure_function_of_seed_and_step(train, tokenizer):
  kw = dict(global_batch_size=8, seed=0, tokenizer=tokenizer, max_text_length=16)
  a, b = data.Pipeline(train, **kw), data.Pipeline(train, **kw)
  batch = a.batch(3)
  assert set(batch) == {'x', 'cond'} and set(batch['cond']) == {'tokens'}
  assert batch['x'].shape == (8, 16, 32, 1) and batch['x'].dtype == np.float32
  assert batch['cond']['tokens'].shape == (8, 16) and batch['cond']['tokens'].dtype == np.int32
  idx = a.global_indices(3)
  np.testing.assert_array_equal(batch['x'], np.stack([train[i]['x'] for i in idx]))
  np.testing.assert_array_equal(
      batch['cond']['tokens'], data.encode(tokenizer, [train[i]['text'] for i in idx], 16))
  for step in (3, 2500):  # 2500 * 8 examples: the second epoch
    _same(a.batch(step)['cond'], b.batch(step)['cond'])
    np.testing.assert_array_equal(a.batch(step)['x'], b.batch(step)['x'])
  labelled = data.Pipeline(train, with_labels=True, **kw).batch(3)['cond']
  np.testing.assert_array_equal(labelled['label'], [10 * train.pair(i)[0] + train.pair(i)[1]
                                                    for i in idx])
  assert a.iterate(0).get_state()['max_text_length'] == 16
  with pytest.raises(data.DatasetError, match='has no captions'):
    data.Pipeline(data.digits_source('train', 8, 1), **kw)


def test_config_pipelines_with_a_tokenizer(tokenizer):
  config = tiny.get_config()
  config.data.dataset, config.data.image_size, config.data.image_width = 'digit_pairs', 16, 32
  config.data.random_flip = False
  config.data.num_workers = 0
  source = data.create_source(config.data, split='train')
  batch = data.create_train_pipeline(config, tokenizer=tokenizer).batch(0)
  assert batch['cond']['tokens'].shape == (16, 16)  # the default data.max_text_length
  config.data.max_text_length = 12
  tokens = data.create_train_pipeline(config, tokenizer=tokenizer).batch(0)['cond']['tokens']
  assert tokens.shape == (16, 12)
  assert len(data.captions(source)) == 900
  evals = list(data.eval_batches(config, batch_size=64, num_examples=100, tokenizer=tokenizer))
  assert [len(b['x']) for b in evals] == [64, 36]
  test_split = data.create_source(config.data, split='test')
  np.testing.assert_array_equal(
      np.concatenate([b['cond']['tokens'] for b in evals]),
      data.encode(tokenizer, [test_split[i]['text'] for i in range(100)], 12))
  assert next(data.eval_batches(config, batch_size=4))['cond'] == {}  # no tokenizer: no tokens


# --- image folders with metadata.jsonl ----------------------------------------------------


def _write_folder(root, captions):
  """Four 6x6 PNGs, two in a subfolder; `captions` {relative path: text} go into
  metadata.jsonl files beside the images they name (the subfolder has its own)."""
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.png', 'sub/c.png', 'sub/d.png'):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / name)
  for folder in ('', 'sub'):
    lines = [json.dumps({'file_name': k[len(folder) + 1:] if folder else k, 'text': v})
             for k, v in captions.items() if k.startswith('sub/') == bool(folder)]
    if lines:
      (root / folder / 'metadata.jsonl').write_text('\n'.join(lines) + '\n')


CAPTIONS = {'a.png': 'a red square', 'b.png': 'Two cats!', 'sub/c.png': 'a dog',
            'sub/d.png': 'noise'}


def test_folder_captions_from_metadata_jsonl(tmp_path, tokenizer):
  _write_folder(tmp_path, CAPTIONS)
  source = data.FolderSource(str(tmp_path), 4, 3)
  assert source.captioned and data.captions(source) == list(CAPTIONS.values())
  element = data.examples(grain.MapDataset.source(source), source)[1]
  assert element['text'] == 'Two cats!' and element['x'].shape == (4, 4, 3)
  words = text.build_word_tokenizer(data.captions(source))
  batch = data.Pipeline(source, global_batch_size=2, seed=0, tokenizer=words,
                        max_text_length=5).batch(1)
  idx = data.Pipeline(source, global_batch_size=2, seed=0).global_indices(1)
  np.testing.assert_array_equal(batch['cond']['tokens'],
                                data.encode(words, [source.texts[i] for i in idx], 5))


def test_folder_caption_errors(tmp_path):
  missing = tmp_path / 'missing'
  _write_folder(missing, {k: v for k, v in CAPTIONS.items() if k != 'sub/d.png'})
  with pytest.raises(data.DatasetError, match=r"Image '.*sub/d\.png' has no caption"):
    data.FolderSource(str(missing), 4, 3)
  stray = tmp_path / 'stray'
  _write_folder(stray, dict(CAPTIONS, **{'sub/e.png': 'not here'}))
  with pytest.raises(data.DatasetError, match=r"captions '.*sub/e\.png', which is not an image"):
    data.FolderSource(str(stray), 4, 3)
  bad = tmp_path / 'bad'
  _write_folder(bad, CAPTIONS)
  (bad / 'metadata.jsonl').write_text('{"file_name": "a.png"}\n')
  with pytest.raises(data.DatasetError, match='line 1 is not a JSON object'):
    data.FolderSource(str(bad), 4, 3)
  plain = tmp_path / 'plain'
  _write_folder(plain, {})
  assert not data.FolderSource(str(plain), 4, 3).captioned


# --- tensorflow-datasets coco_captions ----------------------------------------------------


def _fake_coco(calls):
  """`builder.as_data_source` of a 6-image coco_captions: 5 to 7 captions an image, as
  UTF-8 bytes like tfds's strings; with decoders (skipped image decoding), images as bytes."""
  def as_data_source(self, split, decoders=None, **kwargs):
    del self, kwargs
    calls.append((split, decoders))
    rng = np.random.default_rng(0)
    return [{'image': b'jpeg bytes' if decoders else rng.integers(0, 256, (9, 12, 3), np.uint8),
             'image/id': np.int64(i),
             'captions': {'id': np.arange(5 + i % 3),
                          'text': np.array([f'photo {i} with {WORDS[k]} cats'.encode()
                                            for k in range(5 + i % 3)], object)}}
            for i in range(6)]
  return as_data_source


def test_mock_coco_captions_draw_a_caption_per_epoch(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []
  with tfds.testing.mock_data(data_dir=str(tmp_path), as_data_source_fn=_fake_coco(calls)):
    source = data.TFDSSource('coco_captions', 'train', 8, 3, data_dir=str(tmp_path))
    per_image = [[f'photo {i} with {WORDS[k]} cats' for k in range(5 + i % 3)] for i in range(6)]
    assert source.captioned and data.captions(source) == sum(per_image, [])
    assert calls[-1][0] == 'train' and 'image' in calls[-1][1]  # captions skip the images
    tokenizer = text.build_word_tokenizer(data.captions(source))
  kw = dict(global_batch_size=6, seed=0)
  p = data.Pipeline(source, **kw)
  stream = data.examples(p._order(grain.MapDataset.source(source)), source, seed=0)
  chosen = {}  # image -> its caption in each of 8 epochs
  for position in range(48):
    element = stream[position]
    image = int(p.global_indices(position // 6)[position % 6])
    assert element['text'] in per_image[image] and element['x'].shape == (8, 8, 3)
    assert 'captions' not in element
    chosen.setdefault(image, []).append(element['text'])
  assert all(len(set(c)) > 1 for c in chosen.values())  # each epoch draws afresh
  a = data.Pipeline(source, tokenizer=tokenizer, max_text_length=8, **kw)
  b = data.Pipeline(source, tokenizer=tokenizer, max_text_length=8, **kw)
  for step in (0, 5):
    np.testing.assert_array_equal(a.batch(step)['cond']['tokens'],
                                  b.batch(step)['cond']['tokens'])
    texts = [stream[step * 6 + k]['text'] for k in range(6)]
    np.testing.assert_array_equal(a.batch(step)['cond']['tokens'],
                                  data.encode(tokenizer, texts, 8))
  assert not np.array_equal(a.batch(0)['cond']['tokens'],
                            data.Pipeline(source, tokenizer=tokenizer, max_text_length=8,
                                          global_batch_size=6, seed=1).batch(0)['cond']['tokens'])


# --- pair accuracy ------------------------------------------------------------------------


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  from jaxddpm.digits_classifier import DigitsExtractor  # pylint: disable=g-import-not-at-top
  return DigitsExtractor.load_or_train(tmp_path_factory.mktemp('cnn') / 'cnn.npz', image_size=16)


def test_pair_accuracy_of_real_and_swapped_canvases(test_split, classifier):
  x = np.stack([test_split[i]['x'] for i in range(len(test_split))])
  left, right = np.array([test_split.pair(i) for i in range(len(test_split))]).T
  real = pair_eval.pair_accuracy(x, left, right, classifier)
  assert real['both'] >= 0.9 and real['left'] >= 0.9 and real['right'] >= 0.9
  from jaxddpm import images as images_lib  # pylint: disable=g-import-not-at-top
  as_uint8 = pair_eval.pair_accuracy(images_lib.to_uint8(x), left, right, classifier)
  assert abs(as_uint8['both'] - real['both']) < 0.02
  swapped = np.concatenate([x[:, :, 16:], x[:, :, :16]], axis=2)
  distinct = left != right
  got = pair_eval.pair_accuracy(swapped[distinct], left[distinct], right[distinct], classifier)
  assert got['both'] < 0.05
  with pytest.raises(ValueError, match=r'\[N, H, 2H, 1\]'):
    pair_eval.pair_accuracy(x[:, :, :16], left, right, classifier)
