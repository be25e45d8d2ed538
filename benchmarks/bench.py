r"""Speed of the DDPM U-Net: train step and sampling step, jaxddpm next to diffusers.

  python benchmarks/bench.py                         # CIFAR-10 model, batch 8, float32, vs diffusers
  python benchmarks/bench.py --batch_size=128 --dtype=bfloat16 --notorch   # on a GPU
  python benchmarks/bench.py --config=configs/digits.py --batch_size=64 --steps_per_call=10

For the model of `--config` (default configs/cifar.py, the paper's 35.7M
parameter CIFAR-10 U-Net) it measures, on JAX's default device:

- the train step: the jitted step of `jaxddpm.train.make_train_step` (noise and
  timestep draws, loss, gradient, clipping, Adam and the EMA update), state
  donated, as `train.train_and_evaluate` runs it;
- the sampling step: one DDIM (or DDPM) step of `jaxddpm.solvers`, timed as a
  `run_chunk` of --sample_steps steps;
- compile time, and peak memory: XLA's own account of each compiled program
  (arguments + outputs + temporaries) and the process's peak (host RSS on the
  CPU, the device's peak_bytes_in_use on a GPU);
- forward FLOPs per image, counted by hand (convolutions, dense layers and
  attention matmuls) and by XLA's cost analysis, and the model FLOPs
  utilisation against the device's peak on an accelerator (train step = 3x the
  forward);
- that sampling memory does not grow with the number of steps (--memory_config,
  default configs/digits.py).

Times are medians of --repeats calls after --warmup calls; compilation is
timed apart. When torch and diffusers import (`pip install -e '.[torch]'`), the
same architecture as a diffusers `UNet2DModel` (the mapping of
`jaxddpm.convert`, checked here by converting its config back) runs the same
train step (MSE on eps, clip, Adam, EMA) and DDIM/DDPM scheduler step in the same
process, eagerly and under `torch.compile` where that works, and the ratio
jaxddpm / diffusers of images per second is printed (> 1: jaxddpm is faster).
On the CPU both frameworks get the same cores: --threads pins the process to
that many cores (default: all this process may use), which sets XLA's thread
pool and torch.set_num_threads alike. Run it on an otherwise idle machine:
PyTorch's OpenMP threads slow down far more than XLA's when other processes
compete for the cores. Weights are random: this measures speed, not samples.
"""

import contextlib
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# JAX is imported in main(), after --threads has pinned the process's cores.

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO_ROOT, 'configs', 'cifar.py'), 'Run config of the model to time.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per train step and per sampling step.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Compute dtype (default: the config\'s model.dtype).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls; the median is reported.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls after compilation.')
_STEPS_PER_CALL = flags.DEFINE_integer('steps_per_call', 1,
                                       'Train steps per jitted call (lax.scan), as training.steps_per_call.')
# The solvers of jaxddpm.solvers.SOLVERS that have a diffusers scheduler to compare with.
_DIFFUSERS_SCHEDULERS = {'ddim': 'DDIMScheduler', 'ddpm': 'DDPMScheduler'}
_SAMPLER = flags.DEFINE_enum('sampler', 'ddim', list(_DIFFUSERS_SCHEDULERS),
                             'Solver of the sampling step.')
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 5, 'Sampling steps per timed call.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time diffusers\' UNet2DModel when it imports.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', True, 'Also time it under torch.compile.')
_TUNING = flags.DEFINE_bool(
    'runtime_tuning', True,
    'Apply jaxddpm.runtime\'s settings as run_train.py does (glibc keeps freed memory; XLA:CPU '
    'kernel choice). --noruntime_tuning times XLA\'s defaults.')
_THREADS = flags.DEFINE_integer('threads', 0, 'CPU cores for both frameworks (0: all available).')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', 0.0,
                                  'Device peak for MFU, TFLOP/s (0: look up the device kind).')
