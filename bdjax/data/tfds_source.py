"""TensorFlow Datasets catalog names, for users online; tensorflow_datasets is imported only when used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bdjax.data.dataset import Dataset, validate_dataset
from bdjax.errors import DataError


def _split_arrays(split: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from one split of tfds.as_numpy output: an (image, label) pair or a feature dict."""
    if isinstance(split, Mapping):
        if "image" not in split or "label" not in split:
            raise DataError(f"{where}: expected 'image' and 'label' features, got {sorted(split)}")
        x, y = split["image"], split["label"]
    elif isinstance(split, Sequence) and len(split) == 2:
        x, y = split
    else:
        raise DataError(f"{where}: expected an (image, label) pair or a feature dict, got {type(split).__name__}")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    return x, y


def from_tfds_numpy(name: str, train: Any, test: Any, class_names: Sequence[str]) -> Dataset:
    """Convert tfds.as_numpy(tfds.load(..., batch_size=-1)) output for two splits into a validated Dataset."""
    x_train, y_train = _split_arrays(train, f"TFDS {name!r} train split")
    x_test, y_test = _split_arrays(test, f"TFDS {name!r} test split")
    for what, x in (("train", x_train), ("test", x_test)):
        if x.dtype != np.uint8:
            raise DataError(f"TFDS {name!r} {what} images are {x.dtype}, expected uint8 (not an image dataset?)")
    ds = Dataset(name, x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                 tuple(str(c) for c in class_names))
    validate_dataset(ds)
    return ds


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    try:
        import tensorflow_datasets as tfds  # heavy, and absent from the GPU image: import on demand only
    except ImportError:
        raise DataError(
            f"unknown dataset {name!r}: not found locally, and TFDS is not installed "
            "(pip install tensorflow-datasets, or point BDJAX_DATA_ROOT / data_root at a local copy)"
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"unknown dataset {name!r}: not found locally nor in the TFDS catalog ({e})") from None
    info = builder.info
    splits = set(info.splits.keys())
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise DataError(f"TFDS dataset {name!r} has splits {sorted(splits)}, expected train and test (or validation)")
    try:
        names: list[str] | None = list(info.features[info.supervised_keys[1]].names)
    except Exception:  # no ClassLabel feature: fall back to "0".."K-1" below
        names = None
    try:
        train, test = tfds.as_numpy(
            tfds.load(name, split=["train", test_split], batch_size=-1, as_supervised=True,
                      data_dir=data_dir, download=True)
        )
    except Exception as e:  # download or preparation failures (no network, no TensorFlow, disk full)
        raise DataError(f"could not load TFDS dataset {name!r} ({type(e).__name__}: {e}); "
                        "use a local copy under BDJAX_DATA_ROOT instead") from None
    if names is None:
        top = max(int(np.max(train[1])), int(np.max(test[1])))
        names = [str(i) for i in range(top + 1)]
    return from_tfds_numpy(name, train, test, names)
