"""The U-Net's convolution: lax's value and gradient, in the layout XLA:CPU runs fast in loops."""

import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm.models import layers

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv, stride, padding):
  def loss(x, w):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dn)))
  return loss


@pytest.mark.parametrize('size,kernel,stride,padding', [
    (8, 3, 1, 'SAME'),
    (8, 3, 2, 'SAME'),  # the DDPM downsampling conv (TF 'SAME': pad 0 before, 1 after)
    (8, 3, 2, ((1, 1), (1, 1))),  # diffusers' downsample_padding=1
    (7, 3, 2, 'SAME'),
    (7, 3, 2, ((1, 1), (1, 1))),
    (8, 1, 1, 'SAME'),  # nin_shortcut
    (9, 3, 2, 'VALID'),
    (6, 3, 1, ((2, 0), (0, 2))),
])
def test_value_and_gradient_are_lax(size, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)), jnp.float32)
  ours = jax.jit(jax.value_and_grad(_loss(layers.conv_general_dilated, stride, padding), (0, 1)))
  ref = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, stride, padding), (0, 1)))
  (value, grads), (ref_value, ref_grads) = ours(x, w), ref(x, w)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_gradient_convolutions_inside_scan_are_canonical():
  """Every convolution of a scanned gradient step is NHWC x HWIO -> NHWC after XLA's passes.

  XLA:CPU runs convolutions in any other layout inside loops through a slow
  generic emitter (jax-ml/jax#12868): a train step 20-50x slower.
  """
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 4))

  def step(w, _):
    loss = lambda w: jnp.sum(layers.conv(4, 'c', strides=2).apply({'params': {'kernel': w, 'bias': jnp.zeros(4)}}, x) ** 2)
    return w - 1e-3 * jax.grad(loss)(w), None

  hlo = jax.jit(lambda w: lax.scan(step, w, None, length=2)[0]).lower(w).compile().as_text()
  labels = re.findall(r'dim_labels=(\S+?)[,}]', hlo)
  assert labels, 'no convolution found in the compiled step'
  assert set(labels) == {'b01f_01io->b01f'}, labels
