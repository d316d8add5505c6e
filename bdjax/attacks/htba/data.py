"""Choosing the images of an HTBA pair: poisons start from target-class images, triggers go on source-class ones."""
from __future__ import annotations

import numpy as np

from bdjax.errors import ConfigError, DataError


def pair_images(images, labels, *, source_class: int, target_class: int, seed: int | None = None):
    """(targets, sources): the images labelled target_class and source_class, shuffled when a seed is given."""
    labels = np.asarray(labels)
    if int(source_class) == int(target_class):
        raise ConfigError(f"htba source_class and target_class must differ, both are {source_class}")
    if len(images) != len(labels):
        raise DataError(f"htba got {len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed) if seed is not None else None
    out = []
    for name, c in (("target", target_class), ("source", source_class)):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            raise DataError(f"htba {name} class {c} has no images (labels present: {sorted(set(labels.tolist()))})")
        out.append(images[rng.permutation(idx) if rng is not None else idx])
    return tuple(out)
