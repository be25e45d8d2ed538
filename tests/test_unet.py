"""The DDPM U-Net: size, embedding, attention and init against references; dtype and remat."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar
from configs import tiny
from jaxddpm.models import conditioning
from jaxddpm import models
from jaxddpm.models import layers
from jaxddpm import factories


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(model, image_size, channels):
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))


def _random_params(module, *inputs, seed=0):
  """Random params with O(1) activations, drawn in NumPy for `module` on `inputs`
  (default: an 8x8 grey image and a timestep): no compiled initialiser, which XLA
  builds slowly on CPU."""
  if not inputs:
    inputs = (jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    if len(spec.shape) >= 2:  # kernels / embeddings: unit-variance activations
      w = rng.standard_normal(spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))
    else:
      w = (1.0 if path[-1].key == 'scale' else 0.0) + 0.1 * rng.standard_normal(spec.shape)
    return w.astype(np.float32)

  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)['params'])
  return jax.tree.map_with_path(draw, abstract)


def _tiny(**overrides):
  config = tiny.get_config()
  for k, v in overrides.items():
    setattr(config.model, k, v)
  return config


def test_cifar_param_count_is_the_papers():
  config = cifar.get_config()
  model = factories.create_model(config)
  assert _count(_abstract_params(model, 32, 3)) == 35_746_307


def test_learned_variance_doubles_output_channels():
  config = cifar.get_config()
  config.diffusion.model_var_type = 'learned_range'
  ucfg = factories.model_config(config)
  assert (ucfg.in_channels, ucfg.out_channels) == (3, 6)
  # Only conv_out grows: 3 more output channels of a 3x3x128 conv and their biases.
  count = _count(_abstract_params(models.UNet(ucfg), 32, 3))
  assert count == 35_746_307 + 3 * (3 * 3 * 128 + 1)


def test_config_accepts_lists_from_json():
  a = models.UNetConfig(ch_mult=[1, 2], attn_resolutions=[16])
  b = models.UNetConfig(ch_mult=(1, 2), attn_resolutions=(16,))
  assert a == b and hash(a) == hash(b)
  assert a.ch_mult == (1, 2)


@pytest.mark.parametrize('dim,flip,shift', [(128, False, 1), (64, True, 0), (33, False, 1)])
def test_timestep_embedding_matches_numpy(dim, flip, shift):
  t = np.array([0, 1, 17, 999], np.int64)
  half = dim // 2
  freqs = np.exp(-math.log(10_000) * np.arange(half, dtype=np.float64) / (half - shift))
  args = t[:, None].astype(np.float64) * freqs[None]
  parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
  expected = np.concatenate(parts + [np.zeros((len(t), dim % 2))], axis=1)
  got = layers.timestep_embedding(jnp.asarray(t, jnp.int32), dim, flip_sin_to_cos=flip, freq_shift=shift)
  assert got.shape == (4, dim) and got.dtype == jnp.float32
  # float32 arguments up to 999 rad: absolute error ~ 999 * 2^-24.
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def _group_norm_float64(x, scale, bias, groups, eps):
  b, c = x.shape[0], x.shape[-1]
  g = np.asarray(x, np.float64).reshape(b, -1, groups, c // groups)
  y = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
  return y.reshape(x.shape) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize('shape,groups,offset', [((2, 4, 4, 8), 4, 0.0), ((3, 2, 5, 12), 3, 0.0),
                                                  ((2, 4, 4, 8), 2, 1000.0), ((2, 6, 8), 8, 0.0)])
def test_group_norm_matches_float64(shape, groups, offset):
  """Wu & He (2018) eq. 1 per group over positions and the group's channels, two-pass variance.

  offset=1000: a mean 1000 times the spread, where a one-pass E[x^2] - E[x]^2 in
  float32 would lose every digit of the variance.
  """
  rng = np.random.default_rng(0)
  x = (offset + rng.standard_normal(shape)).astype(np.float32)
  scale = rng.standard_normal(shape[-1]).astype(np.float32)
  bias = rng.standard_normal(shape[-1]).astype(np.float32)
  module = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
  got = module.apply({'params': {'scale': scale, 'bias': bias}}, x)
  assert got.dtype == jnp.float32 and got.shape == shape
  np.testing.assert_allclose(np.asarray(got), _group_norm_float64(x, scale, bias, groups, 1e-6),
                             rtol=0, atol=2e-3 if offset else 2e-5)
  # bfloat16 compute: float32 statistics, output rounded once to bfloat16.
  got16 = layers.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.bfloat16).apply(
      {'params': {'scale': scale, 'bias': bias}}, x)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(got), rtol=1e-2, atol=2e-2)


def test_group_norm_gradient_matches_flax():
  """The same function as flax.linen.GroupNorm (two-pass): value and gradient."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8)) * 2 + 0.5
  params = {'params': {'scale': jnp.linspace(0.5, 1.5, 8), 'bias': jnp.linspace(-1, 1, 8)}}
  ours = layers.GroupNorm(num_groups=4, epsilon=1e-6)
  ref = nn.GroupNorm(num_groups=4, epsilon=1e-6, use_fast_variance=False)

  def loss(m, p, x):
    return jnp.sum(jnp.sin(m.apply(p, x)) * x)

  for a, b in zip(jax.grad(functools.partial(loss, ours), argnums=(0, 1))(params, x),
                  jax.grad(functools.partial(loss, ref), argnums=(0, 1))(params, x)):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)


