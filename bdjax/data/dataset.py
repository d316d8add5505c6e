"""The in-memory dataset every loader returns, and the checks that make it safe to train on."""

from __future__ import annotations

import dataclasses

import numpy as np

from bdjax.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class Dataset:
    """A train/test image-classification dataset held as NHWC uint8 arrays and int32 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_train.shape[1:]
        return (int(h), int(w), int(c))

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A seeded random subset (original order kept); None keeps a split whole."""
        rng = np.random.default_rng(seed)
        tr = _pick(rng, len(self.y_train), n_train, "n_train")
        te = _pick(rng, len(self.y_test), n_test, "n_test")
        return dataclasses.replace(
            self,
            x_train=self.x_train[tr],
            y_train=self.y_train[tr],
            x_test=self.x_test[te],
            y_test=self.y_test[te],
        )

    def select_classes(self, classes: tuple[int, ...]) -> Dataset:
        """Only the images of these classes, relabelled 0..k-1 in the order given (empty keeps every class)."""
        if not classes:
            return self
        valid = all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < self.num_classes
                    for c in classes)
        if not valid or len(set(classes)) != len(classes) or len(classes) < 2:
            raise DataError(f"data.classes={tuple(classes)!r}: expected at least 2 distinct labels in "
                            f"[0, {self.num_classes}) of dataset {self.name!r}")
        relabel = np.full(self.num_classes, -1, np.int32)
        relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
        tr, te = relabel[self.y_train] >= 0, relabel[self.y_test] >= 0
        return dataclasses.replace(self, x_train=self.x_train[tr], y_train=relabel[self.y_train[tr]],
                                   x_test=self.x_test[te], y_test=relabel[self.y_test[te]],
                                   class_names=tuple(self.class_names[c] for c in classes))


def _pick(rng: np.random.Generator, size: int, n: int | None, field: str) -> slice | np.ndarray:
    if n is None:
        return slice(None)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= size:
        raise DataError(f"subset {field}={n!r}: expected an integer in [1, {size}] (None keeps the split whole)")
    return np.sort(rng.choice(size, size=int(n), replace=False))


def check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise unless every label of one split lies in [0, num_classes)."""
    if y.size == 0:
        return
    lo, hi = y.min(), y.max()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: label {int(bad)} is outside [0, {num_classes}) ({num_classes} classes)")


def validate_dataset(ds: Dataset) -> None:
    """Raise DataError unless ds is internally consistent: dtypes, ranks, shapes, lengths, label range."""
    if not isinstance(ds, Dataset):
        raise DataError(f"expected a bdjax.data.Dataset, got {type(ds).__name__}")
    if len(ds.class_names) == 0:
        raise DataError(f"dataset {ds.name!r}: class_names is empty")
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        where = f"dataset {ds.name!r} x_{split}"
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise DataError(f"dataset {ds.name!r} {split}: x and y must be numpy arrays")
        if x.dtype != np.uint8:
            raise DataError(f"{where}: dtype {x.dtype}, expected uint8")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{where}: shape {x.shape}, expected (N, H, W, C) with C = 1 or 3")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"dataset {ds.name!r} y_{split}: {y.dtype} shape {y.shape}, expected 1-D integer labels")
        if len(x) != len(y):
            raise DataError(f"dataset {ds.name!r} {split}: {len(x)} images but {len(y)} labels")
        check_labels(y, ds.num_classes, f"dataset {ds.name!r} y_{split}")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(
            f"dataset {ds.name!r}: train images are {ds.x_train.shape[1:]} but test images are {ds.x_test.shape[1:]}"
        )
