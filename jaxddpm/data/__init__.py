"""Input pipelines -> host-local batches {'x': float32 [B, S, S, C] in [-1, 1], 'cond': {...}}.

  sources.py     the data sets as Grain random-access sources of records (digits, image
                 folders, ArrayRecord folders, tensorflow-datasets)
  transforms.py  decode, crop/resize and flip as Grain transformations; uint8 -> float
  pipeline.py    `Pipeline` (the training order, Grain workers, `BatchIterator` with its
                 checkpointable state), `eval_batches`
  prepare.py     `python -m jaxddpm.data.prepare`: an image folder -> ArrayRecord shards
"""

from jaxddpm.data.pipeline import BatchIterator
from jaxddpm.data.pipeline import Pipeline
from jaxddpm.data.pipeline import create_train_pipeline
from jaxddpm.data.pipeline import default_num_workers
from jaxddpm.data.pipeline import eval_batches
from jaxddpm.data.pipeline import examples
from jaxddpm.data.pipeline import stack_batches
from jaxddpm.data.sources import ArrayRecordSource
from jaxddpm.data.sources import ArraySource
from jaxddpm.data.sources import DIGITS_NUM_TEST
from jaxddpm.data.sources import FolderSource
from jaxddpm.data.sources import IMAGE_EXTENSIONS
from jaxddpm.data.sources import TFDSSource
from jaxddpm.data.sources import create_source
from jaxddpm.data.sources import digits_source
from jaxddpm.data.transforms import DatasetError
from jaxddpm.data.transforms import center_crop_resize
from jaxddpm.data.transforms import uint8_to_float