def test_group_norm_rejects_indivisible_channels():
  with pytest.raises(ValueError, match='6 channels do not split into 4 groups'):
    layers.GroupNorm(num_groups=4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


@pytest.mark.parametrize('num_heads', [1, 2])
def test_attention_matches_numpy(num_heads):
  block = layers.AttnBlock(num_heads=num_heads, norm_groups=4)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
  p = _random_params(block, x)
  got = np.asarray(jax.jit(block.apply)({'params': p}, x))

  xs = np.asarray(x, np.float64)
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, h, w, c = xs.shape
  g = xs.reshape(b, h * w, 4, c // 4)  # GroupNorm, 4 groups
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-6)
  n = g.reshape(b, h * w, c) * pn['norm']['scale'] + pn['norm']['bias']
  q, k, v = (n @ pn[name]['kernel'] + pn[name]['bias'] for name in ('q', 'k', 'v'))
  d = c // num_heads
  out = np.zeros_like(q)
  for head in range(num_heads):
    sl = slice(head * d, (head + 1) * d)
    logits = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / math.sqrt(d)
    wts = np.exp(logits - logits.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    out[..., sl] = wts @ v[..., sl]
  expected = xs + (out @ pn['proj_out']['kernel'] + pn['proj_out']['bias']).reshape(b, h, w, c)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# One small model shared by most tests: equal models and shapes reuse the compiled functions.
BASE = factories.create_model(_tiny(dropout=0.1))
X = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
T = jnp.array([3, 77])


@functools.cache
def _base_params():
  return _random_params(BASE)


def test_init_follows_the_reference():
  """fan_avg uniform variance scaling; residual branch ends and conv_out start at ~0."""
  # An 'rbg' key: the same initialisers, but XLA compiles it in a fraction of threefry's time.
  params = models.init_params(BASE, jax.random.key(0, impl='rbg'))
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params))
  near_zero = [params['conv_out']['kernel'], params['mid_attn']['proj_out']['kernel'],
               params['down_0_block_0']['conv2']['kernel'], params['up_1_block_1']['conv2']['kernel']]
  for w in near_zero:
    assert float(jnp.max(jnp.abs(w))) < 1e-4
  w = np.asarray(params['up_1_block_0']['conv1']['kernel'])  # [3, 3, 64, 32]
  fan_avg = 9 * (64 + 32) / 2
  limit = math.sqrt(3.0 / fan_avg)
  assert np.abs(w).max() <= limit
  np.testing.assert_allclose(w.var(), 1.0 / fan_avg, rtol=0.05)
  # Every residual branch starts near zero, so the initial network outputs ~0.
  out = models.make_model_fn(BASE, params)(X, T)
  assert out.shape == (2, 8, 8, 1) and float(jnp.max(jnp.abs(out))) < 1e-3


def test_bfloat16_compute_is_close_to_float32():
  bf16 = factories.create_model(_tiny(dropout=0.1, dtype='bfloat16'))
  params = _base_params()
  # Same parameter tree, kept in float32, whatever the compute dtype.
  chex.assert_trees_all_equal_shapes_and_dtypes(params, _abstract_params(bf16, 8, 1))
  out32 = np.asarray(models.make_model_fn(BASE, params)(X, T))
  out16 = models.make_model_fn(bf16, params)(X, T)
  assert out16.dtype == jnp.float32  # the output is cast back for the diffusion math
  scale = np.abs(out32).max()
  err = np.abs(np.asarray(out16) - out32)
  # bfloat16 has an 8-bit mantissa (eps 2^-8 ~ 0.4%); a dozen layers deep, a few eps.
  assert err.max() < 0.05 * scale and err.mean() < 0.01 * scale, (err.max(), err.mean(), scale)


def _grads(model, params):
  def loss(p):
    fn = models.make_model_fn(model, p, train=True, dropout_rng=jax.random.key(3))
    return jnp.sum(fn(X, T) ** 2)
  return jax.jit(jax.grad(loss))(params)


def test_remat_gives_the_same_gradients():
  # One level (ResBlocks, attention, middle) keeps the two gradient compiles short.
  overrides = dict(dropout=0.1, ch_mult=(1,), attn_resolutions=(8,))
  plain = factories.create_model(_tiny(**overrides))
  remat = factories.create_model(_tiny(remat=True, **overrides))
  params = _random_params(plain)
  chex.assert_trees_all_equal_shapes(params, _abstract_params(remat, 8, 1))
  g_plain, g_remat = _grads(plain, params), _grads(remat, params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_plain))
  # Same math and the same dropout masks; only XLA's float32 operation order may differ.
  chex.assert_trees_all_close(g_remat, g_plain, rtol=1e-5, atol=1e-6 * scale)


