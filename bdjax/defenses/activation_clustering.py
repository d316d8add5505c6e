"""Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", 2018).

For each label: take the last hidden layer's activations ("penultimate") of its training samples, reduce them to
10 dimensions (PCA by default, or FastICA as in the paper), split them with 2-means, and flag the smaller
cluster as poisoned when
- criterion="size" (default): its relative size is below `size_threshold` (0.35), or
- criterion="silhouette": the 2-cluster silhouette score is above `silhouette_threshold` (two well separated
  clusters are the sign of a poisoned class; clean classes cluster poorly into two).

    feats = extract_features(model, variables, poisoned.x, "penultimate")
    res = activation_clustering(feats, poisoned.y, poison_mask=poisoned.mask)
    res.per_class  # sizes, relative size, silhouette, flagged, for every label
    res.removed    # the samples that would be removed

scikit-learn does the per-class work: the inputs are tiny (n_c x 10 after reduction), the work is host-side and
one-off, and PCA / FastICA / k-means with restarts are well-tested there; the expensive part, the forward pass
that produces the activations, runs compiled (bdjax.defenses.features).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from bdjax.defenses.metrics import filter_metrics, roc_auc
from bdjax.errors import ConfigError

REDUCTIONS = ("pca", "ica")
CRITERIA = ("size", "silhouette")
MIN_CLASS_SIZE = 4  # fewer samples cannot be split into two clusters with a meaningful silhouette


@dataclasses.dataclass
class ACResult:
    """Outcome of activation clustering over N samples."""

    removed: np.ndarray  # (N,) bool: members of flagged clusters
    cluster: np.ndarray  # (N,) int: 0 = the smaller cluster of its class, 1 = the larger, -1 = not analysed
    scores: np.ndarray  # (N,) 1 - relative size of the sample's cluster (higher = more suspicious); NaN if not analysed
    per_class: list[dict]  # label, n, sizes [smaller, larger], relative_size, silhouette, flagged, n_removed
    labels: tuple[int, ...]
    reduce: str
    criterion: str
    y: np.ndarray = dataclasses.field(default=None, repr=False)
    metrics: dict | None = None

    @property
    def keep(self) -> np.ndarray:
        return ~self.removed

    @property
    def flagged_labels(self) -> list[int]:
        return [row["label"] for row in self.per_class if row["flagged"]]

    def evaluate(self, poison_mask) -> dict:
        """filter_metrics against the true poison mask (auc over the analysed samples); also stored in .metrics."""
        poison_mask = np.asarray(poison_mask, bool)
        if poison_mask.shape != self.removed.shape:
            raise ConfigError(f"poison_mask has shape {poison_mask.shape}, expected {self.removed.shape}")
        analysed = self.cluster >= 0
        m = filter_metrics(self.removed, poison_mask)
        m["auc"] = roc_auc(self.scores[analysed], poison_mask[analysed])
        for row in self.per_class:
            members = self.y == row["label"]
            row["n_poison"] = int(poison_mask[members].sum())
            row["poison_removed"] = int((poison_mask & self.removed)[members].sum())
        self.metrics = m
        return m

    def summary(self) -> dict:
        return {"reduce": self.reduce, "criterion": self.criterion, "labels": list(self.labels),
                "flagged_labels": self.flagged_labels, "n_removed": int(self.removed.sum()),
                "per_class": self.per_class, **(self.metrics or {})}


def _check(acts, y, labels, n_components, reduce, criterion, size_threshold, silhouette_threshold):
    acts = np.asarray(acts)
    y = np.asarray(y)
    if acts.ndim < 2 or not np.issubdtype(acts.dtype, np.number):
        raise ConfigError(f"activations must be a numeric (N, D) array, got {acts.dtype} {acts.shape}")
    acts = acts.reshape(len(acts), -1)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(acts):
        raise ConfigError(f"labels y must be 1-D integers, one per activation row; got {y.dtype} {y.shape} "
                          f"for {len(acts)} rows")
    if not np.isfinite(acts).all():
        raise ConfigError("activations contain NaN or infinite values")
    if reduce not in REDUCTIONS:
        raise ConfigError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ConfigError(f"n_components must be a positive integer, got {n_components!r}")
    if not (isinstance(size_threshold, (int, float)) and 0 < size_threshold <= 0.5):
        raise ConfigError(f"size_threshold must be a fraction in (0, 0.5], got {size_threshold!r}")
    if not (isinstance(silhouette_threshold, (int, float)) and -1 <= silhouette_threshold < 1):
        raise ConfigError(f"silhouette_threshold must be in [-1, 1), got {silhouette_threshold!r}")
    present = [int(c) for c in np.unique(y)]
    if labels is None:
        labels = present
    elif isinstance(labels, (int, np.integer)):
        labels = [labels]
    labels = tuple(dict.fromkeys(int(c) for c in labels))
    missing = [c for c in labels if c not in present]
    if missing or not labels:
        raise ConfigError(f"labels {missing or '[]'} have no samples; labels present: {present}")
    return acts.astype(np.float64, copy=False), y.astype(np.int64, copy=False), labels


def _reduce(a: np.ndarray, n_components: int, reduce: str, seed: int) -> np.ndarray:
    k = min(n_components, a.shape[0] - 1, a.shape[1])
    if reduce == "pca":
        return PCA(n_components=k, random_state=seed).fit_transform(a)
    with warnings.catch_warnings():  # FastICA warns on slow convergence; the clustering below is what matters
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(n_components=k, whiten="unit-variance", max_iter=1000, tol=5e-3,
                       random_state=seed).fit_transform(a)


def activation_clustering(acts, y, *, labels: Sequence[int] | None = None, n_components: int = 10,
                          reduce: str = "pca", criterion: str = "size", size_threshold: float = 0.35,
                          silhouette_threshold: float = 0.15, seed: int = 0, poison_mask=None) -> ACResult:
    """Cluster each label's activations in two and flag the suspicious cluster; see the module docstring."""
    acts, y, labels = _check(acts, y, labels, n_components, reduce, criterion, size_threshold, silhouette_threshold)
    n = len(y)
    removed = np.zeros(n, bool)
    cluster = np.full(n, -1, np.int64)
    scores = np.full(n, np.nan, np.float64)
    rows = []
    for c in labels:
        members = np.flatnonzero(y == c)
        row = {"label": c, "n": int(len(members)), "sizes": None, "relative_size": None, "silhouette": None,
               "flagged": False, "n_removed": 0}
        rows.append(row)
        if len(members) < MIN_CLASS_SIZE:
            continue
        reduced = _reduce(acts[members], n_components, reduce, seed)
        with warnings.catch_warnings():  # identical points: fewer distinct clusters than 2 is handled below
            warnings.simplefilter("ignore", ConvergenceWarning)
            assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(assign, minlength=2)
        small = int(np.argmin(sizes))  # ties: cluster 0
        in_small = assign == small
        cluster[members] = np.where(in_small, 0, 1)
        rel = sizes / len(members)
        scores[members] = 1.0 - rel[assign]
        sil = float(silhouette_score(reduced, assign)) if sizes.min() > 0 else None
        if criterion == "size":
            flagged = bool(sizes.min() > 0 and rel[small] < size_threshold)
        else:
            flagged = bool(sil is not None and sil > silhouette_threshold)
        if flagged:
            removed[members[in_small]] = True
        row.update(sizes=[int(sizes.min()), int(sizes.max())], relative_size=float(rel[small]), silhouette=sil,
                   flagged=flagged, n_removed=int(in_small.sum()) if flagged else 0)
    result = ACResult(removed, cluster, scores.astype(np.float32), rows, labels, reduce, criterion, y)
    if poison_mask is not None:
        result.evaluate(poison_mask)
    return result


def activation_clustering_defense(model, variables, x_uint8, y, *, layer: str = "penultimate",
                                  batch_size: int = 500, **kwargs) -> ACResult:
    """extract_features(layer) + activation_clustering in one call (keyword arguments as activation_clustering)."""
    from bdjax.defenses.features import extract_features

    return activation_clustering(extract_features(model, variables, x_uint8, layer, batch_size=batch_size), y,
                                 **kwargs)
