"""Text conditioning of the U-Net: cross-attention, the joint text transformer, caption dropout."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm.models import conditioning
from jaxddpm.models import layers
from jaxddpm.models import text as text_lib
from jaxddpm.models import unet


def _random(module, *inputs, seed=0):
  """Random params with O(1) activations (NumPy draws; nothing starts at zero)."""
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    if len(spec.shape) >= 2:
      return (rng.standard_normal(spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))).astype(np.float32)
    base = 1.0 if path[-1].key == 'scale' else 0.0
    return (base + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)['params'])
  return jax.tree.map_with_path(draw, abstract)


def test_cross_attention_against_a_float64_derivation():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
  context = rng.standard_normal((2, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], np.int32)
  block = layers.CrossAttnBlock(num_heads=2, norm_groups=2)
  params = _random(block, x, context, mask)
  out = block.apply({'params': params}, x, context, mask)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  g = x.astype(np.float64).reshape(2, 6, 2, 4)  # GroupNorm with 2 groups over positions
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  n = ((g - mean) / np.sqrt(var + 1e-6)).reshape(2, 6, 8) * p['norm']['scale'] + p['norm']['bias']
  q = (n @ p['q']['kernel'] + p['q']['bias']).reshape(2, 6, 2, 4)
  k = (context @ p['k']['kernel'] + p['k']['bias']).reshape(2, 5, 2, 4)
  v = (context @ p['v']['kernel'] + p['v']['bias']).reshape(2, 5, 2, 4)
  logits = np.where(mask[:, None, None, :] > 0, np.einsum('bihd,bjhd->bhij', q, k) / 2.0, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = np.einsum('bhij,bjhd->bihd', w, v).reshape(2, 6, 8)
  ref = x + (h @ p['proj_out']['kernel'] + p['proj_out']['bias']).reshape(x.shape)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def _context_config(**kw):
  return unet.UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2),
                         num_res_blocks=1, attn_resolutions=(4,), norm_groups=4, **kw)


def test_all_masked_context_is_the_unconditional_path():
  """A fully masked context and a zero pooled feature (the null values) give exactly the
  network without text input, and a real context changes the output."""
  cfg = _context_config(context_dim=6, pooled_dim=5, context_dropout=0.1)
  model = unet.UNet(cfg)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 700])
  context = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
  full = {'context': context, 'context_mask': jnp.ones((2, 4), jnp.int32),
          'pooled': jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)}
  params = _random(model, x, t, full)
  apply = lambda cond: model.apply({'params': params}, x, t, cond)
  nulled = conditioning.null(full, cfg.cond_spec())
  np.testing.assert_array_equal(nulled['context_mask'], 0)
  np.testing.assert_allclose(apply(nulled), apply({}), rtol=1e-6, atol=1e-6)
  assert np.abs(apply(full) - apply({})).max() > 1e-2


def _text_config(**kw):
  text = text_lib.TextConfig(vocab_size=11, max_length=6, width=8, num_layers=1, num_heads=2,
                             null_tokens=(2, 3, 0, 0, 0, 0), caption_dropout=0.1)
  return _context_config(text=text, **kw), text


def test_text_model_missing_tokens_are_the_empty_prompt_and_tokens_matter():
  cfg, text = _text_config(image_width=16)
  model = unet.UNet(cfg)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 16, 1)), jnp.float32)
  t = jnp.asarray([10, 500])
  tokens = jnp.asarray([[2, 5, 7, 3, 0, 0], [2, 9, 3, 0, 0, 0]], jnp.int32)
  params = _random(model, x, t, {'tokens': tokens})
  apply = lambda cond: model.apply({'params': params}, x, t, cond)
  out = apply({'tokens': tokens})
  assert out.shape == (2, 8, 16, 1)
  empty = jnp.asarray([text.null_tokens] * 2, jnp.int32)
  np.testing.assert_array_equal(apply({}), apply({'tokens': empty}))
  assert np.abs(out - apply({'tokens': empty})).max() > 1e-2
  np.testing.assert_array_equal(conditioning.null({'tokens': tokens}, cfg.cond_spec())['tokens'],
                                empty)


def test_text_transformer_masks_padding_and_pools_the_real_tokens():
  text = text_lib.TextConfig(vocab_size=11, max_length=6, width=8, num_layers=2, num_heads=2,
                             null_tokens=(2, 3, 0, 0, 0, 0))
  module = text_lib.TextTransformer(text)
  tokens = jnp.asarray([[2, 5, 7, 3, 0, 0]], jnp.int32)
  params = _random(module, tokens)
  context, mask, pooled = module.apply({'params': params}, tokens)
  np.testing.assert_array_equal(mask, tokens != 0)
  np.testing.assert_allclose(pooled[0], np.asarray(context)[0, :4].mean(0), rtol=1e-5, atol=1e-6)
  # A padding key is masked: moving the padding's position embeddings changes nothing real.
  moved = dict(params)
  moved['position_embed'] = params['position_embed'].copy()
  moved['position_embed'][4:] += 3.0
  context2, _, pooled2 = module.apply({'params': moved}, tokens)
  np.testing.assert_allclose(context2[0, :4], context[0, :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled2, pooled, rtol=1e-5, atol=1e-6)


def test_caption_dropout_reaches_the_null_prompt_at_the_configured_rate():
  cfg, text = _text_config()
  n = 20000
  tokens = jnp.tile(jnp.asarray([[2, 5, 7, 3, 0, 0]], jnp.int32), (n, 1))
  dropped = conditioning.drop({'tokens': tokens}, cfg.cond_spec(), jax.random.key(4))['tokens']
  is_null = np.all(np.asarray(dropped) == np.asarray(text.null_tokens), axis=1)
  kept = np.all(np.asarray(dropped) == np.asarray(tokens), axis=1)
  assert np.all(is_null | kept)
  rate = is_null.mean()
  assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n), rate

