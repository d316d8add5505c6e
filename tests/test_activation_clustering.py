"""Activation Clustering: an obvious small cluster is flagged (PCA and ICA, with and without L2 normalisation, size
and silhouette criteria), also when the activations' magnitude varies between samples, a digits BadNets model's
poisons are found better than chance, per-class report, bad input."""
import json

import numpy as np
import pytest

from bdjax.attacks import LabelMap, make_trigger, poison_training_set
from bdjax.config import TrainConfig
from bdjax.data import load_dataset
from bdjax.defenses.activation_clustering import activation_clustering, activation_clustering_defense
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.train import fit


def small_cluster(seed=0, n_per_class=300, d=32, target=1, shift=8.0):
    """Three classes of ReLU-like activations; `target` holds a 20% cluster shifted along one direction."""
    rng = np.random.default_rng(seed)
    n_poison = n_per_class // 5
    y = np.repeat(np.arange(3), n_per_class)
    acts = rng.standard_normal((len(y), d))
    poison = np.zeros(len(y), bool)
    poison[rng.choice(np.flatnonzero(y == target), n_poison, replace=False)] = True
    direction = rng.standard_normal(d)
    acts[poison] += shift * direction / np.linalg.norm(direction)
    return np.maximum(acts + 1.0, 0.0).astype(np.float32), y, poison


@pytest.mark.parametrize("normalize", ["none", "l2"])
@pytest.mark.parametrize("reduce", ["pca", "ica"])
def test_obvious_small_cluster_is_flagged(reduce, normalize):
    acts, y, poison = small_cluster(n_per_class=200)
    res = activation_clustering(acts, y, reduce=reduce, normalize=normalize, poison_mask=poison)
    assert res.flagged_labels == [1]
    m = res.metrics
    assert m["tpr"] == 1.0 and m["clean_removed"] <= 2 and m["auc"] > 0.99, m  # a stray clean point may join
    row = res.per_class[1]
    assert 40 <= row["sizes"][0] <= 42 and row["relative_size"] == pytest.approx(0.2, abs=0.011)
    assert row["n_removed"] == row["sizes"][0] and row["n_poison"] == 40 and row["poison_removed"] == 40
    assert all(r["relative_size"] > 0.35 and not r["flagged"] for r in (res.per_class[0], res.per_class[2]))
    assert (res.cluster[poison] == 0).all() and (res.cluster >= 0).all()
    assert set(np.flatnonzero(res.removed)) == set(np.flatnonzero((y == 1) & (res.cluster == 0)))
    json.dumps(res.summary())  # the report is JSON-ready


@pytest.mark.parametrize("reduce", ["pca", "ica"])
def test_poisons_are_flagged_when_activation_magnitude_varies(reduce):
    """MNIST's failure mode: the overall activation magnitude (stroke thickness) varies 3x between samples.
    Unnormalised, 2-means splits every class by magnitude and misses the poisons; after L2 they are flagged."""
    acts, y, poison = small_cluster()
    scale = np.where(np.random.default_rng(1).random(len(y)) < 0.5, 0.5, 1.5).astype(np.float32)[:, None]
    raw = activation_clustering(acts * scale, y, reduce=reduce, poison_mask=poison)
    assert raw.metrics["tpr"] == 0.0 and 1 not in raw.flagged_labels, raw.metrics
    res = activation_clustering(acts * scale, y, reduce=reduce, normalize="l2", poison_mask=poison)
    assert res.flagged_labels == [1] and res.metrics["tpr"] == 1.0 and res.metrics["clean_removed"] <= 3, res.metrics
    unscaled = activation_clustering(acts, y, reduce=reduce, normalize="l2")
    assert (unscaled.cluster == res.cluster).mean() > 0.99  # L2 removes the magnitude entirely


def test_silhouette_criterion_and_labels_subset():
    acts, y, poison = small_cluster()
    res = activation_clustering(acts, y, criterion="silhouette", poison_mask=poison)
    sil = [r["silhouette"] for r in res.per_class]
    assert sil[1] > 0.3 > max(sil[0], sil[2])
    assert res.flagged_labels == [1] and res.metrics["tpr"] == 1.0
    only = activation_clustering(acts, y, labels=[0, 1])
    assert only.labels == (0, 1) and (only.cluster[y == 2] == -1).all() and np.isnan(only.scores[y == 2]).all()
    assert only.flagged_labels == [1]


def test_threshold_controls_flagging():
    acts, y, poison = small_cluster()
    res = activation_clustering(acts, y, size_threshold=0.15)  # the 20% cluster is now too big to flag
    assert res.flagged_labels == [] and not res.removed.any()
    rel = res.per_class[1]["relative_size"]
    assert activation_clustering(acts, y, size_threshold=rel).flagged_labels == [1]  # "at most", as in the paper


def test_tiny_classes_are_skipped():
    acts, y, _ = small_cluster(n_per_class=40)
    y = y.copy()
    y[:3] = 7  # a class of three samples
    res = activation_clustering(acts, y)
    row = next(r for r in res.per_class if r["label"] == 7)
    assert row["sizes"] is None and not row["flagged"] and (res.cluster[:3] == -1).all()


def test_digits_badnets_tpr_above_fpr():
    ds = load_dataset("digits")
    trigger = make_trigger("patch", ds.image_shape, size=3)
    p = poison_training_set(ds.x_train, ds.y_train, trigger, LabelMap("all_to_one", 0), 10, count=50, seed=0)
    model = get_model("mnist_cnn", 10)
    cfg = TrainConfig(model="mnist_cnn", epochs=12, batch_size=64, lr=0.05, schedule="cosine", checkpoint_every=0)
    state = fit(model, cfg, p.x, p.y, seed=0)
    res = activation_clustering_defense(model, state.variables, p.x, p.y, layer="penultimate", poison_mask=p.mask)
    m = res.metrics
    assert 0 in res.flagged_labels
    assert m["tpr"] > m["fpr"] + 0.3, m
    assert res.per_class[0]["poison_removed"] == m["poison_removed"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduce="tsne"), "reduce must be one of pca, ica, got 'tsne'"),
    (dict(normalize="zscore"), "normalize must be one of none, l2, got 'zscore'"),
    (dict(criterion="distance"), "criterion must be one of size, silhouette"),
    (dict(size_threshold=0.8), "size_threshold must be a fraction in"),
    (dict(n_components=0), "n_components must be a positive integer"),
    (dict(labels=[9]), r"labels \[9\] have no samples"),
])
def test_bad_options(kwargs, match):
    acts, y, _ = small_cluster(n_per_class=30)
    with pytest.raises(ConfigError, match=match):
        activation_clustering(acts, y, **kwargs)


def test_bad_arrays():
    acts, y, poison = small_cluster(n_per_class=30)
    with pytest.raises(ConfigError, match="one per activation row"):
        activation_clustering(acts, y[:-1])
    with pytest.raises(ConfigError, match="NaN"):
        activation_clustering(np.full_like(acts, np.nan), y)
    with pytest.raises(ConfigError, match="poison_mask has shape"):
        activation_clustering(acts, y, poison_mask=poison[:5])
