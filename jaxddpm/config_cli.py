"""The absl flags parser of the CLIs: a mistake in the config file or in a
`--config.<field>` override is reported in one line rather than a traceback.
"""

import os
import re
import sys
import sysconfig
import traceback
from typing import Sequence

from absl import flags
from ml_collections import config_flags

# Where the installed libraries live: the innermost traceback frame outside them (and outside
# this file) is the user's config file.
_LIBRARY_DIRS = tuple(sorted({sysconfig.get_path(k)
                              for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')}))


def _config_file_line(error: BaseException) -> str:
  """'<file>, line <n>' of the user's code (a config file) that raised `error`, or ''."""
  if isinstance(error, SyntaxError) and error.filename:
    return f'{error.filename}, line {error.lineno}'
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith(_LIBRARY_DIRS + ('<',)) and f.filename != __file__]
  return f'{frames[-1].filename}, line {frames[-1].lineno}' if frames else ''


def _key_error_text(error: BaseException) -> str:
  """The message of ml_collections' missing-field KeyError (wrapped in an AttributeError).

  It reads "'chh'\\nDid you mean "ch" instead of "chh"?"; str() of a KeyError would quote it.
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _unknown_field(error: BaseException, argv: Sequence[str]) -> str | None:
  """'--config.model.chh=3: config.model has no field 'chh'. Did you mean "ch" ...?', or None.

  None unless `error` is ml_collections' KeyError for a missing field (the quoted name, then
  a "Did you mean" line when a field is close), wrapped or not in an AttributeError.
  """
  key_repr, *hint = [line.strip() for line in _key_error_text(error).splitlines()]
  if not re.fullmatch(r"'\w+'", key_repr):
    return None
  key = key_repr.strip("'")
  message = f'has no field {key_repr}' + (f'. {" ".join(hint)}' if hint else '')
  for arg in argv[1:]:
    match = re.match(r'-{1,2}(?:no)?(\w+)\.([\w.]+)', arg)
    if match and key in match.group(2).split('.'):
      path = match.group(2).split('.')
      parent = '.'.join([match.group(1)] + path[:path.index(key)])
      return f'{arg}: {parent} {message}'
  return f'the config {message}'


def _one_line(error: BaseException, argv: Sequence[str]) -> str:
  """What went wrong while parsing flags, in one line."""
  if isinstance(error, flags.Error) and '\n' not in str(error):
    return str(error)  # absl's own: unknown flag, bad value, missing flag, failed validator
  chain = [error]  # ml_collections and absl re-raise; chain[-1] started it
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  root = chain[-1]
  where = next(filter(None, map(_config_file_line, reversed(chain))), '')
  key_error = isinstance(error, (AttributeError, KeyError))
  if key_error and not where:  # raised by ml_collections applying an override
    unknown = _unknown_field(error, argv)
    if unknown:
      return unknown
  lines = [line.strip() for line in str(root).splitlines() if line.strip()]
  last = lines[-1] if lines else ''
  if isinstance(root, SyntaxError):
    text = f'SyntaxError: {root.msg}'
  elif key_error:
    text = f'{type(error).__name__}: ' + '. '.join(_key_error_text(error).splitlines())
  else:
    text = f'{type(root).__name__}: {last}'
  if where:
    return f'config file {where}: {text}'
  if isinstance(root, OSError):  # ml_collections could not read the file
    return f'config file: {last}'  # "[Errno 2] No such file or directory: 'x.py'"
  return text


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses absl flags as app.run does, but reports every mistake in one line on stderr.

  For `app.run(main, flags_parser=config_utils.parse_flags)`. A config file that is missing,
  fails to import (a syntax error) or raises in get_config(), a `--config.<field>` override of
  a field the config lacks (with ml_collections' "Did you mean" suggestion), and absl's own
  errors (unknown flag, bad value, missing required flag, failed validator) each print
  `<program>: error: <what is wrong>` and exit with status 1 before main runs, where absl and
  ml_collections would print a traceback of tens of lines.

  Returns:
    The arguments left after the flags, as `flags.FLAGS(argv)` returns them.
  """
  config_names = [name for name in flags.FLAGS
                  if config_flags.config_flags.is_config_flag(flags.FLAGS[name])]
  try:
    rest = flags.FLAGS(argv)
    for name in config_names:
      # ml_collections defers a config file's load error until the config is first read
      # (in main); reading an attribute raises it here instead.
      getattr(flags.FLAGS[name].value, 'lock', None)
  except Exception as e:  # pylint: disable=broad-except  # the config file may raise anything
    print(f'{os.path.basename(argv[0])}: error: {_one_line(e, argv)}', file=sys.stderr)
    sys.exit(1)
  return rest
