"""Bits/dim over a data set: the negative log-likelihood bound of DDPM eq. 5 and Table 2.

The full variational bound (prior + T terms incl. the decoder,
`likelihood.calc_bpd_loop`) over a data split, sharded over devices, with a
per-timestep breakdown (DDPM Table 2 / Fig. 5 rate-distortion view).
"""

import functools

import jax
from jax.tree_util import Partial
import numpy as np

from jaxddpm import data
from jaxddpm import factories
from jaxddpm import images as images_lib
from jaxddpm import parallel
from jaxddpm import runtime
from jaxddpm.diffusion import likelihood


def _bpd_batch_fn(model_fn, schedule, x, key, cond, *, model_mean_type, model_var_type,
                  clip_denoised):
  return likelihood.calc_bpd_loop(model_fn, schedule, x, key, model_mean_type=model_mean_type,
                                  model_var_type=model_var_type, clip_denoised=clip_denoised,
                                  cond=cond)


@functools.cache
def _bpd_batch():
  return jax.jit(_bpd_batch_fn, static_argnames=('model_mean_type', 'model_var_type', 'clip_denoised'),
                 compiler_options=runtime.step_compiler_options())


def bits_per_dim(model_fn, schedule, images, key, *, model_mean_type, model_var_type,
                 clip_denoised=True, cond=None, batch_size=64, mesh=None):
  """Negative log-likelihood bound in bits/dim over a data set  [DDPM eq. 5, Table 2].

  -log p(x_0) <= L_T (prior) + sum_{t=2}^T L_{t-1} + L_0 (decoder), each term
  from `likelihood.calc_bpd_loop` (one x_t draw per term), averaged over images.

  Args:
    model_fn: model_fn(x, t, cond); pass a `jax.tree_util.Partial` over the
      parameters so the compiled loop takes them as arguments (and is reused).
    schedule: the run's Schedule (T terms).
    images: [N, H, W, C] uint8, or float in [-1, 1] (put on the 8-bit grid).
    key: PRNG key; batch i uses fold_in(key, i).
    cond: the images' conditioning pytree of [N, ...] arrays (e.g. {'label': [N]}), or None.
    batch_size: images per compiled call (rounded up to a multiple of the mesh).
    mesh: shard each batch over the mesh's 'data' axis (None: default device).

  Returns:
    dict of floats: bpd (mean total), bpd_stderr, prior_bpd (L_T), decoder_bpd
    (L_0), terms_bpd (sum_{t>=2} L_{t-1}), num_examples; and NumPy [T] arrays
    indexed by timestep index t: vb_per_t (L_t in bits/dim, t=0 the decoder),
    mse_per_t (eps MSE), xstart_mse_per_t (x_0 MSE).
  """
  # The decoder's likelihood is of 8-bit data, so bits/dim is of the quantised images.
  images = images_lib.quantize(images)
  n = len(images)
  if n == 0:
    raise ValueError('bits_per_dim needs at least one image')
  model_fn = model_fn if isinstance(model_fn, Partial) else Partial(model_fn)
  batch_size = parallel.round_to_mesh(min(batch_size, n), mesh)
  results = []
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, min(start + batch_size, n))
    padded = np.pad(idx, (0, batch_size - len(idx)), mode='edge')  # one shape: one compile
    batch_cond = jax.tree.map(
        lambda a: parallel.host_array_to_global(np.asarray(a)[padded], mesh), cond or {})
    out = _bpd_batch()(model_fn, schedule, parallel.host_array_to_global(images[padded], mesh),
                       jax.random.fold_in(key, i), batch_cond, model_mean_type=model_mean_type,
                       model_var_type=model_var_type, clip_denoised=clip_denoised)
    results.append({k: parallel.fetch(v)[:len(idx)] for k, v in out.items()})
  r = {k: np.concatenate([b[k] for b in results]).astype(np.float64) for k in results[0]}
  total = r['total_bpd']
  return dict(
      bpd=float(total.mean()),
      bpd_stderr=float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
      prior_bpd=float(r['prior_bpd'].mean()),
      decoder_bpd=float(r['vb'][:, 0].mean()),
      terms_bpd=float(r['vb'][:, 1:].sum(axis=1).mean()),
      num_examples=n,
      vb_per_t=r['vb'].mean(axis=0),
      mse_per_t=r['mse'].mean(axis=0),
      xstart_mse_per_t=r['xstart_mse'].mean(axis=0))


def held_out_bits_per_dim(config, model_fn, schedule, key, *, num_examples=None, mesh=None):
  """bits_per_dim of the first `num_examples` images of config.data.eval_split."""
  batches = list(data.eval_batches(config, batch_size=1024, num_examples=num_examples))
  images = np.concatenate([b['x'] for b in batches])
  cond = jax.tree.map(lambda *a: np.concatenate(a), *[b['cond'] for b in batches])
  types = factories.diffusion_types(config)
  return bits_per_dim(model_fn, schedule, images, key, cond=cond,
                      batch_size=int(config.eval.get('batch_size', config.sampling.batch_size)),
                      mesh=mesh, model_mean_type=types['model_mean_type'],
                      model_var_type=types['model_var_type'],
                      clip_denoised=bool(config.sampling.clip_denoised))
