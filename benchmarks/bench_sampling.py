r"""Time per sampling step of the CIFAR-10 DDPM U-Net (35.7M parameters), batch 8.

  python benchmarks/bench_sampling.py [--batch_size=8] [--steps=10] [--sampler=ddim]

Prints milliseconds per step for jaxddpm (the sampler's lax.scan over `steps`
steps, compiled once, then timed) and the U-Net forward pass alone, and, when
torch and diffusers import (`pip install -e '.[torch]'`), for diffusers'
DDIMPipeline with the same architecture (UNet2DModel in the layout of
google/ddpm-cifar10-32). Weights are random: this measures speed only. Both run
on the CPU unless JAX finds an accelerator; run it on an otherwise idle machine.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cifar  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import models  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import sample  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import samplers  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxddpm import schedules  # noqa: E402  pylint: disable=g-import-not-at-top

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Samples per step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Sampling steps timed per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (the best is reported).')
_SAMPLER = flags.DEFINE_enum('sampler', 'ddim', ['ddpm', 'ddim'], 'jaxddpm sampler.')


def _best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bench_jax(batch, steps, repeats, kind):
  config = cifar.get_config()
  model = models.create_model(config)
  size, channels = config.data.image_size, config.data.channels
  params = models.init_params(model, jax.random.key(0), size, channels)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  model_fn = sample.make_model_fn(model, params)
  plan = samplers.make_sampler(schedules.schedule_from_config(config.diffusion), sampler=kind,
                               num_steps=steps, chunk_length=steps)
  run_chunk = jax.jit(samplers.run_chunk)
  state = plan.init(jax.random.key(1), (batch, size, size, channels))

  start = time.perf_counter()
  jax.block_until_ready(run_chunk(plan, model_fn, state, 0))
  compile_s = time.perf_counter() - start
  step_s = _best_of(lambda: jax.block_until_ready(run_chunk(plan, model_fn, state, 0)),
                    repeats) / steps

  forward = jax.jit(lambda f, x, t: f(x, t))
  x, t = state.x, jnp.full((batch,), 500, jnp.int32)
  jax.block_until_ready(forward(model_fn, x, t))
  forward_s = _best_of(lambda: jax.block_until_ready(forward(model_fn, x, t)), repeats * steps)
  return num_params, compile_s, step_s, forward_s


def bench_diffusers(batch, steps, repeats):
  """diffusers' DDIMPipeline on the DDPM CIFAR-10 U-Net layout; None without torch/diffusers."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
      freq_shift=1, time_embedding_type='positional').eval()
  num_params = sum(p.numel() for p in unet.parameters())
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule='linear')
  pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)

  def run(n):
    pipe(batch_size=batch, num_inference_steps=n, eta=0.0, output_type='np',
         generator=torch.manual_seed(0))

  run(2)  # warm-up
  step_s = _best_of(lambda: run(steps), repeats) / steps
  return num_params, step_s, torch.get_num_threads(), diffusers.__version__, torch.__version__


def main(argv):
  del argv
  batch, steps, repeats = _BATCH_SIZE.value, _STEPS.value, _REPEATS.value
  device = jax.devices()[0]
  print(f'CIFAR-10 U-Net, batch {batch}, {steps} steps per timed run, best of {repeats}; '
        f'{os.cpu_count()} CPU cores')
  num_params, compile_s, step_s, forward_s = bench_jax(batch, steps, repeats, _SAMPLER.value)
  print(f'jaxddpm {_SAMPLER.value:4s} on {device.platform} ({num_params / 1e6:.1f}M params): '
        f'{1e3 * step_s:8.1f} ms/step   (U-Net forward {1e3 * forward_s:.1f} ms; '
        f'compile {compile_s:.1f} s)')
  ref = bench_diffusers(batch, steps, repeats)
  if ref is None:
    print('diffusers DDIMPipeline: skipped (torch/diffusers not installed)')
  else:
    num_params, step_s, threads, diffusers_version, torch_version = ref
    print(f'diffusers DDIMPipeline on cpu ({num_params / 1e6:.1f}M params, torch '
          f'{torch_version}, diffusers {diffusers_version}, {threads} threads): '
          f'{1e3 * step_s:8.1f} ms/step')


if __name__ == '__main__':
  app.run(main)