_MEMORY_CONFIG = config_flags.DEFINE_config_file(
    'memory_config', os.path.join(REPO_ROOT, 'configs', 'digits.py'),
    'Model for the sampling-memory check.')
_MEMORY_STEPS = flags.DEFINE_list('memory_steps', ['10', '100'],
                                  'Step counts of the sampling-memory check (empty: skip it).')
_MEMORY_BATCH = flags.DEFINE_integer('memory_batch', 64, 'Batch of the sampling-memory check.')

# Dense bfloat16 peak of accelerators, TFLOP/s, by a substring of jax's device_kind (first match).
PEAK_BF16_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100', 989.4), ('H200', 989.4), ('GH200', 989.4), ('B200', 2250.0),
    ('A100', 312.0), ('L40S', 362.0), ('L4', 121.0), ('TPU v4', 275.0), ('TPU v5 lite', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6', 918.0),
)
MB = 2.0 ** 20


# ---------------------------------------------------------------------------
# Measuring.


def time_interleaved(calls, warmup: int, repeats: int, probe, optional=()):
  """Times several implementations of the same step, taking turns.

  Args:
    calls: {name: call}, each call running one step to completion (blocking).
    warmup: untimed calls of each after its first call.
    repeats: timed rounds; each round calls every implementation once, so a
      slow spell of the machine falls on all of them alike.
    probe: a MemoryProbe, reset before each implementation's first call and read
      after its warm-up.
    optional: names that may fail (torch.compile can, in many ways).

  Returns:
    {name: dict(seconds=median seconds per call, first_s=its first call,
    peak=..., growth=...)}; an implementation whose first call raises is left
    out, with {name: 'Error: message'} under 'skipped' when it is optional.
  """
  result, skipped = {}, {}
  for name, call in list(calls.items()):
    base = probe.reset()
    start = time.perf_counter()
    try:
      call()
    except Exception as e:  # pylint: disable=broad-except
      if name not in optional:
        raise
      skipped[name] = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}'
      del calls[name]
      continue
    first_s = time.perf_counter() - start
    for _ in range(warmup):
      call()
    peak, growth = probe.read(name, base)
    result[name] = dict(first_s=first_s, peak=peak, growth=growth, times=[])
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      result[name]['times'].append(time.perf_counter() - start)
  for r in result.values():
    r['seconds'] = float(np.median(r.pop('times')))
  result['skipped'] = skipped
  return result


class HostPeak:
  """Peak resident memory of this process over a stretch of code (Linux /proc).

  `reset()` clears the kernel's high-water mark (VmHWM, via /proc/self/clear_refs),
  so `peak()` is the largest RSS since then; without /proc both are None.
  """

  @staticmethod
  def _read(field):
    try:
      with open('/proc/self/status') as f:
        return int(re.search(rf'{field}:\s+(\d+) kB', f.read()).group(1)) * 1024
    except (OSError, AttributeError):
      return None

  def rss(self):
    return self._read('VmRSS')

  def reset(self):
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    except OSError:
      return
    return self.rss()

  def peak(self):
    return self._read('VmHWM')


def xla_bytes(compiled) -> int:
  """Bytes a compiled XLA program holds at its peak: arguments, outputs and temporaries,
  less the outputs that reuse (donated) argument buffers."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def xla_flops(lowered) -> float:
  """FLOPs XLA's cost analysis counts in a lowered program (before backend rewrites)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def device_peak_bytes(device):
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return stats.get('peak_bytes_in_use') if stats else None


def _fmt_mb(n):
  if n is None:
    return '-'
  return f'{n / MB:,.0f}' if abs(n) >= 100 * MB else f'{n / MB:.3g}'


# ---------------------------------------------------------------------------
# The model's FLOPs, by hand.


