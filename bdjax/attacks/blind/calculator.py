"""The MNIST 'calculator' of seeds/004: two digits side by side (28x56), the main task reads the two-digit
number (100 classes, label = 10 * left + right); the blind backdoor makes the model output their sum or product."""
from __future__ import annotations

import dataclasses

import numpy as np

from bdjax.data import Dataset
from bdjax.errors import ConfigError


def _pairs(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    return np.concatenate([x[i], x[j]], axis=2), (10 * y[i] + y[j]).astype(np.int32)


def calculator_dataset(ds: Dataset, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """n_train / n_test random pairs of the dataset's train / test digits (test pairs only from test digits)."""
    if ds.image_shape != (28, 28, 1) or ds.num_classes != 10:
        raise ConfigError(f"calculator images need 28x28 single-channel digits with 10 classes (MNIST); "
                          f"{ds.name} has {'x'.join(map(str, ds.image_shape))} images and {ds.num_classes} classes")
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"calculator n_train and n_test must be >= 1, got {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    x_tr, y_tr = _pairs(ds.x_train, ds.y_train, n_train, rng)
    x_te, y_te = _pairs(ds.x_test, ds.y_test, n_test, rng)
    return dataclasses.replace(ds, name=f"{ds.name}_calculator", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                               class_names=tuple(f"{k:02d}" for k in range(100)))
