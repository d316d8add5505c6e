"""Datasets stored as one .npz file with x_train, y_train, x_test, y_test [, class_names]: reader and writer."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from bdjax.data.dataset import Dataset, check_labels
from bdjax.errors import DataError

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: dtype {x.dtype}, expected uint8 pixels 0..255")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: shape {x.shape}, expected (N, H, W, C) with C = 1 or 3, or (N, H, W)")
    return x


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {y.dtype} array of shape {y.shape}, expected 1-D integer labels")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels but {n} images")
    return y


def _class_names(arr: np.ndarray, where: str) -> tuple[str, ...]:
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise DataError(f"{where}: {arr.dtype} array of shape {arr.shape}, expected a 1-D array of strings")
    return tuple(s.decode() if isinstance(s, bytes) else str(s) for s in arr.tolist())


def read_npz(path: Path, name: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            present = sorted(data.files)
            missing = [k for k in REQUIRED_KEYS if k not in present]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; keys present: {present}")
            arrays = {k: data[k] for k in REQUIRED_KEYS}
            names = data["class_names"] if "class_names" in present else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # ValueError: object arrays need pickle
        raise DataError(f"{path}: not a readable .npz file ({e})") from None

    out = {}
    for split in ("train", "test"):
        x = _images(arrays[f"x_{split}"], f"{path} x_{split}")
        y = _labels(arrays[f"y_{split}"], len(x), f"{path} y_{split}")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    if names is not None:
        class_names = _class_names(names, f"{path} class_names")
    else:
        top = max((int(y.max()) for y in (out["y_train"], out["y_test"]) if y.size), default=-1)
        class_names = tuple(str(i) for i in range(top + 1))
    for split in ("train", "test"):
        # Range-check before the int32 cast, which could wrap a huge int64 label into range.
        check_labels(out[f"y_{split}"], len(class_names), f"{path} y_{split}")
        out[f"y_{split}"] = out[f"y_{split}"].astype(np.int32)
    # A class without training images would be an empty class that, e.g., a zoo can draw as a source class
    # (its "poisoned" model then gets no poisons).
    missing = np.flatnonzero(np.bincount(out["y_train"], minlength=len(class_names)) == 0)
    if len(missing):
        raise DataError(f"{path} y_train: no image has label(s) {missing.tolist()}; expected every label "
                        f"0..{len(class_names) - 1} to occur (relabel the classes to consecutive integers)")
    return Dataset(name, out["x_train"], out["y_train"], out["x_test"], out["y_test"], class_names)


def write_npz(file, ds: Dataset, *, compress: bool = False) -> None:
    """Write ds in the layout read_npz reads (file: a path or a binary file object); no pickled objects."""
    save = np.savez_compressed if compress else np.savez
    save(file, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
         class_names=np.asarray(ds.class_names, dtype=str))
