"""Poisons as the files a victim downloads: 8-bit PNGs, a reader for them, and a target / poison / difference grid.

Finetuning should read the poisons back from these files (`load_poisons`), not use the float arrays, since the
8-bit rounding is part of what the victim trains on.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bdjax.errors import ConfigError, DataError

QUANTIZE = ("round", "truncate")
_NAME = "poison_{:05d}.png"
_PATTERN = re.compile(r"poison_(\d+)\.png$")


def to_uint8(images, quantize: str = "round") -> np.ndarray:
    """Float [0, 1] images -> uint8. "round": nearest level (error <= 0.5/255). "truncate": floor(255 x), what the
    official code's ToPILImage-style `mul(255).byte()` does, which darkens every pixel by 0.5/255 on average."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"htba quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    x = np.clip(np.asarray(images, np.float32) * 255.0, 0.0, 255.0)
    return (np.round(x) if quantize == "round" else np.floor(x)).astype(np.uint8)


def save_poisons(folder: str | Path, poisons, *, quantize: str = "round") -> list[Path]:
    """Write (N, H, W, C) poisons (float [0, 1] or uint8) as folder/poison_00000.png, ... (8-bit, lossless)."""
    from PIL import Image

    arr = np.asarray(poisons)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"poisons must be (N, H, W, 1 or 3) images, got shape {arr.shape}")
    arr = arr if arr.dtype == np.uint8 else to_uint8(arr, quantize)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(arr):
        p = folder / _NAME.format(i)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
        paths.append(p)
    return paths


def load_poisons(folder: str | Path) -> np.ndarray:
    """The poison PNGs of `folder` as (N, H, W, C) uint8, in index order (poison_00000.png first)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"poison folder not found: {folder}")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.match(p.name)))
    if not found:
        raise DataError(f"no poison_NNNNN.png files in {folder}")
    images = []
    for _, p in found:
        with Image.open(p) as im:
            a = np.asarray(im)
        images.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in images}
    if len(shapes) > 1 or images[0].dtype != np.uint8:
        raise DataError(f"poison files in {folder} must be 8-bit images of one size, got {sorted(shapes)}, "
                        f"{images[0].dtype}")
    return np.stack(images)


def save_poison_grid(path: str | Path, targets, poisons, *, eps: float, n: int = 8) -> Path:
    """poisons.png: n columns of target image / poison / difference scaled so +-eps spans black to white."""
    from bdjax import plots  # headless matplotlib and the image helper every bdjax figure uses

    t = _unit(targets)[:n]
    z = _unit(poisons)[:n]
    if len(t) == 0 or t.shape != z.shape:
        raise DataError(f"targets and poisons must be non-empty and of one shape, got {t.shape} and {z.shape}")
    diff = np.clip(0.5 + 0.5 * (z - t) / eps, 0.0, 1.0)
    cols = len(t)
    fig, axes = plots.plt.subplots(3, cols, figsize=(1.4 * cols, 4.4), squeeze=False)
    for i in range(cols):
        for r, img in enumerate((t[i], z[i], diff[i])):
            plots._show(axes[r, i], img)
    for r, label in enumerate(("target", "poison", f"diff (+-{eps * 255:.0f}/255)")):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plots.plt.close(fig)
    return path


def _unit(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
