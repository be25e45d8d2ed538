r"""Samples from a trained run: `python run_sample.py --workdir=runs/digits`.

This file is intentionally kept short: it parses flags and calls
`jaxddpm.sample.sample_run`, where the logic lives. Flags left unset take the
run's config.sampling values. Writes samples.npz (uint8 images [N, H, W, C],
labels, PSNR) and grid.png to --output_dir (default workdir/samples/<a name made
of the sampling settings and the checkpoint step>), which must not hold outputs
already; with --metrics also metrics.json there, and prints the metrics as one
JSON line. A mistake ends as one line `run_sample.py: error: ...` and exit 1.

  python run_sample.py --workdir=runs/digits --solver=dpmpp_2m --steps=20
  python run_sample.py --workdir=runs/digits --solver=heun --steps=19 --s_churn=10
  python run_sample.py --workdir=runs/cifar --inpaint_image=img.png --inpaint_mask=mask.png
  python run_sample.py --workdir=runs/digits --num_samples=1000 --metrics=fid,is,kid,bpd
  python run_sample.py --workdir=runs/digits --classifier_workdir=runs/digits_clf \
      --class_label=3 --classifier_scale=4                           # classifier guidance
  python run_sample.py --workdir=runs/digit_pairs_compose --prompt="a 3 on the left" \
      --prompt="a 7 on the right" --prompt_weights=3,3               # AND of two prompts
  python run_sample.py --workdir=runs/base --sr_workdir=runs/sr      # a cascade
  python run_sample.py --sr_workdir=runs/sr --low_res_images=DIR     # upscale a folder
  python run_sample.py --sr_workdir=runs/sr --sr_samples_per_input=8 # held-out SR metrics
"""

# Before anything starts threads: glibc then keeps freed memory for reuse, unless
# --noruntime_tuning (jaxddpm.runtime).
import sys  # pylint: disable=g-bad-import-order
from jaxddpm import runtime  # pylint: disable=g-bad-import-order
runtime.tune_from_argv(sys.argv)

import json
import os

from absl import app
from absl import flags

from jaxddpm import config_cli
from jaxddpm import parallel
from jaxddpm import solvers

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (config.json + checkpoints/); '
                                'with --sr_workdir, the base run of a cascade.')
_SOLVER = flags.DEFINE_enum('solver', None, list(solvers.SOLVERS),
                            'The solver (jaxddpm.solvers).')
_SAMPLER = flags.DEFINE_enum('sampler', None, list(solvers.SOLVERS), 'Old name of --solver.')
_STEPS = flags.DEFINE_integer('steps', None, 'Model evaluations (NFE); heun uses 2N - 1 <= it.')
_ETA = flags.DEFINE_float('eta', None, "ddim: eta in [0, 1].")
_SPACING = flags.DEFINE_string('spacing', None, 'Time steps: ddpm/ddim uniform|ddim|leading|'
                               'trailing|linspace|quad; others logSNR|time_uniform|karras.')
_ORDER = flags.DEFINE_integer('order', None, 'unipc: order 2 or 3.')
_S_CHURN = flags.DEFINE_float('s_churn', None, "heun: EDM's S_churn (0: deterministic).")
_S_TMIN = flags.DEFINE_float('s_tmin', None, "heun: EDM's S_tmin.")
_S_TMAX = flags.DEFINE_float('s_tmax', None, "heun: EDM's S_tmax.")
_S_NOISE = flags.DEFINE_float('s_noise', None, "heun: EDM's S_noise.")
_THRESHOLDING = flags.DEFINE_float('thresholding', None,
                                   'Dynamic thresholding percentile of x0, e.g. 0.995.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', None, 'Number of samples.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Samples per batch (all devices).')
_SEED = flags.DEFINE_integer('seed', None, 'PRNG seed (default: the run config seed).')
_CLASS_LABEL = flags.DEFINE_integer('class_label', None,
                                    'Class of every sample (default: random classes).')
_GUIDANCE_SCALE = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance w.')
_INPAINT_IMAGE = flags.DEFINE_string('inpaint_image', None, 'Image to inpaint.')
_INPAINT_MASK = flags.DEFINE_string('inpaint_mask', None, 'Mask image: white = keep.')
_INPAINT_RESAMPLE = flags.DEFINE_integer(
    'inpaint_resample', 1, 'RePaint resampling count r (1: the replacement method).')
_INPAINT_JUMP = flags.DEFINE_integer('inpaint_jump_length', 10, 'RePaint jump length.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where to write the samples.')
_SAVE_INDIVIDUAL = flags.DEFINE_bool('save_individual', False, 'Also write one PNG per sample.')
# --- text-to-image (jaxddpm.prompts) ---
_PROMPT = flags.DEFINE_multi_string(
    'prompt', [], 'Text models: the prompt of every sample; repeated, one prompt per sample '
    'in turn, or composed when --prompt_weights is given.')
_PROMPT_WEIGHTS = flags.DEFINE_list(
    'prompt_weights', None, 'Compose the --prompt conditions with these weights (AND for '
    'positive, NOT for negative), one model call per step.')
