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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


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
  input pipeline's threads.

  Returns:
    True when the settings were applied.
  """
  if not sys.platform.startswith('linux') or not (force or _cpu_only()):
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


@functools.cache
def step_compiler_options() -> dict:
  """`compiler_options` for a top-level jit of a U-Net step on JAX's default backend.

  {} on GPU/TPU, and on a jaxlib that does not know the options (checked by
  compiling a one-op program). JAX refuses compiler_options on a nested jit:
  pass them to the outermost `jax.jit` only.
  """
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