def unet_forward_flops(ucfg) -> int:
  """Multiply-add FLOPs (2 per MAC) of one U-Net forward pass on one image.

  Counts convolutions, dense layers and the two attention matmuls; norms,
  activations, softmax and additions are left out (a few percent, and not
  what the matrix units do).
  """
  flops = 0
  emb = 4 * ucfg.ch

  def conv(res, cin, cout, k=3):
    return 2 * res * res * cin * cout * k * k

  def resblock(res, cin, cout):
    f = conv(res, cin, cout) + 2 * emb * cout + conv(res, cout, cout)
    return f + (conv(res, cin, cout, 1) if cin != cout else 0)

  def attention(res, c):
    n = res * res
    return 4 * 2 * n * c * c + 2 * 2 * n * n * c

  res = ucfg.image_size
  flops += 2 * ucfg.ch * emb + 2 * emb * emb  # timestep MLP
  flops += conv(res, ucfg.in_channels, ucfg.ch)
  widths = [ucfg.ch]
  cin = ucfg.ch
  levels = len(ucfg.ch_mult)
  for level, mult in enumerate(ucfg.ch_mult):
    cout = ucfg.ch * mult
    for _ in range(ucfg.num_res_blocks):
      flops += resblock(res, cin, cout) + (attention(res, cout) if res in ucfg.attn_resolutions else 0)
      cin = cout
      widths.append(cin)
    if level != levels - 1:
      flops += conv(res // 2, cin, cin) if ucfg.resamp_with_conv else 0
      res //= 2
      widths.append(cin)
  flops += 2 * resblock(res, cin, cin) + attention(res, cin)
  for level in reversed(range(levels)):
    cout = ucfg.ch * ucfg.ch_mult[level]
    for _ in range(ucfg.num_res_blocks + 1):
      flops += resblock(res, cin + widths.pop(), cout)
      flops += attention(res, cout) if res in ucfg.attn_resolutions else 0
      cin = cout
    if level != 0:
      res *= 2
      flops += conv(res, cin, cin) if ucfg.resamp_with_conv else 0
  return flops + conv(res, cin, ucfg.out_channels)


# ---------------------------------------------------------------------------
# jaxddpm.


def setup_jaxddpm(config, batch, steps_per_call, sampler, sample_steps, compiler_options):
  """Compiles jaxddpm's train step and sampling step; returns figures and the step calls."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxddpm import factories, models, parallel, solvers, train, train_state  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  mesh = parallel.make_mesh([device])
  replicated = parallel.replicated(mesh)
  model = factories.create_model(config)
  schedule = factories.schedule(config)
  size, channels = int(config.data.image_size), int(config.data.channels)
  result = {'train_images': steps_per_call * batch, 'sample_images': sample_steps * batch}

  # The fresh train state, compiled as train.train_and_evaluate compiles it.
  init = jax.jit(lambda key: train_state.create_train_state(config, model, key),
                 out_shardings=replicated,
                 compiler_options=models.INIT_COMPILER_OPTIONS)
  start = time.perf_counter()
  state = jax.block_until_ready(init(jax.random.key(0)))
  result['init_s'] = time.perf_counter() - start
  result['params'] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

  # Train step: as train.train_and_evaluate jits it (state donated, batch sharded on 'data').
  train_steps = train.make_train_step(config, model, schedule)
  step_fn = jax.jit(train_steps, in_shardings=(replicated, parallel.data_sharding(mesh, batch_axis=1)),
                    out_shardings=(replicated, replicated), donate_argnums=(0,),
                    compiler_options=compiler_options)
  rng = np.random.default_rng(0)
  batches = {'x': rng.uniform(-1, 1, (steps_per_call, batch, size, size, channels)).astype(np.float32),
             'cond': {}}
  if int(config.model.num_classes) > 0:
    batches['cond']['label'] = rng.integers(0, int(config.model.num_classes), (steps_per_call, batch)).astype(np.int32)
  batches = jax.device_put(batches, parallel.data_sharding(mesh, batch_axis=1))
  start = time.perf_counter()
  lowered = step_fn.lower(state, batches)
  compiled = lowered.compile()
  result['train_compile_s'] = time.perf_counter() - start
  result['train_xla_bytes'] = xla_bytes(compiled)
  # A scan's body is counted once: per step, whatever steps_per_call.
  result['train_xla_flops'] = xla_flops(lowered) / batch
  holder = [state]
  del state

  def train_call():
    holder[0], metrics = compiled(holder[0], batches)
    jax.block_until_ready(metrics)

  # The U-Net's forward pass alone: XLA's FLOP count (not compiled). A copy of the
  # params: the train step donates (deletes) the state it is given.
  model_fn = models.make_model_fn(model, jax.tree.map(jnp.copy, holder[0].params))
  x = jnp.zeros((batch, size, size, channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  forward = jax.jit(lambda f, x, t: f(x, t)).lower(model_fn, x, t)
  result['forward_xla_flops'] = xla_flops(forward) / batch

  # Sampling step: a run_chunk of sample_steps steps, compiled once.
  plan = solvers.make_plan(solvers.make_solver(schedule, sampler, num_steps=sample_steps),
                           chunk_length=sample_steps)
  sample_state = plan.init(jax.random.key(1), (batch, size, size, channels))
  start = time.perf_counter()
  run = jax.jit(solvers.run_chunk, compiler_options=compiler_options).lower(
      plan, model_fn, sample_state, 0).compile()
  result['sample_compile_s'] = time.perf_counter() - start
  result['sample_xla_bytes'] = xla_bytes(run)

  def sample_call():
    jax.block_until_ready(run(plan, model_fn, sample_state, 0))

  result['train'], result['sample'] = train_call, sample_call
  return result


def sampling_memory(config, batch, step_counts):
  """[(steps, XLA program bytes, host peak bytes above the start or None)] of whole-plan DDIM runs."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxddpm import factories, models, solvers  # pylint: disable=g-import-not-at-top

  host = HostPeak()
  device = jax.devices()[0]
  model = factories.create_model(config)
  size, channels = int(config.data.image_size), int(config.data.channels)
  params = models.init_params(model, jax.random.key(0))
  model_fn = models.make_model_fn(model, params)
  schedule = factories.schedule(config)
  rows = []
  for steps in step_counts:
    plan = solvers.make_plan(solvers.make_solver(schedule, 'ddim', num_steps=steps),
                             chunk_length=steps)
    state = plan.init(jax.random.key(1), (batch, size, size, channels))
    run = jax.jit(solvers.run_chunk).lower(plan, model_fn, state, 0).compile()
    base = host.reset()
    jax.block_until_ready(run(plan, model_fn, state, 0))
    # The device's peak_bytes_in_use cannot be reset, so only the host's is measured per run.
    peak = host.peak() - base if device.platform == 'cpu' and base is not None else None
    rows.append((steps, xla_bytes(run), peak))
  return rows


# ---------------------------------------------------------------------------
# diffusers.


def diffusers_unet_kwargs(ucfg) -> dict[str, Any]:
  """UNet2DModel(**kwargs) of the same architecture as `UNet(ucfg)`.

  The inverse of `jaxddpm.convert.model_fields_from_diffusers`, which the
  caller uses to check it.
  """
  levels = len(ucfg.ch_mult)
  attn = [ucfg.image_size // 2 ** level in ucfg.attn_resolutions for level in range(levels)]
  if ucfg.num_heads != 1 and not ucfg.num_head_channels:
    raise ValueError('diffusers sets attention heads by head width (num_head_channels)')
  return dict(
      sample_size=ucfg.image_size, in_channels=ucfg.in_channels, out_channels=ucfg.out_channels,
      block_out_channels=tuple(ucfg.ch * m for m in ucfg.ch_mult),
      layers_per_block=ucfg.num_res_blocks,
      down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn),
      up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)),
      attention_head_dim=ucfg.num_head_channels or None, norm_num_groups=ucfg.norm_groups,
      norm_eps=ucfg.norm_eps, flip_sin_to_cos=ucfg.flip_sin_to_cos, freq_shift=ucfg.freq_shift,
      downsample_padding=0 if ucfg.downsample_padding == 'same' else 1, dropout=ucfg.dropout,
      num_class_embeds=ucfg.num_classes or None)


