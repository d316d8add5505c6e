"""Detection metrics shared by every defense, so summary.json uses the same names everywhere.

Data filters (Spectral Signatures, Activation Clustering, STRIP) report `tpr`, `fpr`, `auc`, `poison_removed`,
`poison_left`, `clean_removed`; model inspectors (Neural Cleanse) report per-label norms, `anomaly_index` and
`flagged_labels`.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve  # well-tested ROC code; no reason to hand-roll it

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the std for normal data


def roc_auc(scores, is_positive) -> float | None:
    """ROC AUC of `scores` (higher = more suspicious) against the boolean ground truth; None if one class only."""
    is_positive = np.asarray(is_positive, bool)
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, np.asarray(scores, np.float64)))


def roc_points(scores, is_positive) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays of the ROC curve, for plotting."""
    fpr, tpr, _ = roc_curve(np.asarray(is_positive, bool), np.asarray(scores, np.float64))
    return fpr, tpr


def filter_metrics(removed, is_poison, scores=None) -> dict:
    """How well a data filter separated poisons: removed and is_poison are boolean masks over the same set."""
    removed = np.asarray(removed, bool)
    is_poison = np.asarray(is_poison, bool)
    n_poison, n_clean = int(is_poison.sum()), int((~is_poison).sum())
    poison_removed = int((removed & is_poison).sum())
    clean_removed = int((removed & ~is_poison).sum())
    return {
        "tpr": poison_removed / n_poison if n_poison else None,
        "fpr": clean_removed / n_clean if n_clean else None,
        "auc": roc_auc(scores, is_poison) if scores is not None else None,
        "poison_removed": poison_removed,
        "poison_left": n_poison - poison_removed,
        "clean_removed": clean_removed,
    }


def mad_anomaly_index(values) -> np.ndarray:
    """|v - median| / (1.4826 * MAD) per entry (Neural Cleanse's anomaly index)."""
    v = np.asarray(values, np.float64)
    median = np.median(v)
    mad = MAD_CONSISTENCY * np.median(np.abs(v - median))
    return np.abs(v - median) / max(mad, 1e-12)


def flag_small_outliers(values, threshold: float = 2.0) -> list[int]:
    """Labels whose value is below the median with anomaly index > threshold (Neural Cleanse's rule)."""
    v = np.asarray(values, np.float64)
    index = mad_anomaly_index(v)
    return [int(i) for i in np.flatnonzero((v < np.median(v)) & (index > threshold))]
