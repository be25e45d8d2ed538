"""Process-level settings that make the compiled steps run faster on the CPU.

Two measured problems of XLA:CPU, each with a setting that removes it (figures
from `benchmarks/bench.py`, CIFAR-10 U-Net, batch 8, 2 cores; see the README):

- Host memory. XLA:CPU allocates each execution's temporary buffer afresh with
  `posix_memalign` on one of its worker threads. glibc serves a request that
  large (748 MB for the CIFAR train step) from a fresh `mmap` and unmaps it on
  `free`, so every step page-faults the whole buffer in again (about 190,000
  faults, 10-15% of a train step). `keep_freed_host_memory` makes glibc keep
  freed memory for reuse instead. It must run before JAX starts its threads:
  call it first thing in a program, before importing jax.
- Kernel choice. This jaxlib hands convolutions, reductions, dots and
  elementwise fusions to YNNPACK by default. On the CPU we measured (AMD EPYC,
  AVX-512) XLA's own convolution kernels run 5-8% faster than YNNPACK's, while
  YNNPACK's reductions run up to 20x faster than XLA's (the column sums of
  GroupNorm and of bias gradients). `step_compiler_options` gives the
  `compiler_options` for a top-level `jax.jit` of a model step that keep
  YNNPACK for reductions and dots only, where this jaxlib knows the option.

Neither changes what is computed: the kernels differ in float32 rounding only
(tests/test_runtime.py compares the U-Net's values and gradients).

The CLIs apply both unless `--noruntime_tuning` is given: they call `tune_from_argv(sys.argv)`
first thing (glibc must be set before threads start, so before absl parses the flags) and
define the flag with `define_flag()` so that absl accepts it and --help lists it. `disable()`
is the process-wide switch behind it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import re
import sys
from typing import Sequence

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')

FLAG_NAME = 'runtime_tuning'
# False after disable(): this process keeps glibc's and XLA's defaults.
_enabled = True


def disable() -> None:
  """Turns the tuning off for the rest of the process (what --noruntime_tuning does).

  Afterwards `keep_freed_host_memory` changes nothing and returns False, and
  `step_compiler_options` returns {} (XLA's default kernels), also where it was called
  before. Settings glibc already took stay: call it before `keep_freed_host_memory`, as
  `tune_from_argv` does.
  """
  global _enabled
  _enabled = False


def _flag_in_argv(argv: Sequence[str]) -> bool:
  """The value of --runtime_tuning in argv, read as absl reads a bool flag (default True).

  `--runtime_tuning`, `--noruntime_tuning`, `--runtime_tuning=false|0|f|true|1|t` (any case,
  one or two dashes); the last one wins; nothing after `--` is a flag. A --flagfile is not read.
  """
  value = True
  for arg in argv[1:]:
    if arg == '--':
      break
    match = re.fullmatch(rf'--?(no)?{FLAG_NAME}(?:=(.*))?', arg)
    if match:
      no, text = match.groups()
      value = not no if text is None else text.lower() not in ('false', 'f', '0')
  return value


def tune_from_argv(argv: Sequence[str]) -> bool:
  """What a CLI calls first thing, before importing jax: tunes the process unless argv says not.

  With `--noruntime_tuning` (or `--runtime_tuning=false`) in argv it calls `disable()`;
  otherwise `keep_freed_host_memory()` now, while no thread has started. argv is read
  before absl parses it, because the flags are parsed only after every import; the CLI also
  defines the flag (`define_flag`) so that absl accepts it.

  Args:
    argv: the command line, sys.argv (argv[0] is the program).

  Returns:
    True when the tuning is on.
  """
  if not _flag_in_argv(argv):
    disable()
    return False
  keep_freed_host_memory()
  return True


def define_flag():
  """Defines the absl bool flag --runtime_tuning (default True) that `tune_from_argv` reads.

  Returns:
    Its FlagHolder. Its parsed value also says False for a --flagfile that turned it off,
    which `tune_from_argv` cannot see: call `disable()` then.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.disclaim_key_flags()  # the flag belongs to the CLI calling this: its --helpshort lists it
  return flags.DEFINE_bool(
      FLAG_NAME, True, 'Apply jaxddpm.runtime\'s CPU settings (glibc keeps freed memory; '
      'XLA:CPU kernel choice). --noruntime_tuning keeps glibc\'s and XLA\'s defaults.')


def _cpu_only() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms == 'cpu'
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def keep_freed_host_memory(force: bool = False) -> bool:
  """Makes glibc reuse freed memory instead of returning it to the OS (Linux, CPU JAX).

    M_ARENA_MAX = 1:           all threads allocate from the main (brk) heap, as
                               only it can hold a buffer larger than 64 MB
                               without mmap;
    M_MMAP_MAX = 0:            no allocation is served by a private mmap;
    M_TRIM_THRESHOLD = 2^31-1: freed memory at the top of the heap is kept.

  The process's peak memory is unchanged (the buffers are the same); its
  resident memory no longer shrinks after a peak. Left alone where an
  accelerator plugin is installed (unless JAX_PLATFORMS=cpu or `force`): there
  the host does little but feed the device, and one arena would serialise the
  input pipeline's threads. Nothing is changed after `disable()`.

  Returns:
    True when the settings were applied.
  """
  if not _enabled or not sys.platform.startswith('linux') or not (force or _cpu_only()):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))


# Candidates, best first; the first this jaxlib accepts is used. YNNPACK keeps the
# reductions (20x faster than XLA's own for the column sums of GroupNorm and bias
# gradients) and the dots; convolutions and elementwise fusions go to XLA's kernels.
_CPU_STEP_OPTIONS = (
    {'xla_cpu_experimental_ynn_fusion_type':
         'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
)


def step_compiler_options() -> dict:
  """`compiler_options` for a top-level jit of a U-Net step on JAX's default backend.

  {} on GPU/TPU, after `disable()`, and on a jaxlib that does not know the options
  (checked once by compiling a one-op program). JAX refuses compiler_options on a nested
  jit: pass them to the outermost `jax.jit` only.
  """
  return _probed_step_options() if _enabled else {}


@functools.cache
def _probed_step_options() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != 'cpu':
    return {}
  for options in _CPU_STEP_OPTIONS:
    try:
      jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # pylint: disable=broad-except
      continue  # an older or newer jaxlib: unknown option or value
    return dict(options)
  return {}
