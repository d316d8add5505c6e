"""On-device data augmentation: random pad-and-crop and horizontal flip, per sample, inside the jitted step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
    """Zero-pad each image by `padding` and cut a random crop of the original size (torchvision RandomCrop)."""
    B, H, W, C = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (B, 2), 0, 2 * padding + 1)
    crop = lambda img, o: lax.dynamic_slice(img, (o[0], o[1], 0), (H, W, C))
    return jax.vmap(crop)(xp, offsets)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def augment(key: jax.Array, x: jax.Array, kind: str, padding: int = 4) -> jax.Array:
    """kind: none | flip | crop | crop_flip (validated by the config)."""
    k_crop, k_flip = jax.random.split(key)
    if "crop" in kind:
        x = random_crop(k_crop, x, padding)
    if "flip" in kind:
        x = random_flip(k_flip, x)
    return x
