"""MoCo v2 / BYOL augmentations on device: jittable, random per sample, on NHWC float batches in [0, 1].

random resized crop -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p) -> horizontal flip (p),
the torchvision recipe of MoCo v2. dm-pix supplies contrast, saturation, hue, grayscale and the blur kernel;
written here (and why):
- the crop box sampler (torchvision's RandomResizedCrop rule: 10 tries, else the whole image): no library has it;
- the crop's bilinear resize as two interpolation matrices: jax.image.scale_and_translate reads pixels outside
  the box at its borders (torchvision crops first);
- brightness as a multiplication: dm-pix's adjust_brightness adds a delta (TF), the recipe multiplies (torchvision);
- the blur as a weighted sum of shifted images: a per-sample sigma under vmap turns dm-pix's convolution into a
  grouped convolution per image, which XLA:CPU runs slowly; shifted sums are plain elementwise work.
The four jitter operations run in a fixed order (torchvision draws a random order per call).
"""
from __future__ import annotations

import dataclasses
import math

import dm_pix as pix
import jax
import jax.numpy as jnp

from bdjax.errors import ConfigError

CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the crop box
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio w / h of the box
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    blur_kernel_frac: float = 0.1  # kernel size / image size (MoCo v2: 23 px on 224)
    flip_p: float = 0.5

    def validate(self) -> "AugmentConfig":
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"augment.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        for name in ("jitter_p", "gray_p", "blur_p", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if any(j < 0 for j in self.jitter) or self.jitter[3] > 0.5:
            raise ConfigError(f"augment.jitter must be non-negative with hue <= 0.5, got {self.jitter}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"augment.blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        return self


# ------------------------------------------------------------------------------------------------ crop


def crop_boxes(u: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
    """(n, 4) boxes (top, left, h, w) in pixels (float) from uniforms u (n, 2 * CROP_TRIES + 2): torchvision's
    rule (area ~ U(scale) * H * W, log aspect ~ U(log ratio), integer sides; the first of 10 tries that fits,
    else the whole image)."""
    t = CROP_TRIES
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :t])
    r = jnp.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, t:2 * t])
    w = jnp.round(jnp.sqrt(area * r))
    h = jnp.round(jnp.sqrt(area / r))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = jnp.argmax(fits, axis=1)  # index of the first box that fits (0 when none does: masked below)
    any_fit = jnp.any(fits, axis=1)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], 1)[:, 0]
    h = jnp.where(any_fit, pick(h), height)
    w = jnp.where(any_fit, pick(w), width)
    top = jnp.floor(u[:, 2 * t] * (height - h + 1))
    left = jnp.floor(u[:, 2 * t + 1] * (width - w + 1))
    return jnp.stack([top, left, h, w], axis=1)


def sample_crop_boxes(key, n: int, height: int, width: int, scale, ratio) -> jax.Array:
    return crop_boxes(jax.random.uniform(key, (n, 2 * CROP_TRIES + 2)), height, width, scale, ratio)


