r"""Times one forward + backward pass of the DDPM CIFAR-10 U-Net (35.7M params).

  python benchmarks/bench_unet.py                   # batch 8, CPU
  python benchmarks/bench_unet.py --platform=gpu    # the JAX side on a GPU

The JAX step is the gradient of a squared-output loss w.r.t. all params,
jitted; compilation is excluded (warm-up calls), and the median of
--repeats timed calls is printed. When torch and diffusers are installed
(`pip install -e .[torch]`), diffusers' UNet2DModel of the same
architecture (google/ddpm-cifar10-32's config) is timed the same way on the
CPU, and the ratio is printed. Both run in training mode with dropout 0.1.
Numbers are printed, not asserted.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import cifar  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxddpm import models  # pylint: disable=g-import-not-at-top,wrong-import-position

_BATCH = flags.DEFINE_integer('batch_size', 8, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls; the median is reported.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first (the first one compiles).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'JAX compute dtype.')
_REMAT = flags.DEFINE_bool('remat', False, 'Gradient checkpointing per block (JAX).')
_PLATFORM = flags.DEFINE_string('platform', 'cpu', 'JAX platform to time on (cpu, gpu, tpu).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time diffusers UNet2DModel when installed.')


def _median_ms(step, warmup, repeats):
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def time_jax(batch_size, warmup, repeats, dtype, remat, device):
  config = cifar.get_config()
  config.model.dtype = dtype
  config.model.remat = remat
  model = models.create_model(config)
  # Random weights straight from NumPy: the values do not change the timing, and this
  # skips compiling the initialiser.
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 32, 3))
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32), abstract)
  x = jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
  key = jax.random.key(0)
  params, x, t, key = jax.device_put((params, x, t, key), device)

  @jax.jit
  def loss_and_grad(params, x, t, key):
    def loss(p):
      out = models.make_model_fn(model, p, train=True, dropout_rng=key)(x, t)
      return jnp.mean(out ** 2)
    return jax.value_and_grad(loss)(params)

  def step():
    jax.block_until_ready(loss_and_grad(params, x, t, key))

  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return _median_ms(step, warmup, repeats), count


def time_diffusers(batch_size, warmup, repeats):
  """ms per forward + backward of diffusers' UNet2DModel on the CPU, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  torch.manual_seed(0)
  model = UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
      layers_per_block=2,
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, dropout=0.1).train()
  x = torch.randn(batch_size, 3, 32, 32)
  t = torch.randint(0, 1000, (batch_size,))

  def step():
    model.zero_grad(set_to_none=True)
    loss = model(x, t).sample.pow(2).mean()
    loss.backward()

  count = sum(p.numel() for p in model.parameters())
  return _median_ms(step, warmup, repeats), (count, torch.get_num_threads(), torch.__version__)


def main(argv):
  del argv
  batch, warmup, repeats = _BATCH.value, _WARMUP.value, _REPEATS.value
  device = jax.devices(_PLATFORM.value)[0]
  jax_ms, count = time_jax(batch, warmup, repeats, _DTYPE.value, _REMAT.value, device)
  print(f'jaxddpm  UNet ({count:,} params, {_DTYPE.value}, remat={_REMAT.value}) on '
        f'{device.platform} ({device.device_kind}): forward+backward batch {batch}: '
        f'{jax_ms:.1f} ms (median of {repeats})')
  if not _TORCH.value:
    return
  torch_ms, info = time_diffusers(batch, warmup, repeats)
  if torch_ms is None:
    print('diffusers: not installed (pip install -e .[torch]); skipped')
    return
  torch_count, threads, version = info
  print(f'diffusers UNet2DModel ({torch_count:,} params, float32) on cpu, torch {version}, '
        f'{threads} threads: forward+backward batch {batch}: {torch_ms:.1f} ms (median of {repeats})')
  print(f'ratio jaxddpm / diffusers: {jax_ms / torch_ms:.2f}')


if __name__ == '__main__':
  app.run(main)
