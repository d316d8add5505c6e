"""Reader for the IDX format of MNIST-style datasets (optionally gzipped)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from bdjax.errors import DataError

# (split, images stem, labels stem), as in the official MNIST / Fashion-MNIST distributions.
IDX_FILES = (
    ("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
_UBYTE = 0x08


def looks_like_idx_dir(path: Path) -> bool:
    return any(path.glob("*-idx3-ubyte")) or any(path.glob("*-idx3-ubyte.gz"))


def idx_files(root: Path) -> dict[str, Path]:
    """Map each expected stem to its file (plain or .gz) in root, or raise naming the missing ones."""
    found: dict[str, Path] = {}
    missing = []
    for _, *stems in IDX_FILES:
        for stem in stems:
            for candidate in (root / stem, root / f"{stem}.gz"):
                if candidate.is_file():
                    found[stem] = candidate
                    break
            else:
                missing.append(stem)
    if missing:
        raise DataError(f"{root}: missing IDX file(s) {', '.join(missing)} (with or without .gz)")
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off .gz raises EOFError
        raise DataError(f"{path}: cannot read ({e})") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file of unsigned bytes into an array of its declared shape."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no complete header)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected 0x0000TTNN")
    if raw[2] != _UBYTE:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x}, only 0x08 (unsigned byte) is supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated or invalid IDX header ({ndim} dimensions, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "oversized"
        raise DataError(f"{path}: {what} IDX file, {len(raw)} bytes but header {dims} implies {expected}")
    # copy: frombuffer views of bytes are read-only, and callers may poison images in place.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_dir(root: Path) -> dict[str, np.ndarray]:
    """Arrays x_train, y_train, x_test, y_test (x as N,H,W,1 uint8, y as int32) from an IDX folder."""
    files = idx_files(root)
    out: dict[str, np.ndarray] = {}
    for split, img_stem, lbl_stem in IDX_FILES:
        x, y = read_idx(files[img_stem]), read_idx(files[lbl_stem])
        if x.ndim != 3:
            raise DataError(f"{files[img_stem]}: IDX images have shape {x.shape}, expected (N, H, W)")
        if y.ndim != 1:
            raise DataError(f"{files[lbl_stem]}: IDX labels have shape {y.shape}, expected (N,)")
        if len(x) != len(y):
            raise DataError(f"{files[img_stem]}: {len(x)} images but {files[lbl_stem].name} has {len(y)} labels")
        out[f"x_{split}"] = x[..., None]
        out[f"y_{split}"] = y.astype(np.int32)
    return out
