"""jaxddpm.runtime: settings that change how fast XLA computes, and its float32 rounding only."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxddpm import models
from jaxddpm import runtime
from jaxddpm import factories

_FAULTS = textwrap.dedent('''
    import ctypes, resource, sys
    from jaxddpm import runtime
    applied = runtime.keep_freed_host_memory(force=True) if sys.argv[1] == 'on' else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    def faults_of_one_round(n=200 * 2 ** 20):  # far above glibc's largest mmap threshold
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(n)
      ctypes.memset(p, 1, n)  # touch every page, as XLA writes its temporaries
      libc.free(p)
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_round()
    print(applied, faults_of_one_round())
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_keep_freed_host_memory_stops_page_faults_on_reuse():
  """A second 200 MB buffer reuses the freed first one instead of faulting its 51,200 pages in."""
  counts = {}
  for mode in ('off', 'on'):
    out = subprocess.run([sys.executable, '-c', _FAULTS, mode], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                         ).stdout.split()
    counts[mode] = (out[0] == 'True', int(out[1]))
  assert not counts['off'][0] and counts['off'][1] > 40_000, counts
  assert counts['on'][0] and counts['on'][1] < 2_000, counts


def test_step_compiler_options_keep_the_values():
  """The U-Net forward and its gradient agree with and without the options (to float32 rounding)."""
  options = runtime.step_compiler_options()
  assert isinstance(options, dict)
  assert runtime.step_compiler_options() is options  # probed once
  if jax.default_backend() == 'cpu' and jax.__version__ == '0.10.2':
    assert options, 'jaxlib 0.10.2 knows xla_cpu_experimental_ynn_fusion_type'
  config = tiny.get_config()
  model = factories.create_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([3, 500])
  params = models.init_params(model, jax.random.key(1, impl='rbg'))

  def loss(p):
    out = model.apply({'params': p}, x, t)
    return jnp.sum(out * x), out

  results = [jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=opts)(params)
             for opts in ({}, options)]
  (_, out_a), grads_a = results[0]
  (_, out_b), grads_b = results[1]
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_a), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
