"""Input synthesizers mu of the blind backdoor: x* = mu(key, x) on a batch, inside the compiled step.

A synthesizer is any pure function (key, x) -> x* on a batch (B, ...) of inputs; for images those are float
(B, H, W, C) in [0, 1]. Nothing else is assumed, so a text synthesizer (inserting trigger tokens into token ids,
seeds/004's 'Good name' row) fits the same slot once bdjax has a text dataset and model.

Patterns are 2-D arrays of 1 (white), 0 (black) and -1 (transparent: the image shows through).
- pixel_pattern: a fixed pattern at a fixed position (every synthesised image gets the same pixels);
- single_pixel: one white pixel at a fixed position;
- physical: the pattern resized (nearest neighbour) to a random height of 5-10 pixels, flipped left-right with
  probability 1/2 and put at a random position: a transform-robust trigger, the 'physical' row of seeds/004.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError

# 5x3 black-and-white pattern with a transparent centre column at the ends; any fixed pattern works, this one is
# not a natural image feature (alternating pixels).
DEFAULT_PATTERN = ((1, 0, 1), (0, 1, 0), (1, -1, 1), (0, 1, 0), (1, 0, 1))
SYNTHESIZERS = ("pixel_pattern", "single_pixel", "physical")
PHYSICAL_SIZES = (5, 10)  # height range of the resized pattern, inclusive


class Synthesizer(NamedTuple):
    name: str
    apply: Callable  # (key, x (B, ...)) -> x* of the same shape and dtype


def _pattern(pattern) -> np.ndarray:
    p = np.asarray(pattern, np.float32)
    if p.ndim != 2 or p.size == 0 or not np.isin(p, (-1.0, 0.0, 1.0)).all():
        raise ConfigError(f"a blind pattern must be a non-empty 2-D array of 1 (white), 0 (black) and -1 "
                          f"(transparent), got shape {p.shape}")
    return p


def _check_fits(what: str, h: int, w: int, row: int, col: int, image_shape) -> None:
    H, W = image_shape[:2]
    if row < 0 or col < 0 or row + h > H or col + w > W:
        raise ConfigError(f"blind synthesizer {what} of {h}x{w} pixels at (row {row}, col {col}) does not fit in "
                          f"{H}x{W} images")


def _stamp_fixed(x, values, mask, row: int, col: int):
    """x with the (h, w) pattern `values` where `mask`, at (row, col); broadcast over batch and channels."""
    h, w = values.shape
    H, W = x.shape[1:3]
    full_v = jnp.zeros((H, W), x.dtype).at[row:row + h, col:col + w].set(values)
    full_m = jnp.zeros((H, W), bool).at[row:row + h, col:col + w].set(mask)
    return jnp.where(full_m[None, :, :, None], full_v[None, :, :, None], x)


def pixel_pattern(image_shape, pattern=DEFAULT_PATTERN, row: int = 1, col: int = 1) -> Synthesizer:
    p = _pattern(pattern)
    _check_fits("pattern", *p.shape, row, col, image_shape)
    values, mask = jnp.asarray(np.maximum(p, 0)), jnp.asarray(p >= 0)
    return Synthesizer("pixel_pattern", lambda key, x: _stamp_fixed(x, values.astype(x.dtype), mask, row, col))


def single_pixel(image_shape, row: int = 1, col: int = 1, value: float = 1.0) -> Synthesizer:
    _check_fits("pixel", 1, 1, row, col, image_shape)
    values, mask = jnp.full((1, 1), value), jnp.ones((1, 1), bool)
    return Synthesizer("single_pixel", lambda key, x: _stamp_fixed(x, values.astype(x.dtype), mask, row, col))


def physical(image_shape, pattern=DEFAULT_PATTERN, sizes: tuple[int, int] = PHYSICAL_SIZES,
             flip: bool = True) -> Synthesizer:
    """Random size, flip and position per image, with static shapes: every output pixel looks up its source
    pixel in the pattern (nearest neighbour) through index arithmetic, so the whole batch is one gather."""
    p = _pattern(pattern)
    h, w = p.shape
    lo, hi = int(sizes[0]), int(sizes[1])
    if not 1 <= lo <= hi:
        raise ConfigError(f"physical synthesizer sizes must be 1 <= low <= high, got {sizes}")
    width = lambda s: max(1, int(round(s * w / h)))  # noqa: E731  (the aspect ratio is kept)
    _check_fits(f"pattern resized up to {hi} rows", hi, width(hi), 0, 0, image_shape)
    H, W = image_shape[:2]
    values, opaque = jnp.asarray(np.maximum(p, 0)), jnp.asarray(p >= 0)
    widths = jnp.asarray([width(s) for s in range(hi + 1)])

    def one(key, img):
        k_size, k_flip, k_row, k_col = jax.random.split(key, 4)
        s = jax.random.randint(k_size, (), lo, hi + 1)
        sw = widths[s]
        r = jax.random.randint(k_row, (), 0, H - s + 1)
        c = jax.random.randint(k_col, (), 0, W - sw + 1)
        i = jnp.arange(H)[:, None] - r
        j = jnp.arange(W)[None, :] - c
        inside = (i >= 0) & (i < s) & (j >= 0) & (j < sw)
        si = jnp.clip((i * h) // s, 0, h - 1)
        sj = jnp.clip((j * w) // sw, 0, w - 1)
        sj = jnp.where(jnp.logical_and(flip, jax.random.bernoulli(k_flip)), w - 1 - sj, sj)
        m = inside & opaque[si, sj]
        return jnp.where(m[:, :, None], values[si, sj][:, :, None].astype(img.dtype), img)

    return Synthesizer("physical", lambda key, x: jax.vmap(one)(jax.random.split(key, x.shape[0]), x))


def make_synthesizer(name: str, image_shape, **options) -> Synthesizer:
    makers = {"pixel_pattern": pixel_pattern, "single_pixel": single_pixel, "physical": physical}
    if name not in makers:
        raise ConfigError(f"unknown blind synthesizer {name!r}; expected one of {', '.join(SYNTHESIZERS)}")
    return makers[name](image_shape, **options)


def synthesize_uint8(synth: Synthesizer, x: np.ndarray, seed: int = 0, chunk: int = 2000) -> np.ndarray:
    """Apply a synthesizer to uint8 images on the host side (test sets, figures): float in, rounded uint8 out."""
    fn = jax.jit(lambda k, xb: jnp.round(synth.apply(k, xb.astype(jnp.float32) / 255.0) * 255.0).astype(jnp.uint8))
    key = jax.random.key(seed)
    out = [np.asarray(fn(jax.random.fold_in(key, i), x[i:i + chunk])) for i in range(0, len(x), chunk)]
    return np.concatenate(out) if out else x.copy()