_PROMPTS_FILE = flags.DEFINE_string(
    'prompts_file', None, 'Text models: one prompt a line; the i-th sample answers line i '
    '(--num_samples defaults to the line count).')
_NEGATIVE_PROMPT = flags.DEFINE_string('negative_prompt', None,
                                       'Text models: what guidance steers away from.')
# --- controllable generation (jaxddpm.control) ---
_CLASSIFIER_WORKDIR = flags.DEFINE_string(
    'classifier_workdir', None, 'A noisy classifier run (configs/digits_classifier.py) that '
    'guides sampling toward --class_label (random classes without it).')
_CLASSIFIER_SCALE = flags.DEFINE_float('classifier_scale', None,
                                       'Classifier guidance scale s (default 1).')
_COMPOSE_LABELS = flags.DEFINE_list('compose_labels', None,
                                    'Class-conditional models: labels to compose, e.g. 3,7.')
_LABEL_WEIGHTS = flags.DEFINE_list('label_weights', None,
                                   'Weights of --compose_labels (default 1 each; negative: NOT).')
_CORRECTOR = flags.DEFINE_enum(
    'corrector', None, ['ula', 'hmc', 'mala', 'mhmc'], 'MCMC correctors at every noise level '
    '(Du et al. 2023), for compositions: ula, hmc, or, for an energy-parameterised model '
    '(model.energy), the Metropolis-adjusted mala, mhmc. Solvers ddpm, ddim, heun.')
_CORRECTOR_STEPS = flags.DEFINE_integer('corrector_steps', None,
                                        'Corrector steps K per noise level (default 1).')
_CORRECTOR_STEP_SCALE = flags.DEFINE_float(
    'corrector_step_scale', None, 'Corrector step size c: eta = c sigma^2 (ula, mala), '
    'h = c sigma (hmc, mhmc); default 0.1.')
_CORRECTOR_LEAPFROG = flags.DEFINE_integer('corrector_leapfrog', None,
                                           'hmc, mhmc: leapfrog steps per step (default 3).')
# --- super-resolution (jaxddpm.cascade) ---
_SR_WORKDIR = flags.DEFINE_multi_string(
    'sr_workdir', [], 'Super-resolution run(s), in cascade order. Alone: upscale '
    '--low_res_images, or the held-out split with its metrics.')
_LOW_RES_IMAGES = flags.DEFINE_string('low_res_images', None,
                                      'Folder of low-res PNG/JPEG images to upscale.')
_AUG_LEVEL = flags.DEFINE_float('aug_level', None, 'SR stages: the noise-conditioning '
                                'augmentation level s in [0, 1] (default: each run\'s config).')
_SR_SOLVER = flags.DEFINE_enum('sr_solver', None, list(solvers.SOLVERS),
                               'SR stages: the solver (default: each run\'s config).')
_SR_STEPS = flags.DEFINE_integer('sr_steps', None, 'SR stages: model evaluations.')
_SR_SAMPLES = flags.DEFINE_integer('sr_samples_per_input', 1,
                                   'Held-out SR metrics: samples per input (their mean too).')
# --- evaluation (jaxddpm.evaluation) ---
_METRICS = flags.DEFINE_string(
    'metrics', '', 'Comma-separated metrics of the samples / held-out data: fid,is,kid,bpd '
    '(digits runs: the offline digits classifier unless --inception_weights is given).')
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    'inception_weights', None, 'pt_inception-2015-12-05-6726825d.pth (or its .npz) for '
    'FID/IS/KID (default: the run config.eval.inception_weights).')
_BPD_NUM_EXAMPLES = flags.DEFINE_integer(
    'bpd_num_examples', None, 'Held-out images for bpd (default config.eval.bpd_num_examples; '
    '0: the whole eval split).')