def _check_mapping(ucfg, kwargs):
  from jaxddpm import convert  # pylint: disable=g-import-not-at-top
  fields = convert.model_fields_from_diffusers(kwargs)['model']
  for name, value in fields.items():
    ours = getattr(ucfg, name)
    if (tuple(ours) if isinstance(ours, (list, tuple)) else ours) != value:
      raise ValueError(f'diffusers mapping disagrees with jaxddpm.convert on {name}: {ours} vs {value}')


def setup_diffusers(config, ucfg, batch, sampler, sample_steps, dtype, compiled, device_name):
  """diffusers' UNet2DModel of the same architecture; returns the step calls.

  The train step mirrors jaxddpm's: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample,
  MSE(eps_theta(x_t, t), eps), clip_grad_norm_, Adam, EMA (lerp). The sampling
  step is a diffusers DDIMScheduler / DDPMScheduler step after the U-Net. With
  compiled=True the U-Net runs under torch.compile (compiled by the first call
  of each step).
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  kwargs = diffusers_unet_kwargs(ucfg)
  _check_mapping(ucfg, kwargs)
  dev = torch.device(device_name)
  optim = config.optim
  diff = config.diffusion
  autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == 'bfloat16'
              else contextlib.nullcontext())
  sched_kwargs = dict(num_train_timesteps=int(diff.num_timesteps), beta_start=float(diff.beta_start),
                      beta_end=float(diff.beta_end), beta_schedule=str(diff.beta_schedule))
  ema_decay = float(optim.ema_decay)
  shape = (batch, ucfg.in_channels, ucfg.image_size, ucfg.image_size)

  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(**kwargs).to(dev)
  net = torch.compile(unet) if compiled else unet
  params = list(unet.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=float(optim.lr), betas=(float(optim.beta1), float(optim.beta2)),
                         eps=float(optim.eps))
  abar = torch.as_tensor(diffusers.DDPMScheduler(**sched_kwargs).alphas_cumprod, device=dev)
  x0 = torch.rand(shape, device=dev) * 2 - 1
  y = torch.randint(0, ucfg.num_classes, (batch,), device=dev) if ucfg.num_classes else None
  scheduler = getattr(diffusers, _DIFFUSERS_SCHEDULERS[sampler])(**sched_kwargs)
  scheduler.set_timesteps(sample_steps)
  x_T = torch.randn(shape, device=dev)

  def sync():
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  def train_call():
    unet.train()
    t = torch.randint(0, abar.shape[0], (batch,), device=dev)
    eps = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = net(xt, t, class_labels=y).sample
    loss = (out.float()[:, :ucfg.in_channels] - eps).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, float(optim.grad_clip))
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - ema_decay)  # pylint: disable=protected-access
    sync()

  def sample_call():
    unet.eval()
    x = x_T
    with torch.inference_mode(), autocast:
      for t in scheduler.timesteps:
        eps = net(x, t, class_labels=y).sample.float()[:, :ucfg.in_channels]
        x = scheduler.step(eps, t, x).prev_sample
    sync()

  return {'params': sum(p.numel() for p in params), 'train': train_call, 'sample': sample_call,
          'train_images': batch, 'sample_images': sample_steps * batch}


# ---------------------------------------------------------------------------
# Report.


def _config_name(flag):
  path = config_flags.get_config_filename(flags.FLAGS[flag])
  return os.path.relpath(path, REPO_ROOT) if os.path.isabs(path) else path


def peak_tflops(device) -> float | None:
  if _PEAK_TFLOPS.value > 0:
    return _PEAK_TFLOPS.value
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return tflops
  return None


class MemoryProbe:
  """Peak memory of one implementation's first calls: host RSS on the CPU, device bytes on a GPU.

  On a GPU, jaxddpm's figure is JAX's peak_bytes_in_use so far (it cannot be
  reset; XLA's account of each program is the column beside it) and
  diffusers' is torch.cuda.max_memory_allocated, reset before each.
  """

  def __init__(self, jax_device, torch_module=None):
    self.host = HostPeak()
    self.jax_device = jax_device
    self.torch = torch_module

  def reset(self):
    if self.torch is not None and self.jax_device.platform != 'cpu':
      self.torch.cuda.reset_peak_memory_stats()
    return self.host.reset()

  def read(self, name, base):
    if self.jax_device.platform == 'cpu':
      peak = self.host.peak()
      return peak, (None if base is None or peak is None else peak - base)
    if name == 'jaxddpm':
      return device_peak_bytes(self.jax_device), None
    return self.torch.cuda.max_memory_allocated(), None


def main(argv):
  del argv
  if _THREADS.value > 0:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS.value])
  cores = len(os.sched_getaffinity(0))
  from jaxddpm import runtime  # pylint: disable=g-import-not-at-top
  malloc_tuned = _TUNING.value and runtime.keep_freed_host_memory()
  import jax  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  config.training.steps_per_call = _STEPS_PER_CALL.value
  config.training.batch_size = _BATCH.value
  from jaxddpm import factories  # pylint: disable=g-import-not-at-top
  ucfg = factories.model_config(config)
  batch, warmup, repeats = _BATCH.value, _WARMUP.value, _REPEATS.value
  device = jax.devices()[0]
  platform = device.platform
  where = (f'{platform} ({device.device_kind}, {cores} cores)' if platform == 'cpu'
           else f'{platform} ({device.device_kind})')
  print(f'{_config_name("config")}: batch {batch}, {ucfg.dtype}, {where}, jax {jax.__version__}; '
        f'median of {repeats} interleaved calls after {warmup} warm-up')

  compiler_options = runtime.step_compiler_options() if _TUNING.value else {}
  print(f'jaxddpm.runtime: glibc keeps freed memory: {bool(malloc_tuned)}; XLA compiler_options '
        f'of the steps: {compiler_options}')
  entries = {'jaxddpm': setup_jaxddpm(config, batch, _STEPS_PER_CALL.value, _SAMPLER.value,
                                      _SAMPLE_STEPS.value, compiler_options)}
  jx = entries['jaxddpm']
  print(f'jaxddpm U-Net: {jx["params"]:,} params; init (create_train_state, compile + run) '
        f'{jx["init_s"]:.1f} s; {_STEPS_PER_CALL.value} train step(s) per call')

  torch = None
  if not _TORCH.value:
    print('diffusers: not timed (--notorch)')
  else:
    try:
      import diffusers  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("diffusers: not timed (torch/diffusers not installed: pip install -e '.[torch]')")
  if torch is not None:
    torch_device = 'cpu' if platform == 'cpu' else ('cuda' if torch.cuda.is_available() else None)
    if torch_device is None:
      print(f'diffusers: not timed (torch has no {platform})')
      torch = None
    else:
      if torch_device == 'cpu':
        torch.set_num_threads(cores)
      for name, compiled in (('diffusers eager', False), ('diffusers compiled', True)):
        if compiled and not _TORCH_COMPILE.value:
          continue
        entries[name] = setup_diffusers(config, ucfg, batch, _SAMPLER.value, _SAMPLE_STEPS.value,
                                        ucfg.dtype, compiled, torch_device)
      print(f'diffusers UNet2DModel on {torch_device}: {entries["diffusers eager"]["params"]:,} params, '
            f'torch {torch.__version__}, diffusers {diffusers.__version__}, '
            f'{torch.get_num_threads()} torch threads')

  probe = MemoryProbe(device, torch)
  peak_name = 'peak RSS MB (+growth)' if platform == 'cpu' else 'device peak MB'
  print(f'{"":28s} {"images/s":>9s} {"ms/step":>9s} {"compile s":>10s} {"XLA MB":>8s}  {peak_name}')
  images_s = {}
  for phase in ('train', 'sample'):
    timed = time_interleaved({name: e[phase] for name, e in entries.items()}, warmup, repeats, probe,
                             optional=('diffusers compiled',))
    for name, r in timed.items():
      if name == 'skipped':
        continue
      rate = entries[name][f'{phase}_images'] / r['seconds']
      images_s[phase, name] = rate
      if name == 'jaxddpm':
        compile_s, xla_b = jx[f'{phase}_compile_s'], jx[f'{phase}_xla_bytes']
      else:
        compile_s, xla_b = (r['first_s'] if name.endswith('compiled') else None), None
      label = f'{phase:7s} {name}' + (f' {_SAMPLER.value}' if phase == 'sample' and name == 'jaxddpm' else '')
      growth = '' if r['growth'] is None else f' ({"-" if r["growth"] < 0 else "+"}{_fmt_mb(abs(r["growth"]))})'
      comp = '-' if compile_s is None else f'{compile_s:.1f}'
      print(f'{label:28s} {rate:9.2f} {1e3 * batch / rate:9.1f} {comp:>10s} {_fmt_mb(xla_b):>8s}  '
            f'{_fmt_mb(r["peak"])}{growth}')
    for name, why in timed['skipped'].items():
      print(f'{phase:7s} {name}: skipped ({why})')
  if 'diffusers compiled' in entries:
    print('compile s of diffusers compiled: its first call; jaxddpm compiles ahead of the first call')
  for name in entries:
    if name != 'jaxddpm' and ('train', name) in images_s and ('sample', name) in images_s:
      print(f'ratio jaxddpm / {name} (images/s, > 1: jaxddpm faster): '
            f'train {images_s["train", "jaxddpm"] / images_s["train", name]:.2f}, '
            f'sample {images_s["sample", "jaxddpm"] / images_s["sample", name]:.2f}')

  fwd = unet_forward_flops(ucfg)
  print(f'forward GFLOP/image: {fwd / 1e9:.4g} counted (convs, dense, attention matmuls), '
        f'{jx["forward_xla_flops"] / 1e9:.4g} XLA cost analysis (which skips the zero padding); '
        f'train step XLA: {jx["train_xla_flops"] / 1e9:.4g} GFLOP/image '
        f'({jx["train_xla_flops"] / jx["forward_xla_flops"]:.2f}x forward)')
  train_tflops = 3 * fwd * images_s['train', 'jaxddpm'] / 1e12
  sample_tflops = fwd * images_s['sample', 'jaxddpm'] / 1e12
  peak = peak_tflops(device) if platform != 'cpu' else None
  mfu = '' if peak is None else (f'; MFU vs {peak:.0f} TFLOP/s bf16 dense peak: train '
                                 f'{100 * train_tflops / peak:.1f}%, sample {100 * sample_tflops / peak:.1f}%')
  print(f'jaxddpm model TFLOP/s (train image = 3x forward): train {train_tflops:.3f}, '
        f'sample {sample_tflops:.3f}{mfu}')

  if _MEMORY_STEPS.value:
    steps = [int(s) for s in _MEMORY_STEPS.value]
    rows = sampling_memory(_MEMORY_CONFIG.value, _MEMORY_BATCH.value, steps)
    print(f'sampling memory, {_config_name("memory_config")} batch {_MEMORY_BATCH.value} DDIM '
          '(one lax.scan over all steps): ' + '; '.join(
              f'{s} steps: XLA {_fmt_mb(b)} MB' + ('' if p is None else f', process peak +{_fmt_mb(p)} MB')
              for s, b, p in rows))


if __name__ == '__main__':
  app.run(main)
