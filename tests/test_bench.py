"""benchmarks/bench.py runs end to end, and sampling memory is flat in the number of steps."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_and_sampling_memory_is_flat():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'bench.py'), '--config=configs/tiny.py',
       '--batch_size=2', '--repeats=1', '--warmup=0', '--sample_steps=2', '--notorch',
       '--memory_config=configs/tiny.py', '--memory_batch=16', '--memory_steps=10,100'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  for phase in ('train', 'sample'):
    m = re.search(rf'^{phase}\s+jaxddpm\S*(?: ddim)?\s+([\d.]+)\s+([\d.]+)', text, re.M)
    assert m, text
    images_s, ms_per_step = float(m.group(1)), float(m.group(2))
    assert images_s > 0 and abs(1e3 * 2 / images_s - ms_per_step) < 0.05 * ms_per_step + 0.1, text
  assert re.search(r'forward GFLOP/image: [\d.e-]+ counted', text), text
  # One x is 16 * 8 * 8 * 4 bytes = 4 KiB: keeping every step's x would add 360 KiB
  # from 10 to 100 steps. Only the plan's per-step arrays (a few bytes a step) may grow.
  mem = re.search(r'10 steps: XLA ([\d.,]+) MB.*100 steps: XLA ([\d.,]+) MB', text)
  assert mem, text
  small, large = (float(v.replace(',', '')) for v in mem.groups())
  assert 0 < small and large - small < 8 / 1024, (small, large)
