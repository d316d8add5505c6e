"""Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", 2018).

For each label: take the last hidden layer's activations ("penultimate") of its training samples, optionally
scale each sample to unit L2 norm, reduce the label's samples to 10 dimensions (PCA, or FastICA as in the paper),
split them with 2-means, and flag the smaller cluster as poisoned when
- criterion="size" (default): its relative size is at most `size_threshold` (0.35, the paper's rule for poison
  rates up to 33%), or
- criterion="silhouette": the 2-cluster silhouette score is above `silhouette_threshold` (two well separated
  clusters are the sign of a poisoned class; clean classes cluster poorly into two).

    feats = extract_features(model, variables, poisoned.x, "penultimate")
    res = activation_clustering(feats, poisoned.y, normalize="l2", poison_mask=poisoned.mask)
    res.per_class  # sizes, relative size, silhouette, flagged, for every label
    res.removed    # the samples that would be removed

reduce="ica", normalize="none" is the paper's procedure; normalize="l2" is bdjax's addition: the overall
magnitude of a ReLU layer (stroke thickness, contrast) varies between samples and 2-means can split a class along
it; the norm removes it and keeps the direction, where the trigger shows (on a 3x3-patch MNIST model, ICA found
the poisons only with it; PCA + L2 halves the false positives of PCA in experiments/activation_clustering_mnist.py).
FastICA whitens, which makes 2-means weigh the clean samples' minor directions as much as the trigger's: it has
many near-equal local optima (balanced splits), hence 100 k-means restarts instead of scikit-learn's 10 (with 10,
MNIST results changed with the seed, TPR 0 to 0.99), and on MNIST all-to-all it still splits some clean classes
in half where PCA finds every poisoned class. All-to-one, only ICA found the poisons (with false positives).
The defaults stay PCA without normalisation (ART's), which also does best on the digits set all-to-one.

scikit-learn does the per-class work: the inputs are small (n_c x D, then n_c x 10), the work is host-side and
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
from threadpoolctl import threadpool_limits

from bdjax.defenses.metrics import filter_metrics, roc_auc
from bdjax.errors import ConfigError

REDUCTIONS = ("pca", "ica")
NORMALIZATIONS = ("none", "l2")
CRITERIA = ("size", "silhouette")
MIN_CLASS_SIZE = 4  # fewer samples cannot be split into two clusters with a meaningful silhouette
KMEANS_RESTARTS = 100  # see the module docstring; ~1 s per class of 6000 (one thread)
ICA_MAX_ITER = 200  # see _reduce: the clusters do not depend on ICA's convergence
SILHOUETTE_SAMPLE = 2000  # the silhouette costs O(n^2) distances; a 2000-sample estimate is within ~0.01


@dataclasses.dataclass(frozen=True)
class ACConfig:
    """Activation Clustering's settings, as activation_clustering's keyword arguments (bdjax.pipelines.defend)."""

    n_components: int = 10  # dimensions each label's activations are reduced to before 2-means
    reduce: str = "pca"  # pca (ART's default) | ica (the paper's FastICA)
    normalize: str = "none"  # none (the paper) | l2: each activation scaled to unit norm first
    criterion: str = "size"  # size: flag the smaller cluster if small enough | silhouette: if well separated
    size_threshold: float = 0.35  # criterion=size: largest relative size of a flagged cluster
    silhouette_threshold: float = 0.15  # criterion=silhouette: smallest silhouette score of a flagged label

    def validate(self) -> "ACConfig":
        _check(np.zeros((2, 1)), np.zeros(2, np.int64), None, **self.kwargs())
        return self

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ACResult:
    """Outcome of activation clustering over N samples."""

    removed: np.ndarray  # (N,) bool: members of flagged clusters
    cluster: np.ndarray  # (N,) int: 0 = the smaller cluster of its class, 1 = the larger, -1 = not analysed
    scores: np.ndarray  # (N,) 1 - relative size of the sample's cluster (higher = more suspicious); NaN if not analysed
    per_class: list[dict]  # label, n, sizes [smaller, larger], relative_size, silhouette, flagged, n_removed
    labels: tuple[int, ...]
    reduce: str
    normalize: str
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
        return {"reduce": self.reduce, "normalize": self.normalize, "criterion": self.criterion,
                "labels": list(self.labels), "flagged_labels": self.flagged_labels,
                "n_removed": int(self.removed.sum()), "per_class": self.per_class, **(self.metrics or {})}


def _check(acts, y, labels, n_components, reduce, normalize, criterion, size_threshold, silhouette_threshold):
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
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
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


def _normalize(acts: np.ndarray, normalize: str) -> np.ndarray:
    """Each row scaled to unit L2 norm ("l2"; all-zero rows stay zero) or left as is ("none")."""
    if normalize == "none":
        return acts
    norms = np.linalg.norm(acts, axis=1, keepdims=True)
    return acts / np.where(norms > 0, norms, 1.0)


def _reduce(a: np.ndarray, n_components: int, reduce: str, seed: int) -> np.ndarray:
    """One label's activations (n_c, D) -> (n_c, k), fitted on that label only (both methods centre per label)."""
    k = min(n_components, a.shape[0] - 1, a.shape[1])
    if reduce == "pca":
        return PCA(n_components=k, random_state=seed).fit_transform(a)
    # FastICA = whitened PCA followed by the rotation that makes the components independent. k-means and the
    # silhouette only see distances, which a rotation keeps, so the partition is that of whitened PCA whether or
    # not the rotation has converged: hence the short ICA_MAX_ITER (it rarely converges on ReLU activations
    # anyway). FastICA itself is kept to run the paper's procedure as written.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(n_components=k, whiten="unit-variance", max_iter=ICA_MAX_ITER, tol=5e-3,
                       random_state=seed).fit_transform(a)


