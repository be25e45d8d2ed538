"""Evaluation of runs: the metrics logged during training and those of a trained run.

`training_metrics` runs every config.training.eval_every steps, called by the
training loop's hook with a `sample_fn`; `evaluate_run` scores the images
run_sample.py sampled (--metrics). Neither imports the training loop or the
sampling CLI: the callers bring the samples.
"""

import json

import jax
import numpy as np

from jaxddpm import factories
from jaxddpm import images as images_lib
from jaxddpm import models
from jaxddpm import parallel
from jaxddpm import runs
from jaxddpm.evaluation import bpd as bpd_lib
from jaxddpm.evaluation import classifier as clf_eval
from jaxddpm.evaluation import features
from jaxddpm.evaluation import superres as sr_eval


def scalars(metrics):
  """The float entries of a metrics dict (drops per-timestep arrays), e.g. for logging."""
  return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
          if np.ndim(v) == 0}


_BPD_LOG_KEYS = ('bpd', 'prior_bpd', 'decoder_bpd', 'terms_bpd')


def training_metrics(config, model, schedule, params, mesh, *, step, sample_fn, workdir=None):
  """Metrics every config.training.eval_every steps, with the (EMA) `params`.

  - bits/dim on the first config.eval.bpd_num_examples held-out images;
  - FID / IS / KID of config.eval.num_samples samples against the training set:
    the digits classifier for digits, Inception when config.eval.inception_weights
    is set (otherwise skipped);
  - for a noisy classifier instead: held-out accuracy at several noise levels
    (`classifier.held_out_accuracy`);
  - for a super-resolution config instead: `superres.sr_metrics` (PSNR, SSIM, consistency,
    high-frequency share, and bicubic's) of one sample for each of the first
    config.eval.num_samples held-out low-res images (0: all).

  Args:
    config, model, schedule, params: the run's; `params` for bits/dim.
    mesh: devices for bits/dim and Inception.
    step: the training step; the PRNG keys of this evaluation derive from it.
    sample_fn: sample_fn(num_samples, key, low_res=None) -> images [N, H, W, C] (float in
      [-1, 1] or uint8) from `params`, low_res uint8 [N, h, w, C] for a super-resolution
      model; the training loop's hook builds it from its sampler.
    workdir: where the digits classifier and reference statistics are cached
      (workdir/eval); None: not cached.

  Returns {name: float}. All processes must call it.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(config.seed)), 0xE7A1), step)
  bpd_key, sample_key = jax.random.split(key)
  model_fn = models.make_model_fn(model, params)
  if factories.is_classifier(config):  # a noisy classifier: held-out accuracy by noise level
    return clf_eval.held_out_accuracy(config, model_fn, schedule, bpd_key, mesh=mesh)
  out = {}
  # bits/dim is of x; a residual SR model's variables are x - up(low_res), so it has none.
  if int(config.eval.bpd_num_examples) > 0 and not factories.sr_residual(config):
    bpd = bpd_lib.held_out_bits_per_dim(config, model_fn, schedule, bpd_key,
                                        num_examples=int(config.eval.bpd_num_examples),
                                        mesh=mesh)
    out.update({k: bpd[k] for k in _BPD_LOG_KEYS})
  if int(config.data.get('low_res_size', 0)):
    high, low = sr_eval.held_out_pairs(config, int(config.eval.num_samples) or None)
    samples = images_lib.to_uint8(sample_fn(len(low), sample_key, low_res=low))
    out.update(sr_eval.sr_metrics(samples, high, low))
    return out
  num_samples = int(config.eval.num_samples)
  extractor = features.extractor_from_config(config, workdir=workdir, mesh=mesh, required=False)
  if num_samples > 1 and extractor is not None:
    ref = features.dataset_reference_stats(
        config, extractor, cache_dir=features.eval_dir(workdir) if workdir else None)
    samples = sample_fn(num_samples, sample_key)
    out.update(scalars(features.compute_metrics(samples, ref, extractor=extractor)))
  return out


RUN_METRICS = features.METRICS + ('bpd',)


def parse_metrics(names):
  """'fid,is,kid,bpd' (or a sequence) -> tuple of names; unknown names raise EvaluationError."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(',')]
  names = tuple(n for n in names if n)
  unknown = [n for n in names if n not in RUN_METRICS]
  if unknown:
    raise features.EvaluationError(
        f'unknown metrics {unknown}; choose from {",".join(RUN_METRICS)}')
  return names


def prepare_run_metrics(workdir, metrics, *, inception_weights=None, mesh=None):
  """Checks `metrics` for the run in `workdir` before any sampling; returns the extractor
  (None when only bpd is asked for). Raises EvaluationError / InceptionWeightsError."""
  metrics = parse_metrics(metrics)
  if not set(metrics) & set(features.METRICS):
    return None
  try:
    config = runs.read_config(workdir)
  except FileNotFoundError as e:
    raise features.EvaluationError(str(e)) from e
  return features.extractor_from_config(config, workdir=workdir,
                                        inception_weights=inception_weights, mesh=mesh)


def evaluate_run(workdir, images, *, metrics, extractor=None, bpd_num_examples=None,
                 mesh=None, seed=0):
  """Metrics of a trained run: sample quality of `images` and held-out bits/dim.

  Args:
    workdir: the run directory (config.json + checkpoints; reference statistics
      and the digits classifier are cached in workdir/eval).
    images: samples [N, H, W, C] uint8 (or float in [-1, 1]); unused for bpd only.
    metrics: names from RUN_METRICS ('fid', 'is', 'kid', 'bpd').
    extractor: from `prepare_run_metrics` (needed for fid / is / kid).
    bpd_num_examples: held-out images for bpd (default config.eval.bpd_num_examples;
      0: the whole eval split).
    mesh: device mesh for bits/dim and Inception (default: all devices).
    seed: PRNG seed of the bits/dim x_t draws and the KID subsets.

  Returns:
    {name: float} plus, for bpd, per-timestep [T] arrays (vb_per_t, mse_per_t,
    xstart_mse_per_t).
  """
  metrics = parse_metrics(metrics)
  config = runs.read_config(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  out = {}
  sample_metrics = tuple(m for m in metrics if m in features.METRICS)
  if sample_metrics:
    if extractor is None:
      raise features.EvaluationError(
          f'{sample_metrics} need a feature extractor (prepare_run_metrics)')
    ref = features.dataset_reference_stats(config, extractor,
                                           cache_dir=features.eval_dir(workdir))
    out.update(features.compute_metrics(images, ref, extractor=extractor, metrics=sample_metrics,
                                        seed=seed))
  if 'bpd' in metrics:
    config, params, _ = runs.load_run(workdir, ema=True)
    params = jax.device_put(params, parallel.replicated(mesh))
    model_fn = models.make_model_fn(factories.create_model(config), params)
    n = int(config.eval.bpd_num_examples) if bpd_num_examples is None else bpd_num_examples
    schedule = factories.schedule(config)
    out.update(bpd_lib.held_out_bits_per_dim(config, model_fn, schedule, jax.random.key(seed),
                                             num_examples=n or None, mesh=mesh))
  return out


def write_json(path, metrics):
  """Writes the metrics as one JSON object (per-timestep arrays as lists)."""
  with open(path, 'w') as f:
    json.dump({k: (np.asarray(v).tolist() if np.ndim(v) else v if isinstance(v, int) else float(v))
               for k, v in metrics.items()}, f, indent=2, sort_keys=True)
    f.write('\n')
