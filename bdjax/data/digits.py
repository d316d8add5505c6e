"""scikit-learn's embedded 8x8 handwritten digits: a dataset that needs no files, for quick tests."""

from __future__ import annotations

import numpy as np

from bdjax.data.dataset import Dataset

N_TRAIN = 1437  # of 1797; the remaining 360 are the test split
_SPLIT_SEED = 0


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as _sk_load_digits  # sklearn is slow to import; only pay when used

    raw = _sk_load_digits()
    x = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = raw.target.astype(np.int32)
    # A fixed seeded permutation rather than head/tail, so both splits mix all parts of the file.
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)))