def _interp_matrix(start, size, n_in: int, n_out: int) -> jax.Array:
    """(n_out, n_in) bilinear weights reading rows start .. start+size-1 only (edge-clamped inside the box)."""
    src = start + (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * size / n_out - 0.5
    src = jnp.clip(src, start, start + size - 1)
    lo = jnp.floor(src)
    frac = src - lo
    hi = jnp.minimum(lo + 1, start + size - 1)
    grid = jnp.arange(n_in, dtype=jnp.float32)
    return (1 - frac)[:, None] * (grid[None] == lo[:, None]) + frac[:, None] * (grid[None] == hi[:, None])


def resized_crop(image: jax.Array, box: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of image[top:top+h, left:left+w] (HWC) to out_hw, pixel centres aligned, edges clamped to
    the box (crop, then resize, as torchvision). Two small interpolation matrices, not
    jax.image.scale_and_translate: that one reads pixels just outside the box at its borders."""
    ry = _interp_matrix(box[0], box[2], image.shape[0], out_hw[0])
    rx = _interp_matrix(box[1], box[3], image.shape[1], out_hw[1])
    return jnp.einsum("ih,hwc,jw->ijc", ry, image, rx)


# ------------------------------------------------------------------------------------------------ colour


def color_jitter_one(image, factors) -> jax.Array:
    """One image, factors = (brightness, contrast, saturation, hue shift); clipped to [0, 1] after each op."""
    b, c, s, h = factors[0], factors[1], factors[2], factors[3]
    x = jnp.clip(image * b, 0, 1)  # multiplicative, as torchvision (dm-pix's brightness is additive)
    x = jnp.clip(pix.adjust_contrast(x, c), 0, 1)
    x = jnp.clip(pix.adjust_saturation(x, s), 0, 1)
    return jnp.clip(pix.adjust_hue(x, h), 0, 1)


def jitter_factors(u: jax.Array, strength) -> jax.Array:
    """(n, 4) from uniforms u (n, 4): brightness, contrast, saturation ~ U[1 - s, 1 + s] (floored at 0),
    hue ~ U[-s, s]."""
    lo = jnp.array([max(0.0, 1 - strength[0]), max(0.0, 1 - strength[1]), max(0.0, 1 - strength[2]), -strength[3]])
    hi = jnp.array([1 + strength[0], 1 + strength[1], 1 + strength[2], strength[3]])
    return lo + (hi - lo) * u


def grayscale(x: jax.Array) -> jax.Array:
    return pix.rgb_to_grayscale(x, keep_dims=True)


# ------------------------------------------------------------------------------------------------ blur


def blur_kernel_size(image_size: int, frac: float) -> int:
    """Odd kernel size ~ frac * image size, at least 3."""
    k = max(3, int(round(frac * image_size)))
    return k if k % 2 else k + 1


def gaussian_blur(x: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Per-image separable Gaussian blur (B, H, W, C) with sigma (B,), reflect padding (torchvision).
    Shifted sums rather than dm-pix's convolution: see the module docstring."""
    r = kernel_size // 2
    t = jnp.arange(-r, r + 1, dtype=jnp.float32)
    wts = jnp.exp(-t[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    wts = wts / wts.sum(1, keepdims=True)  # (B, k)
    H, W = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(wts[:, i, None, None, None] * xp[:, i:i + H] for i in range(kernel_size))
    xp = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(wts[:, i, None, None, None] * xp[:, :, i:i + W] for i in range(kernel_size))


# ------------------------------------------------------------------------------------------------ the recipe


def _where(mask, a, b):
    return jnp.where(mask[:, None, None, None], a, b)


def draw(key, n: int, height: int, cfg: AugmentConfig) -> dict:
    """Every random choice of n views: crop boxes, jitter factors, per-op on/off masks, blur sigmas. All from
    one uniform draw: each separate jax.random call adds its own threefry to the program (seconds of compile)."""
    t = 2 * CROP_TRIES + 2
    u = jax.random.uniform(key, (n, t + 9))
    lo, hi = cfg.blur_sigma
    return {"box": crop_boxes(u[:, :t], height, height, cfg.crop_scale, cfg.crop_ratio),
            "jitter": jitter_factors(u[:, t:t + 4], cfg.jitter),
            "jitter_on": u[:, t + 4] < cfg.jitter_p,
            "gray_on": u[:, t + 5] < cfg.gray_p,
            "blur_on": u[:, t + 6] < cfg.blur_p,
            "flip_on": u[:, t + 7] < cfg.flip_p,
            "sigma": lo + (hi - lo) * u[:, t + 8]}


def apply_draw(x: jax.Array, d: dict, cfg: AugmentConfig) -> jax.Array:
    B, H, W, C = x.shape
    x = jax.vmap(lambda img, b: resized_crop(img, b, (H, W)))(x, d["box"])
    # an op with probability 0 is left out of the program (less to compile), not masked
    if cfg.jitter_p > 0:
        x = _where(d["jitter_on"], jax.vmap(color_jitter_one)(x, d["jitter"]), x)
    if C == 3 and cfg.gray_p > 0:
        x = _where(d["gray_on"], grayscale(x), x)
    if cfg.blur_p > 0:
        x = _where(d["blur_on"], gaussian_blur(x, d["sigma"], blur_kernel_size(H, cfg.blur_kernel_frac)), x)
    return _where(d["flip_on"], x[:, :, ::-1], x)


def ssl_augment(key, x: jax.Array, cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
    """One random view of each image of a batch (B, H, W, C) float in [0, 1] (square images)."""
    return apply_draw(x, draw(key, x.shape[0], x.shape[1], cfg), cfg)


def two_views(key, x: jax.Array, cfg: AugmentConfig = AugmentConfig()) -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(key)
    return ssl_augment(k1, x, cfg), ssl_augment(k2, x, cfg)
