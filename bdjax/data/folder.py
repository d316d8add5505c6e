"""Reader for image-folder datasets: <root>/{train,test}/<class>/<image file>."""

from __future__ import annotations

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bdjax.errors import DataError

SPLITS = ("train", "test")
_GRAY_MODES = frozenset({"1", "L", "LA"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit grey (PNG, TIFF), 32-bit integer
_CHUNK = 512  # files per task: per-task overhead would dominate the ~70 us decode of a 32x32 JPEG


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """The files of an image-folder dataset, listed and checked for layout but not yet decoded."""

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, list[str]]  # split -> file paths, grouped by class in class_names order
    labels: dict[str, np.ndarray]  # split -> int32 label per file
    stats: list[tuple[str, int, int]]  # (path, size, mtime_ns) of every file, for the cache key


def looks_like_folder_dir(path: Path) -> bool:
    # any, not all: a folder with train/ but no test/ should get the folder reader's error about test/.
    return any((path / s).is_dir() for s in SPLITS)


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as it:
        return [e.name for e in _visible(list(it)) if e.is_dir()]


def scan_folder(root: Path) -> FolderScan:
    """List every image file; raise on missing splits, differing class sets or empty classes."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root}: missing {split}/ folder (expected {root}/{{train,test}}/<class>/<images>)")
    class_names = tuple(_class_dirs(root / "train"))
    if not class_names:
        raise DataError(f"{root / 'train'}: no class folders found")
    test_names = tuple(_class_dirs(root / "test"))
    if test_names != class_names:
        only_train = sorted(set(class_names) - set(test_names))
        only_test = sorted(set(test_names) - set(class_names))
        raise DataError(
            f"{root}: test/ classes differ from train/ classes (only in train: {only_train}, only in test: {only_test})"
        )
    # Plain str paths and DirEntry stats: pathlib objects for 60k files cost more than the cache load.
    files: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    stats: list[tuple[str, int, int]] = []
    for split in SPLITS:
        split_files: list[str] = []
        split_labels: list[int] = []
        for label, name in enumerate(class_names):
            class_dir = root / split / name
            with os.scandir(class_dir) as it:
                entries = [e for e in _visible(list(it)) if e.is_file()]
            if not entries:
                raise DataError(f"{class_dir}: empty class folder (no image files)")
            for e in entries:
                st = e.stat()
                stats.append((e.path, st.st_size, st.st_mtime_ns))
                split_files.append(e.path)
            split_labels.extend([label] * len(entries))
        files[split] = split_files
        labels[split] = np.asarray(split_labels, dtype=np.int32)
    return FolderScan(root, class_names, files, labels, stats)


def _decode(path: str) -> np.ndarray:
    """One image as (H, W) if grayscale, else (H, W, 3)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in _WIDE_MODES:
                return _to_8bit(np.asarray(im), im.mode, path)
            if im.mode == "F":
                raise DataError(f"{path}: floating-point pixels (mode F) have no defined range; expected 8- or "
                                "16-bit images")
            if im.mode in _GRAY_MODES:
                return np.asarray(im.convert("L"))
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files; any of them means "not an image"
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _to_8bit(a: np.ndarray, mode: str, path: str) -> np.ndarray:
    """16-bit grey 0..65535 scaled to 0..255 with rounding (PIL's convert("L") clips: everything above 255 turned
    white)."""
    a = np.asarray(a).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{path}: mode {mode} pixels span {a.min()}..{a.max()}, expected 16-bit values 0..65535")
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _decode_chunk(paths: list[str]) -> list[np.ndarray]:
    return [_decode(p) for p in paths]


def _decode_all(paths: list[str], workers: int) -> list[np.ndarray]:
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        return [img for c in chunks for img in _decode_chunk(c)]
    # Threads, not processes: nothing is pickled and PIL releases the GIL while decoding, which pays off for
    # large images or slow disks. For 32x32 JPEGs Python overhead per file dominates, so it is near serial speed.
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return [img for c in ex.map(_decode_chunk, chunks) for img in c]


def decode_folder(scan: FolderScan, workers: int | None = None) -> dict[str, np.ndarray]:
    """Decode every file of scan into x_train, y_train, x_test, y_test (x as N,H,W,C uint8)."""
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    all_paths = scan.files["train"] + scan.files["test"]
    images = _decode_all(all_paths, workers)
    ref_shape, ref_path = images[0].shape[:2], all_paths[0]
    for img, path in zip(images, all_paths):
        if img.shape[:2] != ref_shape:
            (h, w), (rh, rw) = img.shape[:2], ref_shape
            raise DataError(f"{path}: image size {w}x{h} differs from {rw}x{rh} of {ref_path}; all images must match")
    gray = all(img.ndim == 2 for img in images)
    channels = 1 if gray else 3
    x = np.empty((len(images), *ref_shape, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        x[i] = img[..., None] if img.ndim == 2 else img  # a gray image among colour ones broadcasts to 3 channels
    n_train = len(scan.files["train"])
    return {
        "x_train": x[:n_train],
        "y_train": scan.labels["train"],
        "x_test": x[n_train:],
        "y_test": scan.labels["test"],
    }
