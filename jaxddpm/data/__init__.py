"""Input pipelines -> host-local batches {'x': float32 [B, H, W, C] in [-1, 1], 'cond': {...}}.

  sources.py      the data sets as Grain random-access sources of records (image folders,
                  ArrayRecord folders, tensorflow-datasets; dispatch by data.dataset)
  digits.py       scikit-learn's digits; `ArraySource`, an in-memory set
  digit_pairs.py  two digits side by side with a caption, ten ordered pairs held out
  photos.py       the photographs bundled with scikit-image and scikit-learn
  transforms.py   decode, crop/resize, caption choice and flip as Grain transformations;
                  uint8 -> float
  text.py         the word-level tokenizer of the training captions; captions -> tokens
  pipeline.py     `Pipeline` (the training order, Grain workers, `BatchIterator` with its
                  checkpointable state), `eval_batches`
  prepare.py      `python -m jaxddpm.data.prepare`: an image folder -> ArrayRecord shards
"""

from jaxddpm.data.digit_pairs import DigitPairsSource
from jaxddpm.data.digits import ArraySource
from jaxddpm.data.digits import DIGITS_NUM_TEST
from jaxddpm.data.digits import digits_source
from jaxddpm.data.pipeline import BatchIterator
from jaxddpm.data.pipeline import Pipeline
from jaxddpm.data.pipeline import create_train_pipeline
from jaxddpm.data.pipeline import default_num_workers
from jaxddpm.data.pipeline import eval_batches
from jaxddpm.data.pipeline import examples
from jaxddpm.data.pipeline import stack_batches
from jaxddpm.data.pipeline import text_length
from jaxddpm.data.sources import ArrayRecordSource
from jaxddpm.data.sources import FolderSource
from jaxddpm.data.sources import IMAGE_EXTENSIONS
from jaxddpm.data.sources import TFDSSource
from jaxddpm.data.sources import captions
from jaxddpm.data.sources import create_source
from jaxddpm.data.text import build_word_tokenizer
from jaxddpm.data.text import encode
from jaxddpm.data.text import load_tokenizer
from jaxddpm.data.text import null_tokens
from jaxddpm.data.text import save_tokenizer
from jaxddpm.data.transforms import DatasetError
from jaxddpm.data.transforms import center_crop_resize
from jaxddpm.data.transforms import uint8_to_float
