"""Universal Litmus Patterns: the regulariser, pooling, a meta-training run over a small stacked zoo, scores,
baseline, figures, bad input. The zoo here is randomly initialised models (fast); tests/test_zoo.py trains real ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.defenses import ulp
from bdjax.zoo import population as pop
from bdjax.zoo.plan import ModelRecord

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def random_zoo():
    model = get_model("mnist_cnn", 10, width=8, hidden=16)
    recs = [ModelRecord(index=i, poisoned=bool(i % 2), seed=100 + i, trigger="t", trigger_id=0, source=0, target=1,
                        corner="top_left") for i in range(12)]
    tasks = pop.tasks_from_records(recs, SHAPE, (2, 2))
    states = pop.init_population(model, optax.sgd(0.1), tasks, SHAPE)
    variables = jax.device_get({"params": states.params})
    labels = np.array([r.poisoned for r in recs], np.int32)
    return model, variables, labels


def test_total_variation_by_hand():
    z = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(2.0)
    assert float(ulp.total_variation(z)) == pytest.approx(8.0)  # 4 neighbours, |2 - 0| each way


def test_pooling_shapes():
    logits = jnp.ones((5, 3, 10))
    assert ulp.pool_logits(logits, "concat").shape == (5, 30) and ulp.pool_logits(logits, "avg").shape == (5, 10)


def test_ulp_fits_its_training_zoo_and_scores_every_model(random_zoo, tmp_path):
    model, variables, labels = random_zoo
    cfg = ulp.ULPConfig(n_patterns=2, epochs=40, batch_models=4, classifier_lr=0.05)
    res = ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, cfg)
    assert res.patterns.shape == (2, *SHAPE) and res.patterns.min() >= 0 and res.patterns.max() <= 1
    assert res.classifier["kernel"].shape == (20, 2) and len(res.history) == 40
    assert res.val_acc == max(h["val_acc"] for h in res.history) >= 0.9  # best epoch kept
    ev = ulp.evaluate_ulp(model, res, variables, labels)
    assert ev["scores"].shape == (12,) and ev["auc"] >= 0.9
    ulp.save_patterns(tmp_path / "p.png", res)
    ulp.save_roc(tmp_path / "roc.png", {"ULP": (ev["scores"], labels)})
    for f in ("p.png", "roc.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


def test_patterns_move_and_the_tv_term_smooths_them(random_zoo):
    model, variables, labels = random_zoo
    base = ulp.ULPConfig(n_patterns=1, epochs=5, batch_models=4, pattern_lr=1.0)
    plain = ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, dataclasses_replace(base, tv_weight=0.0))
    smooth = ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, dataclasses_replace(base, tv_weight=0.02))
    z0 = jax.random.uniform(jax.random.split(jax.random.key(0))[0], (1, *SHAPE))
    assert not np.allclose(plain.patterns, z0)
    assert float(ulp.total_variation(jnp.asarray(smooth.patterns))) < float(ulp.total_variation(jnp.asarray(plain.patterns)))


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_noise_baseline_returns_an_auc(random_zoo):
    model, variables, labels = random_zoo
    out = ulp.noise_baseline(model, variables, labels, variables, labels, SHAPE, n_patterns=2, batch_models=4)
    assert 0.0 <= out["auc"] <= 1.0 and out["scores"].shape == (12,)


def test_bad_input(random_zoo):
    model, variables, labels = random_zoo
    with pytest.raises(ConfigError, match="12 models|labels for models stacked"):
        ulp.train_ulp(model, variables, labels[:5], variables, labels, SHAPE, 10, ulp.ULPConfig(epochs=1))
    with pytest.raises(ConfigError, match="0 \\(clean\\) or 1 \\(poisoned\\)"):
        ulp.train_ulp(model, variables, labels + 1, variables, labels, SHAPE, 10, ulp.ULPConfig(epochs=1))
    with pytest.raises(ConfigError, match="pooling must be concat or avg"):
        ulp.ULPConfig(pooling="max").validate()
