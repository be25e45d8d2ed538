"""A denoiser small enough to check update rules by hand, following the model contract
(`jaxddpm.models`: a Module with a typed `config` giving `cond_spec()` and `example_inputs`)."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  image_size: int = 4
  channels: int = 1
  out_channels: int = 1

  def cond_spec(self):
    return {}

  def example_inputs(self, batch: int = 1):
    x = jnp.zeros((batch, self.image_size, self.image_size, self.channels), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), {}


class ToyModel(nn.Module):
  """eps_theta(x, t) = a * x + b(t), with 2C outputs (x tiled) for the learned variances."""
  config: ToyConfig = ToyConfig()

  @nn.compact
  def __call__(self, x, t, cond=None, *, train=False):
    del cond, train
    out = self.config.out_channels
    a = self.param('a', nn.initializers.constant(0.5), (out,))
    b = nn.Embed(100, out)(t)
    return a * jnp.tile(x, (1, 1, 1, out // x.shape[-1])) + b[:, None, None, :]