def test_dropout_only_in_training():
  params = _base_params()
  eval_out = models.make_model_fn(BASE, params)(X, T)
  train_a = models.make_model_fn(BASE, params, train=True, dropout_rng=jax.random.key(1))(X, T)
  train_b = models.make_model_fn(BASE, params, train=True, dropout_rng=jax.random.key(1))(X, T)
  train_c = models.make_model_fn(BASE, params, train=True, dropout_rng=jax.random.key(2))(X, T)
  chex.assert_trees_all_equal(train_a, train_b)
  assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_c)
  with pytest.raises(ValueError, match='dropout_rng'):
    models.make_model_fn(BASE, params, train=True)


def test_class_conditioning_and_null_class():
  model = factories.create_model(_tiny(num_classes=3, class_dropout=1.0))
  params = _random_params(model)
  assert params['class_embed']['embedding'].shape == (4, 64)  # 3 classes + the null class
  fn = models.make_model_fn(model, params)
  null = fn(X, T, {'label': jnp.array([3, 3])})
  chex.assert_trees_all_equal(fn(X, T), null)  # no label is the null class
  chex.assert_trees_all_equal(fn(X, T, {}), null)
  assert not np.allclose(fn(X, T, {'label': jnp.array([0, 1])}), null)
  # The network never drops labels itself, even in training mode with class_dropout=1:
  # dropout is the objective's, through cond_spec() and conditioning.drop.
  train_fn = models.make_model_fn(model, params, train=True, dropout_rng=jax.random.key(5))
  chex.assert_trees_all_close(train_fn(X, T, {'label': jnp.array([0, 1])}),
                              fn(X, T, {'label': jnp.array([0, 1])}), atol=1e-6)
  spec = model.config.cond_spec()
  assert spec == {'label': conditioning.Label(3, dropout=1.0)}
  dropped = conditioning.drop({'label': jnp.array([0, 1])}, spec, jax.random.key(5))
  chex.assert_trees_all_equal(fn(X, T, dropped), null)
  with pytest.raises(ValueError, match=r"unexpected conditioning key\(s\) \['low_res'\]"):
    fn(X, T, {'label': jnp.array([0, 1]), 'low_res': X})
  with pytest.raises(TypeError, match='cond must be a dict'):
    fn(X, T, jnp.array([0, 1]))
  # Told to, the network ignores a key it was not built for.
  tolerant = factories.create_model(_tiny(num_classes=3, ignore_cond_keys=('low_res',)))
  chex.assert_trees_all_equal(
      models.make_model_fn(tolerant, params)(X, T, {'label': jnp.array([0, 1]), 'low_res': X}),
      fn(X, T, {'label': jnp.array([0, 1])}))


def test_biggan_resample_blocks_start_as_pool_and_upsample():
  """With conv2 at ~0 a same-width ResBlock is its shortcut: avg-pool down, nearest up."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  temb = jax.random.normal(jax.random.key(1), (2, 16))
  for resample, reference in [('down', layers.avg_pool_2x2), ('up', layers.upsample_nearest)]:
    block = layers.ResBlock(8, norm_groups=4, resample=resample)
    out, _ = jax.jit(block.init_with_output)(jax.random.key(2, impl='rbg'), x, temb)
    chex.assert_trees_all_close(out, reference(x), atol=1e-4)
  np.testing.assert_allclose(layers.avg_pool_2x2(x)[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_array_equal(layers.upsample_nearest(x)[:, 3, 2], x[:, 1, 1])


def test_resampling_variants():
  updown = factories.create_model(_tiny(resblock_updown=True))
  params = _random_params(updown)
  assert set(params['down_0_downsample']) == {'norm1', 'conv1', 'temb_proj', 'norm2', 'conv2'}
  out = models.make_model_fn(updown, params)(X, T)
  assert out.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
  # Without resampling convs, down/upsampling has no parameters at all.
  plain = _abstract_params(factories.create_model(_tiny(resamp_with_conv=False)), 8, 1)
  assert not {'down_0_downsample', 'up_1_upsample'} & set(plain)
  assert _count(plain) == _count(_abstract_params(BASE, 8, 1)) - (9 * 16 * 16 + 16) - (9 * 32 * 32 + 32)


def test_bad_inputs_are_clear_errors():
  fn = models.make_model_fn(BASE, _base_params())
  with pytest.raises(ValueError, match='divisible by 2'):
    fn(jnp.zeros((1, 7, 7, 1)), jnp.array([0]))
  with pytest.raises(ValueError, match=r"unexpected conditioning key\(s\) \['label'\]; this model "
                     r'takes none \(unconditional\)'):
    fn(X, T, {'label': jnp.array([0, 0])})
  with pytest.raises(ValueError, match='norm_groups'):
    models.UNetConfig(ch=24, norm_groups=32)