# --- end evaluation ---
_RUNTIME_TUNING = runtime.define_flag()
_DISTRIBUTED = flags.DEFINE_bool('distributed', None,
                                 'Call jax.distributed.initialize() (multi-host).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _RUNTIME_TUNING.value:
    runtime.disable()  # also when a --flagfile turned it off, which tune_from_argv cannot read
  parallel.maybe_initialize_distributed(_DISTRIBUTED.value)
  from jaxddpm import evaluation  # pylint: disable=g-import-not-at-top
  from jaxddpm import sample  # pylint: disable=g-import-not-at-top
  if _SR_WORKDIR.value:
    return _super_resolution(sample)
  if _LOW_RES_IMAGES.value:
    _fail('--low_res_images needs --sr_workdir (the super-resolution run)')
  if not _WORKDIR.value:
    _fail('--workdir (the run to sample) is required')
  try:
    extractor = evaluation.prepare_run_metrics(  # fails fast, before sampling
        _WORKDIR.value, _METRICS.value, inception_weights=_INCEPTION_WEIGHTS.value)
    prompts, num_samples = _prompts(sample)
    solver_options = dict(spacing=_SPACING.value, order=_ORDER.value, s_churn=_S_CHURN.value,
                          s_tmin=_S_TMIN.value, s_tmax=_S_TMAX.value, s_noise=_S_NOISE.value,
                          thresholding=_THRESHOLDING.value)
    result = sample.sample_run(
        _WORKDIR.value, solver=_SOLVER.value, sampler=_SAMPLER.value, steps=_STEPS.value,
        eta=_ETA.value, solver_options=solver_options,
        num_samples=num_samples, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        class_label=_CLASS_LABEL.value, guidance_scale=_GUIDANCE_SCALE.value,
        inpaint_image=_INPAINT_IMAGE.value, inpaint_mask=_INPAINT_MASK.value,
        inpaint_resample=_INPAINT_RESAMPLE.value, inpaint_jump_length=_INPAINT_JUMP.value,
        output_dir=_OUTPUT_DIR.value, save_individual=_SAVE_INDIVIDUAL.value,
        prompts=prompts, negative_prompt=_NEGATIVE_PROMPT.value, control=_control(sample))
    metrics = None
    if _METRICS.value:
      metrics = evaluation.evaluate_run(
          _WORKDIR.value, result['images'], metrics=_METRICS.value, extractor=extractor,
          bpd_num_examples=_BPD_NUM_EXAMPLES.value)
      if parallel.is_main_process():
        evaluation.write_json(os.path.join(result['output_dir'], 'metrics.json'), metrics)
  except (sample.SampleError, evaluation.EvaluationError, OSError) as e:
    _fail(e)
  if parallel.is_main_process():
    print(f'Wrote {len(result["images"])} samples ({result["nfe"]} model evaluations each) to '
          f'{result["output_dir"]}')
    if result['psnr'] is not None:
      print(f'Inpainting PSNR of the filled region: {result["psnr"].mean():.2f} dB')
    if metrics is not None:
      print(json.dumps(evaluation.scalars(metrics), sort_keys=True))


def _prompts(sample) -> tuple[list[str] | None, int | None]:
  """(--prompt or --prompts_file's prompts, the number of samples)."""
  from jaxddpm import prompts  # pylint: disable=g-import-not-at-top
  if _PROMPT.value and _PROMPTS_FILE.value:
    raise sample.SampleError('give --prompt or --prompts_file, not both')
  if _PROMPTS_FILE.value:
    lines = prompts.read_prompts_file(_PROMPTS_FILE.value)
    return lines, _NUM_SAMPLES.value if _NUM_SAMPLES.value is not None else len(lines)
  return (list(_PROMPT.value) or None), _NUM_SAMPLES.value


def _control(sample) -> dict:
  """The controllable-generation arguments (`jaxddpm.control`)."""
  labels = None
  if _COMPOSE_LABELS.value:
    try:
      labels = [int(v) for v in _COMPOSE_LABELS.value]
    except ValueError:
      raise sample.SampleError(f'--compose_labels={",".join(_COMPOSE_LABELS.value)}: give '
                               'comma-separated integers, e.g. 3,7') from None
  return dict(classifier_workdir=_CLASSIFIER_WORKDIR.value,
              classifier_scale=_CLASSIFIER_SCALE.value, prompt_weights=_PROMPT_WEIGHTS.value,
              compose_labels=labels, label_weights=_LABEL_WEIGHTS.value,
              corrector=_CORRECTOR.value, corrector_steps=_CORRECTOR_STEPS.value,
              corrector_step_scale=_CORRECTOR_STEP_SCALE.value,
              corrector_leapfrog=_CORRECTOR_LEAPFROG.value)


def _fail(message) -> None:
  print(f'run_sample.py: error: {message}', file=sys.stderr)
  sys.exit(1)


def _super_resolution(sample) -> None:
  """--sr_workdir: a cascade from --workdir, a folder's upscaling, or held-out metrics."""
  from jaxddpm import cascade  # pylint: disable=g-import-not-at-top
  sr = dict(solver=_SR_SOLVER.value, steps=_SR_STEPS.value, aug_level=_AUG_LEVEL.value,
            seed=_SEED.value, batch_size=_BATCH_SIZE.value)
  base = dict(solver=_SOLVER.value, steps=_STEPS.value, eta=_ETA.value,
              num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
              class_label=_CLASS_LABEL.value, guidance_scale=_GUIDANCE_SCALE.value)
  try:
    result = cascade.run(_WORKDIR.value, _SR_WORKDIR.value, low_res_images=_LOW_RES_IMAGES.value,
                         samples_per_input=_SR_SAMPLES.value, output_dir=_OUTPUT_DIR.value,
                         sr_kwargs=sr, base_kwargs=base)
  except (sample.SampleError, OSError) as e:
    _fail(e)
  if parallel.is_main_process():
    images = result['images']  # [N, H, W, C], or [K, N, H, W, C] for the held-out metrics
    count = images.shape[0] * (images.shape[1] if images.ndim == 5 else 1)
    print(f'Wrote {count} upscaled images to {result["output_dir"]}')
    if 'metrics' in result:
      print(json.dumps(result['metrics'], sort_keys=True))


if __name__ == '__main__':
  app.run(main, flags_parser=config_cli.parse_flags)
