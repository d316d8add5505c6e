"""A tiny BatchNorm backbone for the SSL tests (compiles in about a second)."""
import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.common import batch_norm, model_output


class TinyNet(nn.Module):
    num_classes: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2), name="conv")(x)
        x = nn.relu(batch_norm(train, name="bn")(x))
        h = jnp.mean(x, axis=(1, 2))
        return model_output(nn.Dense(self.num_classes, name="linear")(h), {"penultimate": h}, features)
