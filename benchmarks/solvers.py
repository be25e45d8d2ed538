r"""Sample quality and wall time of every solver at few model evaluations, next to DDPM.

  python benchmarks/solvers.py --workdir=runs/digits [--num_samples=1000] [--nfe=5,10,20,50]

For the run in --workdir (EMA parameters of its newest good checkpoint), each solver of
--solvers samples --num_samples images at each NFE of --nfe, and DDPM (ancestral) at each of
--ddpm_steps; every row scores its images with the run's metric: for a digits run the
offline digits classifier's digits_fid / digits_is (as its training evaluations), otherwise
FID / IS in the Inception feature space (--inception_weights, or config.eval's). The
reference statistics are those of the training set, cached in WORKDIR/eval.

Every row draws the same x_T (same seed, same batches). Wall time is the sampling of all
--num_samples images, compilation excluded (XLA's compile and tracing time, reported by
jax.monitoring, is subtracted and shown apart). Prints one JSON line per row as it finishes
(so a long run shows progress, and --json_out keeps them), then a markdown table.
"""

# Before anything starts threads, as run_sample.py does (jaxddpm.runtime).
import os  # pylint: disable=g-bad-import-order
import sys  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxddpm import runtime  # noqa: E402  pylint: disable=g-bad-import-order
runtime.tune_from_argv(sys.argv)

import json  # noqa: E402  pylint: disable=g-bad-import-order
import time  # noqa: E402  pylint: disable=g-bad-import-order

from absl import app
from absl import flags
import jax  # noqa: E402  pylint: disable=g-bad-import-order

from jaxddpm import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import runs  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import solvers  # noqa: E402  pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (config.json + checkpoints/).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Images per row.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 500, 'Images per compiled call.')
_SOLVERS = flags.DEFINE_list('solvers', ['ddim', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde',
                                         'unipc', 'heun'], 'Solvers of the few-NFE rows.')
_NFE = flags.DEFINE_list('nfe', ['5', '10', '20', '50'], 'Model evaluations per solver.')
_DDPM_STEPS = flags.DEFINE_list('ddpm_steps', ['200', '1000'], 'Steps of the DDPM rows.')
_SPACING = flags.DEFINE_string('spacing', None, 'Time steps of the few-step solvers '
                               '(default: each solver\'s own).')
_INCEPTION_WEIGHTS = flags.DEFINE_string('inception_weights', None,
                                         'pt_inception-2015-12-05 weights (non-digits runs).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of x_T (the same for every row).')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also append the rows to this JSON-lines file.')
_RUNTIME_TUNING = runtime.define_flag()
flags.mark_flags_as_required(['workdir'])

_COMPILE_EVENTS = ('/jax/core/compile/backend_compile_duration',
                   '/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration')


class _CompileClock:
  """Seconds XLA spent tracing and compiling since the last `take()`."""

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del kwargs
    if event in _COMPILE_EVENTS:
      self.seconds += duration

  def take(self) -> float:
    seconds, self.seconds = self.seconds, 0.0
    return seconds


def _rows():
  """(solver, steps, solver_options) of every row, the DDPM rows last."""
  options = {'spacing': _SPACING.value} if _SPACING.value else {}
  rows = []
  for name in _SOLVERS.value:
    for nfe in _NFE.value:
      rows.append((name, int(nfe), options if name in solvers.FEW_STEP_SOLVERS else {}))
  rows += [('ddpm', int(steps), {}) for steps in _DDPM_STEPS.value]
  return rows


def _table(results, metric_names) -> str:
  head = ['solver', 'NFE'] + list(metric_names) + ['sampling s', 'compile s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in results:
    cells = [r['solver'], str(r['nfe'])] + [f'{r[m]:.2f}' for m in metric_names]
    cells += [f'{r["sampling_s"]:.1f}', f'{r["compile_s"]:.1f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if not _RUNTIME_TUNING.value:
    runtime.disable()
  config, params, _ = runs.load_run(_WORKDIR.value)
  extractor = evaluation.extractor_from_config(
      config, workdir=_WORKDIR.value, inception_weights=_INCEPTION_WEIGHTS.value)
  reference = evaluation.dataset_reference_stats(
      config, extractor, cache_dir=evaluation.eval_dir(_WORKDIR.value))
  metric_names = [extractor.prefix + 'fid', extractor.prefix + 'is']
  clock = _CompileClock()
  results = []
  for name, steps, options in _rows():
    clock.take()
    start = time.perf_counter()
    out = sample.generate(config, params, num_samples=_NUM_SAMPLES.value,
                          batch_size=_BATCH_SIZE.value, solver=name, steps=steps,
                          seed=_SEED.value, solver_options=options)
    wall = time.perf_counter() - start
    compile_s = clock.take()
    metrics = evaluation.scalars(evaluation.compute_metrics(
        out['images'], reference, extractor=extractor, metrics=('fid', 'is'), seed=_SEED.value))
    row = dict(solver=name, steps=steps, nfe=out['nfe'], num_samples=_NUM_SAMPLES.value,
               sampling_s=wall - compile_s, compile_s=compile_s, **options,
               **{m: metrics[m] for m in metric_names})
    results.append(row)
    print(json.dumps(row), flush=True)
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'a') as f:
        f.write(json.dumps(row) + '\n')
  print(_table(results, metric_names))


if __name__ == '__main__':
  app.run(main)
