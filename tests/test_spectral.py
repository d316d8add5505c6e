"""Spectral Signatures: randomized vs exact SVD on real representations, one compile for all classes, poisons
caught (synthetic cluster and a digits BadNets model), feature extraction, retraining, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from bdjax.attacks import LabelMap, make_trigger, poison_test_set, poison_training_set
from bdjax.config import TrainConfig
from bdjax.data import load_dataset
from bdjax.defenses import spectral as S
from bdjax.defenses.features import extract_features
from bdjax.errors import ConfigError
from bdjax.models import feature_shapes, get_model
from bdjax.train import evaluate, fit

TARGET = 0
N_POISON = 50  # ~26% of the target class: inside the eps = 0.3 budget used below


@pytest.fixture(scope="module")
def digits_badnets():
    """mnist_cnn trained 12 epochs on the digits with 50 BadNets poisons (3x3 patch, all-to-one target 0)."""
    ds = load_dataset("digits")
    trigger = make_trigger("patch", ds.image_shape, size=3)
    label_map = LabelMap("all_to_one", TARGET)
    poisoned = poison_training_set(ds.x_train, ds.y_train, trigger, label_map, 10, count=N_POISON, seed=0)
    x_asr, y_asr = poison_test_set(ds.x_test, ds.y_test, trigger, label_map, 10)
    model = get_model("mnist_cnn", 10)
    cfg = TrainConfig(model="mnist_cnn", epochs=12, batch_size=64, lr=0.05, schedule="cosine", checkpoint_every=0)
    state = fit(model, cfg, poisoned.x, poisoned.y, seed=0)
    before = evaluate(model, state.variables, ds.x_test, ds.y_test, 10, x_asr, y_asr)
    assert before["asr"] > 0.8, before  # the backdoor is in: the defense has something to find
    feats = extract_features(model, state.variables, poisoned.x, "penultimate")
    return dict(ds=ds, model=model, state=state, poisoned=poisoned, feats=feats, x_asr=x_asr, y_asr=y_asr, cfg=cfg)


def separated_cluster(seed=0, n_per_class=300, d=48, n_poison=30, target=2, shift=6.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(5), n_per_class)
    reps = rng.standard_normal((len(y), d)).astype(np.float32) + 3.0  # a nonzero mean, like ReLU features
    poison = np.zeros(len(y), bool)
    poison[rng.choice(np.flatnonzero(y == target), n_poison, replace=False)] = True
    direction = rng.standard_normal(d).astype(np.float32)
    reps[poison] += shift * direction / np.linalg.norm(direction)
    return reps, y, poison


# ---------------------------------------------------------------------------------------------------------------
# randomized SVD vs exact


def test_randomized_matches_exact_on_real_representations(digits_badnets):
    feats, y = digits_badnets["feats"], digits_badnets["poisoned"].y
    for centered in (True, False):
        r = S.spectral_filter(feats, y, eps=0.3, centered=centered)
        # One BLAS thread: these SVDs are tiny, and XLA:CPU's threads still spinning after the JAX work above make
        # a multi-threaded OpenBLAS ~20x slower on 2 cores.
        with threadpool_limits(1):
            e = S.spectral_filter(feats, y, eps=0.3, centered=centered, method="exact")
        np.testing.assert_array_equal(r.removed, e.removed)
        for c in range(10):
            m = y == c
            corr = np.corrcoef(r.scores[m].astype(np.float64), e.scores[m])[0, 1]
            assert corr >= 0.999, (c, centered, corr)
            assert r.per_class[c]["sigma"] == pytest.approx(e.per_class[c]["sigma"], rel=1e-4)


def test_randomized_top_singular_vector_jit_vmap_and_padding():
    rng = np.random.default_rng(1)
    u, v0 = rng.standard_normal((200, 1)), rng.standard_normal((1, 64))
    a = (5 * u @ v0 + rng.standard_normal((200, 64))).astype(np.float32)
    v_exact = np.linalg.svd(a, full_matrices=False)[2][0]
    f = jax.jit(S.randomized_top_singular_vector)
    v = np.asarray(f(a, jax.random.key(0)))
    assert abs(v @ v_exact) == pytest.approx(1.0, abs=1e-5)
    padded = np.concatenate([a, np.zeros((56, 64), np.float32)])  # zero rows (padding) change nothing
    stacked = np.stack([padded, padded[::-1].copy()])
    vs = np.asarray(jax.vmap(S.randomized_top_singular_vector)(stacked, jax.random.split(jax.random.key(2), 2)))
    assert abs(vs[0] @ v_exact) == pytest.approx(1.0, abs=1e-5) and abs(vs[1] @ v_exact) == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(np.asarray(S.randomized_top_singular_vector(np.zeros((5, 8), np.float32), jax.random.key(0)))).all()


def test_all_classes_scored_in_one_compiled_call():
    rng = np.random.default_rng(0)
    d = 23  # a width no other test uses, so the first call below must compile
    y = rng.integers(0, 7, 900)
    reps = rng.standard_normal((900, d)).astype(np.float32)
    before, cache_before = S.TRACE_COUNT, S.score_padded._cache_size()
    S.spectral_scores(reps, y)
    assert S.TRACE_COUNT == before + 1  # seven classes, one trace
    assert S.score_padded._cache_size() == cache_before + 1
    # other values and class sizes in the same padding bucket reuse the compiled function
    y2 = rng.integers(0, 7, 880)
    S.spectral_filter(rng.standard_normal((880, d)).astype(np.float32), y2, eps=0.1)
    S.spectral_scores(reps, y, centered=False)  # the official code's variant is a traced flag, not a new compile
    assert S.TRACE_COUNT == before + 1


def test_pad_by_class_layout():
    y = np.array([2, 0, 2, 2, 5])
    reps = np.arange(10, dtype=np.float32).reshape(5, 2)
    padded, mask, index = S.pad_by_class(reps, y, (2, 5), multiple=4)
    assert padded.shape == (2, 4, 2) and mask.sum(1).tolist() == [3, 1]
    np.testing.assert_array_equal(index[0, :3], [0, 2, 3])
    np.testing.assert_array_equal(padded[1, 0], reps[4])
    assert (padded[~mask] == 0).all() and (index[~mask] == -1).all()


# ---------------------------------------------------------------------------------------------------------------
# catching poisons


def test_synthetic_cluster_is_caught():
    reps, y, poison = separated_cluster()
    res = S.spectral_filter(reps, y, eps=0.1, poison_mask=poison)
    assert res.metrics["tpr"] == 1.0 and res.metrics["poison_left"] == 0 and res.metrics["auc"] > 0.99
    # the rule: ceil(1.5 * 0.1 * 300) = 45 removed from every class
    assert [row["n_removed"] for row in res.per_class] == [45] * 5
    assert res.keep.sum() == len(y) - 5 * 45
    pct = S.spectral_filter(reps, y, mode="percentile", poison_mask=poison)  # the official code's rule
    assert pct.metrics["tpr"] == 1.0
    count = S.spectral_filter(reps, y, eps=30, poison_mask=poison)  # eps as a per-class count: remove 45
    np.testing.assert_array_equal(count.removed, res.removed)


def test_analyse_only_given_labels():
    reps, y, poison = separated_cluster()
    res = S.spectral_filter(reps, y, eps=0.1, labels=[2], poison_mask=poison, centered=False)
    assert res.labels == (2,) and np.isnan(res.scores[y != 2]).all() and np.isfinite(res.scores[y == 2]).all()
    assert not res.removed[y != 2].any() and res.removed.sum() == 45
    assert res.metrics["tpr"] == 1.0
    summary = res.summary()
    assert summary["labels"] == [2] and summary["per_class"][0]["n_poison"] == 30


def test_digits_badnets_poisons_are_caught(digits_badnets):
    feats, p = digits_badnets["feats"], digits_badnets["poisoned"]
    res = S.spectral_filter(feats, p.y, eps=0.3, poison_mask=p.mask)
    m = res.metrics
    assert m["tpr"] >= 0.7 and m["auc"] > 0.8, m
    target_row = res.per_class[TARGET]
    assert target_row["poison_removed"] == m["poison_removed"]  # poisons only live in the target class
    # analysing the target label only (the official code) finds the same poisons with few clean removals
    only = S.spectral_filter(feats, p.y, eps=0.3, labels=[TARGET], poison_mask=p.mask)
    assert only.metrics["poison_removed"] == m["poison_removed"] and only.metrics["fpr"] < 0.05


def test_retrain_on_kept_data(digits_badnets):
    d = digits_badnets
    p, ds = d["poisoned"], d["ds"]
    keep = ~p.mask  # a perfect filter: retraining on clean data must not learn the backdoor
    cfg = TrainConfig(model="mnist_cnn", epochs=3, batch_size=64, lr=0.05, schedule="cosine", checkpoint_every=0)
    _, after = S.retrain(d["model"], cfg, p.x, p.y, keep, num_classes=10, x_test=ds.x_test, y_test=ds.y_test,
                         x_asr=d["x_asr"], y_asr=d["y_asr"], seed=0)
    assert after["n_train"] == int(keep.sum()) and after["clean_acc"] > 0.7 and after["asr"] < 0.2
    with pytest.raises(ConfigError, match="keep mask"):
        S.retrain(d["model"], cfg, p.x, p.y, keep[:-1], num_classes=10, x_test=ds.x_test, y_test=ds.y_test)


# ---------------------------------------------------------------------------------------------------------------
# feature extraction


def test_extract_features_matches_apply_and_pads_last_batch(digits_badnets):
    d = digits_badnets
    x = d["poisoned"].x[:37]
    feats = extract_features(d["model"], d["state"].variables, x, "conv2", batch_size=16)  # 16 + 16 + 5 (padded)
    assert feats.dtype == np.float32 and feats.shape == (37, int(np.prod(feature_shapes(d["model"], (8, 8, 1))["conv2"])))
    _, direct = d["model"].apply(d["state"].variables, jnp.asarray(x, jnp.float32) / 255.0, features=True)
    np.testing.assert_allclose(feats, np.asarray(direct["conv2"]).reshape(37, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[:5], extract_features(d["model"], d["state"].variables, x[:5], "conv2"),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input


class NoFeatures(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_unknown_layer_lists_available(digits_badnets):
    d = digits_badnets
    with pytest.raises(ConfigError, match=r"unknown feature layer 'fc9'.*available layers: conv1.*penultimate"):
        extract_features(d["model"], d["state"].variables, d["poisoned"].x[:4], "fc9")


class LogitsOnly(nn.Module):
    """Accepts features=True but ignores it."""

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("cls", [NoFeatures, LogitsOnly])
def test_model_without_features_output(cls):
    model = cls()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ConfigError, match=f"model {cls.__name__} has no features output"):
        extract_features(model, variables, np.zeros((4, 8, 8, 1), np.uint8), "penultimate")


def test_eps_larger_than_a_class():
    reps, y, _ = separated_cluster()
    with pytest.raises(ConfigError, match="eps is too large for label 0"):
        S.spectral_filter(reps, y, eps=250)  # 1.5 x 250 >= 300 samples
    with pytest.raises(ConfigError, match="fraction of each class and must be in"):
        S.spectral_filter(reps, y, eps=1.5)
    with pytest.raises(ConfigError, match="eps is too large"):
        S.spectral_filter(reps, y, eps=0.7)  # ceil(1.5 * 0.7 * 300) = 315 > 300
    with pytest.raises(ConfigError, match="needs eps"):
        S.spectral_filter(reps, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="median", eps=0.1), "mode must be one of eps, percentile, got 'median'"),
    (dict(method="lanczos", eps=0.1), "method must be one of randomized, exact"),
    (dict(mode="percentile", percentile=100), "percentile must be a number in"),
    (dict(eps=0.1, labels=[7]), "label 7 has no samples"),
    (dict(eps=0.1, n_iter=-1), "n_iter must be a non-negative integer"),
    (dict(eps=True), "eps must be a fraction"),
])
def test_bad_options(kwargs, match):
    reps, y, _ = separated_cluster(n_per_class=40)
    with pytest.raises(ConfigError, match=match):
        S.spectral_filter(reps, y, **kwargs)


def test_bad_arrays():
    reps, y, poison = separated_cluster(n_per_class=40)
    with pytest.raises(ConfigError, match="200 representations but 199 labels"):
        S.spectral_filter(reps, y[:-1], eps=0.1)
    with pytest.raises(ConfigError, match="numeric"):
        S.spectral_filter(reps[:, 0], y, eps=0.1)
    with pytest.raises(ConfigError, match="poison_mask has shape"):
        S.spectral_filter(reps, y, eps=0.1, poison_mask=poison[:-1])
