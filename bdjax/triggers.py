"""Backdoor triggers as pure, jittable, vmappable functions.

A trigger is a small pytree: a `pattern` (h, w, C) in [0, 1] and a `mask` (h, w, 1) in [0, 1] saying how much
of each pixel the pattern replaces (1 = opaque). Every trigger kind (patch, alpha patch, image file, single
pixel, pixel pattern, full-image blend) is this one object, stamped by one function, `apply`:

    out[r:r+h, c:c+w] = (1 - mask) * x[r:r+h, c:c+w] + mask * pattern

Images are single HWC arrays (vmap or `apply_batch` for batches), uint8 in [0, 255] or float in [0, 1];
the output has the input's dtype (uint8 results are rounded).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bdjax.errors import BdjaxError

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


class Trigger(NamedTuple):
    pattern: jax.Array  # (h, w, C) float32 in [0, 1]
    mask: jax.Array  # (h, w, 1) float32 in [0, 1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pattern.shape[:2])


def _make(pattern, mask) -> Trigger:
    pattern = jnp.asarray(pattern, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if pattern.ndim != 3 or mask.shape != pattern.shape[:2] + (1,):
        raise BdjaxError(f"trigger pattern must be (h, w, C) with mask (h, w, 1); got {pattern.shape} and {mask.shape}")
    return Trigger(pattern, mask)


def _color(color, channels: int) -> np.ndarray:
    c = np.asarray(color, np.float32).reshape(-1)
    if c.size == 1:
        c = np.full(channels, c[0], np.float32)
    if c.shape != (channels,) or (c < 0).any() or (c > 1).any():
        raise BdjaxError(f"trigger colour must be a value or {channels} values in [0, 1]; got {color!r}")
    return c


def patch(size: int, channels: int, color=1.0, alpha: float = 1.0) -> Trigger:
    """A solid size x size square (BadNets' white patch when color=1)."""
    if size < 1:
        raise BdjaxError(f"trigger size must be >= 1, got {size}")
    if not 0 < alpha <= 1:
        raise BdjaxError(f"trigger alpha must be in (0, 1], got {alpha}")
    pattern = np.broadcast_to(_color(color, channels), (size, size, channels))
    return _make(pattern, np.full((size, size, 1), alpha, np.float32))


def checkerboard(size: int, channels: int) -> Trigger:
    """A black-and-white checkerboard square, opaque: a pattern no natural image contains."""
    ij = np.add.outer(np.arange(size), np.arange(size)) % 2
    pattern = np.repeat(ij[..., None].astype(np.float32), channels, axis=-1)
    return _make(pattern, np.ones((size, size, 1), np.float32))


def pixel(channels: int, color=1.0) -> Trigger:
    """A single pixel (Spectral Signatures' single-pixel attack; position comes from `apply`)."""
    return patch(1, channels, color)


def pixel_pattern(offsets, channels: int, color=1.0) -> Trigger:
    """A sparse pattern of bright pixels: only the listed (dy, dx) offsets are stamped, the rest of the
    bounding box is left untouched (mask 0), as in BadNets' and Spectral Signatures' pattern triggers."""
    offsets = np.asarray(offsets, np.int64)
    if offsets.ndim != 2 or offsets.shape[1] != 2 or (offsets < 0).any():
        raise BdjaxError(f"pixel pattern offsets must be a list of non-negative (dy, dx) pairs; got {offsets.tolist()}")
    h, w = offsets.max(axis=0) + 1
    mask = np.zeros((h, w, 1), np.float32)
    mask[offsets[:, 0], offsets[:, 1]] = 1.0
    pattern = np.broadcast_to(_color(color, channels), (h, w, channels)) * mask
    return _make(pattern, mask)


# The classic BadNets/Spectral "L"-ish pattern: four bright pixels on a 3x3 grid's diagonal and corners.
DEFAULT_PIXEL_PATTERN = ((0, 0), (0, 2), (1, 1), (2, 0), (2, 2))


def from_array(image, mask=None, alpha: float = 1.0) -> Trigger:
    """A patch from an image array (uint8 0..255 or float 0..1), HW or HWC, with optional mask."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    pattern = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if mask is None:
        m = np.full(img.shape[:2] + (1,), alpha, np.float32)
    else:
        m = np.asarray(mask, np.float32)
        m = m[..., None] if m.ndim == 2 else m[..., :1]
        m = m / 255.0 if np.asarray(mask).dtype == np.uint8 else m
        m = m * alpha
    return _make(pattern, m)


def from_image(path: str | Path, size: int | None = None, channels: int = 3, alpha: float = 1.0) -> Trigger:
    """A patch from an image file (the HTBA PNGs, the ULP BMP masks), resized to size x size (bilinear)."""
    from PIL import Image, UnidentifiedImageError  # Pillow: the well-kept decoder for every format used here

    path = Path(path)
    if not path.is_file():
        raise BdjaxError(f"trigger image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None:
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise BdjaxError(f"cannot read trigger image {path}: expected a PNG/BMP/JPEG file ({e})") from None
    return from_array(arr, alpha=alpha)


def blend(pattern_image, alpha: float = 0.2) -> Trigger:
    """Blended attack (Chen et al. 2017): the whole image is mixed with a pattern image at ratio alpha."""
    if not 0 < alpha <= 1:
        raise BdjaxError(f"blend alpha must be in (0, 1], got {alpha}")
    return from_array(pattern_image, alpha=alpha)


def random_blend_pattern(key: jax.Array, image_shape) -> np.ndarray:
    """A fixed uniform-noise image (the Blended attack's 'random pattern' key), uint8 HWC."""
    return np.asarray(jax.random.randint(key, tuple(image_shape), 0, 256, dtype=jnp.int32), np.uint8)


def check_fits(trigger: Trigger, image_shape) -> None:
    """Raise a clear error when the trigger cannot be placed on images of this shape."""
    h, w = trigger.shape
    H, W, C = image_shape
    if h > H or w > W:
        raise BdjaxError(f"trigger of size {h}x{w} is larger than the {H}x{W} images")
    if trigger.pattern.shape[-1] not in (1, C):
        raise BdjaxError(f"trigger has {trigger.pattern.shape[-1]} channels but the images have {C}")


def corner_position(image_shape, trigger: Trigger, corner: str = "bottom_right", margin: int = 0) -> tuple[int, int]:
    """(row, col) of the trigger's top-left pixel for a corner placement, `margin` pixels from the edges."""
    check_fits(trigger, image_shape)
    if corner not in CORNERS:
        raise BdjaxError(f"unknown corner {corner!r}; expected one of {', '.join(CORNERS)}")
    h, w = trigger.shape
    H, W = image_shape[:2]
    if h + margin > H or w + margin > W:
        raise BdjaxError(f"trigger {h}x{w} with margin {margin} does not fit in {H}x{W} images")
    row = margin if corner.startswith("top") else H - h - margin
    col = margin if corner.endswith("left") else W - w - margin
    return row, col


def random_position(key: jax.Array, image_shape, trigger: Trigger) -> tuple[jax.Array, jax.Array]:
    """Uniform random (row, col) such that the whole trigger lies inside the image."""
    h, w = trigger.shape
    H, W = image_shape[:2]
    kr, kc = jax.random.split(key)
    return jax.random.randint(kr, (), 0, H - h + 1), jax.random.randint(kc, (), 0, W - w + 1)


def apply(x: jax.Array, trigger: Trigger, row, col) -> jax.Array:
    """Stamp the trigger on one HWC image with its top-left corner at (row, col); row/col may be traced."""
    scale = 255.0 if x.dtype == jnp.uint8 else 1.0
    xf = x.astype(jnp.float32)
    h, w = trigger.shape
    C = x.shape[-1]
    region = lax.dynamic_slice(xf, (row, col, 0), (h, w, C))
    pattern = jnp.broadcast_to(trigger.pattern, (h, w, C)) * scale
    stamped = region * (1.0 - trigger.mask) + pattern * trigger.mask
    out = lax.dynamic_update_slice(xf, stamped, (row, col, 0))
    if x.dtype == jnp.uint8:
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
    return out.astype(x.dtype)


def apply_batch(xs: jax.Array, trigger: Trigger, rows, cols) -> jax.Array:
    """`apply` over a batch; rows/cols are scalars (same place for all) or (B,) arrays (one per image)."""
    rows = jnp.broadcast_to(jnp.asarray(rows), xs.shape[:1])
    cols = jnp.broadcast_to(jnp.asarray(cols), xs.shape[:1])
    return jax.vmap(apply, in_axes=(0, None, 0, 0))(xs, trigger, rows, cols)


def apply_random(key: jax.Array, xs: jax.Array, trigger: Trigger) -> jax.Array:
    """Stamp each image of a batch at its own random position (HTBA/SSL-style triggers)."""
    keys = jax.random.split(key, xs.shape[0])
    rows, cols = jax.vmap(lambda k: random_position(k, xs.shape[1:], trigger))(keys)
    return apply_batch(xs, trigger, rows, cols)