def _two_means(reduced: np.ndarray, seed: int) -> np.ndarray:
    """2-means labels with cluster 0 the smaller one (ties: k-means' cluster 0)."""
    with warnings.catch_warnings():  # identical points: fewer distinct clusters than 2 is handled by the caller
        warnings.simplefilter("ignore", ConvergenceWarning)
        assign = KMeans(n_clusters=2, n_init=KMEANS_RESTARTS, random_state=seed).fit_predict(reduced)
    sizes = np.bincount(assign, minlength=2)
    return assign if sizes[0] <= sizes[1] else 1 - assign


def _silhouette(reduced: np.ndarray, assign: np.ndarray, seed: int) -> float | None:
    """Silhouette of the 2-means split (on a seeded sample of large classes); None if the sample holds one cluster."""
    idx = np.arange(len(assign))
    if len(idx) > SILHOUETTE_SAMPLE:
        idx = np.random.default_rng(seed).choice(idx, SILHOUETTE_SAMPLE, replace=False)
    if len(np.unique(assign[idx])) < 2:
        return None
    return float(silhouette_score(reduced[idx], assign[idx]))


def _is_flagged(rel_small: float, sil: float | None, criterion: str, size_threshold: float,
                silhouette_threshold: float) -> bool:
    if criterion == "size":
        return 0 < rel_small <= size_threshold
    return sil is not None and sil > silhouette_threshold


def _split_class(a: np.ndarray, n_components: int, reduce: str, seed: int):
    """One label's activations -> (assign with 0 = the smaller cluster, relative sizes, silhouette)."""
    reduced = _reduce(a, n_components, reduce, seed)
    assign = _two_means(reduced, seed)
    return assign, np.bincount(assign, minlength=2) / len(a), _silhouette(reduced, assign, seed)


def activation_clustering(acts, y, *, labels: Sequence[int] | None = None, n_components: int = 10,
                          reduce: str = "pca", normalize: str = "none", criterion: str = "size",
                          size_threshold: float = 0.35, silhouette_threshold: float = 0.15, seed: int = 0,
                          poison_mask=None) -> ACResult:
    """Cluster each label's activations in two and flag the suspicious cluster; see the module docstring."""
    acts, y, labels = _check(acts, y, labels, n_components, reduce, normalize, criterion, size_threshold,
                             silhouette_threshold)
    acts = _normalize(acts, normalize)
    removed = np.zeros(len(y), bool)
    cluster = np.full(len(y), -1, np.int64)
    scores = np.full(len(y), np.nan, np.float64)
    rows = []
    for c in labels:
        members = np.flatnonzero(y == c)
        row = {"label": c, "n": int(len(members)), "sizes": None, "relative_size": None, "silhouette": None,
               "flagged": False, "n_removed": 0}
        rows.append(row)
        if len(members) < MIN_CLASS_SIZE:
            continue
        with threadpool_limits(1):  # tiny problems: thread start-up and spinning cost 20x on busy cores
            assign, rel, sil = _split_class(acts[members], n_components, reduce, seed)
        flagged = _is_flagged(float(rel[0]), sil, criterion, size_threshold, silhouette_threshold)
        cluster[members] = assign
        scores[members] = 1.0 - rel[assign]
        removed[members] = flagged & (assign == 0)
        n_small = int((assign == 0).sum())
        row.update(sizes=[n_small, len(members) - n_small], relative_size=float(rel[0]), silhouette=sil,
                   flagged=flagged, n_removed=n_small if flagged else 0)
    result = ACResult(removed, cluster, scores.astype(np.float32), rows, labels, reduce, normalize, criterion, y)
    if poison_mask is not None:
        result.evaluate(poison_mask)
    return result


def activation_clustering_defense(model, variables, x_uint8, y, *, layer: str = "penultimate",
                                  batch_size: int = 500, **kwargs) -> ACResult:
    """extract_features(layer) + activation_clustering in one call (keyword arguments as activation_clustering)."""
    from bdjax.defenses.features import extract_features

    return activation_clustering(extract_features(model, variables, x_uint8, layer, batch_size=batch_size), y,
                                 **kwargs)
