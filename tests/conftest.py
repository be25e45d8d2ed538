"""Test setup: several fake CPU devices, so every sharded code path runs on CPU."""

import os
import sys

# Must happen before JAX initialises its backend.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import jax  # noqa: E402

NUM_FAKE_DEVICES = 4
jax.config.update('jax_num_cpu_devices', NUM_FAKE_DEVICES)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # for `configs`
