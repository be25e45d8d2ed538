r"""An image folder -> a few ArrayRecord shards that train exactly like the folder.

  python -m jaxddpm.data.prepare --folder=images/ --output=images_ar/ [--num_shards=N]

then train with `--config.data.dataset=array_record --config.data.data_dir=images_ar/`.

The folder is read as `data.dataset = 'folder'` reads it (`sources.list_image_files`:
PNG/JPEG files sorted, the index of each file's subfolder among the sorted subfolders is its
label), and record i of the shards is file i: its bytes unchanged (no re-encoding) after its
label (`sources.encode_record`). `metadata.json` names the format, the number of examples, the
classes and the shards. The same transformations decode the records, so the training and
evaluation batches equal the folder's, read sequentially from a few large files instead of
millions of small ones.

The output must not exist or be an empty folder: the shards are written into a temporary
folder beside it, which is renamed to the output only when complete. Any mistake (no such
folder, no images, an output that holds files, an unreadable image) is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
from PIL import Image

from jaxddpm import config_cli
from jaxddpm.data import sources
from jaxddpm.data.transforms import DatasetError

# Aim for shards of about this size: large sequential reads, a handful of files per set.
SHARD_BYTES = 1 << 30
# One record per chunk, as tensorflow-datasets writes ArrayRecord, so reading record i by
# index decodes nothing else.
_WRITER_OPTIONS = 'group_size:1'


def _check_output(output: str) -> None:
  if not output:
    raise DatasetError('--output is empty; name the folder to write.')
  if os.path.exists(output) and not os.path.isdir(output):
    raise DatasetError(f'--output {output!r} is a file; name a new or empty folder.')
  if os.path.isdir(output) and os.listdir(output):
    raise DatasetError(
        f'--output {output!r} is not empty; nothing was written. Name a new or empty folder.')


def _read_image(path: str) -> bytes:
  """The file's bytes, after PIL has checked that they are an image."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
    raise DatasetError(f'{path} is not a readable image ({type(e).__name__}: {e}).') from e
  return data


def _shard_bounds(sizes: list[int], num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) file ranges of `num_shards` shards (0: one per SHARD_BYTES), in order."""
  if num_shards <= 0:
    num_shards = -(-sum(sizes) // SHARD_BYTES)
  num_shards = max(1, min(num_shards, len(sizes)))
  edges = [len(sizes) * k // num_shards for k in range(num_shards + 1)]
  return list(zip(edges[:-1], edges[1:]))


def _write_shards(directory: str, files: list[str], labels, num_shards: int) -> list[str]:
  bounds = _shard_bounds([os.path.getsize(f) for f in files], num_shards)
  names = []
  for k, (start, stop) in enumerate(bounds):
    name = f'images.array_record-{k:05d}-of-{len(bounds):05d}'
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name),
                                                   _WRITER_OPTIONS)
    try:
      for i in range(start, stop):
        writer.write(sources.encode_record(_read_image(files[i]), int(labels[i])))
    finally:
      writer.close()
    names.append(name)
    logging.info('Wrote %s: images %d to %d of %d.', name, start, stop - 1, len(files))
  return names


def convert(folder: str, output: str, *, num_shards: int = 0) -> dict[str, Any]:
  """Writes the images of `folder` into ArrayRecord shards + metadata.json under `output`.

  Returns the metadata: {'format', 'num_examples', 'classes', 'shards', 'record', 'folder'}.

  Raises:
    DatasetError: `folder` is missing or holds no images, `output` exists and is not an
      empty folder, or a file is not a readable image. Nothing is left under `output` then.
  """
  if not folder:
    raise DatasetError('--folder is empty; name the image folder to convert.')
  files, classes, labels = sources.list_image_files(folder)
  _check_output(output)
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=os.path.dirname(output))
  try:
    metadata = {
        'format': sources.RECORD_FORMAT,
        'record': 'int64 little-endian label, then the image file bytes',
        'folder': os.path.abspath(folder),
        'num_examples': len(files),
        'classes': classes,
        'shards': _write_shards(tmp, files, labels, num_shards),
    }
    with open(os.path.join(tmp, sources.METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    _check_output(output)  # nobody wrote there meanwhile
    if os.path.isdir(output):
      os.rmdir(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return metadata


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  folder, output = flags.FLAGS.folder, flags.FLAGS.output
  try:
    metadata = convert(folder, output, num_shards=flags.FLAGS.num_shards)
  except (DatasetError, OSError) as e:
    print(f'prepare.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'Wrote {metadata["num_examples"]} images ({len(metadata["classes"])} classes) into '
        f'{len(metadata["shards"])} shards in {output}; train with '
        f'data.dataset=array_record data.data_dir={output}')


if __name__ == '__main__':
  # Defined here, not at import, so importing this module next to other CLIs adds no flags.
  flags.DEFINE_string('folder', None, 'The image folder (class subfolders -> labels).')
  flags.DEFINE_string('output', None, 'A new or empty folder for the shards.')
  flags.DEFINE_integer('num_shards', 0,
                       f'Shards to write; 0: one per {SHARD_BYTES >> 20} MiB of images.',
                       lower_bound=0)
  flags.mark_flags_as_required(['folder', 'output'])
  app.run(main, flags_parser=config_cli.parse_flags)
