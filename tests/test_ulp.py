"""Universal Litmus Patterns: the regulariser, pooling, detection of held-out backdoored models (conftest's trained
digits zoos), the scores, the noise baseline, figures, bad input; the reference's schedule on randomly initialised
models (fast)."""

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


def test_log_softmax_features_ignore_each_models_logit_offset():
    logits = jax.random.normal(jax.random.key(0), (3, 2, 10))
    shifted = logits + jnp.arange(6.0).reshape(3, 2, 1) * 7.0  # a constant per model and pattern
    np.testing.assert_allclose(ulp.pool_logits(shifted, "concat", "log_softmax"),
                               ulp.pool_logits(logits, "concat", "log_softmax"), atol=1e-5)
    assert not np.allclose(ulp.pool_logits(shifted, "concat"), ulp.pool_logits(logits, "concat"))
    with pytest.raises(ConfigError, match="features must be logits or log_softmax"):
        ulp.ULPConfig(features="softmax").validate()


def test_pooling_shapes():
    logits = jnp.ones((5, 3, 10))
    assert ulp.pool_logits(logits, "concat").shape == (5, 30) and ulp.pool_logits(logits, "avg").shape == (5, 10)


@pytest.fixture(scope="module")
def trained_zoos(ulp_run):
    """(model, image shape, (vars, labels) of meta-train, meta-val and the held-out test zoo, pipeline config):
    the kept models of conftest's detectable digits zoos (test zoo: other models, unseen triggers)."""
    from bdjax.pipelines import ulp as pipe
    from bdjax.zoo import ZooStore

    out, _, cfg = ulp_run
    model = get_model(cfg.train.model, 2, **cfg.train.model_kwargs())
    zoos = pipe.meta_zoos(cfg, ZooStore.open(out / "zoo_train"), ZooStore.open(out / "zoo_test"))
    return model, (8, 8, 1), zoos, cfg


def test_ulp_finds_backdoors_of_held_out_models(trained_zoos, tmp_path):
    from bdjax.pipelines import ulp as pipe

    model, shape, ((tv, ty), (vv, vy), (ev, ey)), cfg = trained_zoos
    ucfg = ulp.ULPConfig(n_patterns=2, epochs=30, batch_models=24, features="log_softmax", init="stamped",
                         pattern_lr=0.1)
    ds = pipe.load_zoo_data(cfg.zoo_config("train"))
    res = ulp.train_ulp(model, tv, ty, vv, vy, shape, 2, ucfg, init_patterns=pipe.initial_patterns(cfg, ds, 2))
    assert res.patterns.shape == (2, *shape) and res.patterns.min() >= 0 and res.patterns.max() <= 1
    assert res.classifier["kernel"].shape == (4, 2) and len(res.history) == 30
    assert res.val_acc == max(h["val_acc"] for h in res.history)  # best validation epoch kept
    assert len(set(map(tuple, ev["params"]["conv1"]["kernel"].reshape(len(ey), -1)[:, :3]))) == len(ey)
    ev_ = ulp.evaluate_ulp(model, res, ev, ey)
    assert ev_["scores"].shape == (len(ey),) and ev_["auc"] >= 0.9, ev_  # models it never saw, unseen triggers
    # the scores are the detector's own: P(poisoned) from h over the pooled log-softmax of the patterns
    f = jax.vmap(lambda v: ulp.pool_logits(model.apply(v, jnp.asarray(res.patterns), train=False)[None], "concat",
                                           "log_softmax")[0])(ev)
    want = jax.nn.softmax(f @ res.classifier["kernel"] + res.classifier["bias"], -1)[:, 1]
    np.testing.assert_allclose(ev_["scores"], want, atol=1e-5)
    ulp.save_patterns(tmp_path / "p.png", res)
    ulp.save_roc(tmp_path / "roc.png", {"ULP": (ev_["scores"], ey)})
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


def test_init_patterns_start_the_search_and_are_checked(random_zoo):
    model, variables, labels = random_zoo
    init = np.full((1, *SHAPE), 0.5, np.float32)
    cfg = ulp.ULPConfig(n_patterns=1, epochs=1, batch_models=4, pattern_lr=1e-9)
    res = ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, cfg, init_patterns=init)
    np.testing.assert_allclose(res.patterns, init, atol=1e-6)
    with pytest.raises(ConfigError, match=r"init_patterns must be \(1, 8, 8, 1\) with values in \[0, 1\]"):
        ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, cfg, init_patterns=init * 3)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_noise_baseline_is_logistic_regression_on_the_noise_logits(trained_zoos):
    from sklearn.linear_model import LogisticRegression

    from bdjax.defenses.metrics import roc_auc

    model, shape, ((tv, ty), _, (ev, ey)), _ = trained_zoos
    out = ulp.noise_baseline(model, tv, ty, ev, ey, shape, n_patterns=3, seed=4, batch_models=8, features="log_softmax")
    z = jax.random.uniform(jax.random.key(4), (3, *shape))
    feats = lambda v: np.asarray(jax.vmap(lambda w: jax.nn.log_softmax(model.apply(w, z, train=False)).reshape(-1))(v))
    want = LogisticRegression(C=10.0, max_iter=5000).fit(feats(tv), ty).predict_proba(feats(ev))[:, 1]
    np.testing.assert_allclose(out["scores"], want, atol=1e-4)
    assert out["auc"] == pytest.approx(roc_auc(want, ey.astype(bool)))
    assert out["acc"] == pytest.approx(np.mean((want > 0.5) == ey))


def test_bad_input(random_zoo):
    model, variables, labels = random_zoo
    with pytest.raises(ConfigError, match="12 models|labels for models stacked"):
        ulp.train_ulp(model, variables, labels[:5], variables, labels, SHAPE, 10, ulp.ULPConfig(epochs=1))
    with pytest.raises(ConfigError, match="0 \\(clean\\) or 1 \\(poisoned\\)"):
        ulp.train_ulp(model, variables, labels + 1, variables, labels, SHAPE, 10, ulp.ULPConfig(epochs=1))
    with pytest.raises(ConfigError, match="pooling must be concat or avg"):
        ulp.ULPConfig(pooling="max").validate()


def _reference_loop(model, variables, labels, cfg, image_shape, num_classes):
    """The reference's schedule written plainly: models one at a time, h stepped after each model, the patterns
    stepped with the mean of the batch's per-model gradients (plus TV) after every batch."""
    key_z, key_h = jax.random.split(jax.random.key(cfg.seed))
    z = jax.random.uniform(key_z, (cfg.n_patterns, *image_shape))
    d = cfg.n_patterns * num_classes
    kh, kb = jax.random.split(key_h)
    lim = 1.0 / np.sqrt(d)
    h = {"kernel": jax.random.uniform(kh, (d, 2), minval=-lim, maxval=lim),
         "bias": jax.random.uniform(kb, (2,), minval=-lim, maxval=lim)}
    tx_z, tx_h = optax.sgd(cfg.pattern_lr), optax.adam(cfg.classifier_lr)
    oz, oh = tx_z.init(z), tx_h.init(h)

    def loss(z, h, v, y):
        f = model.apply(v, z, train=False).reshape(-1)
        return optax.softmax_cross_entropy_with_integer_labels(f @ h["kernel"] + h["bias"], y)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), cfg.batch_models):
            g_zs = []
            for i in order[start:start + cfg.batch_models]:
                g_z, g_h = grad(z, h, jax.tree.map(lambda a: a[i], variables), labels[i])
                g_zs.append(g_z)
                u, oh = tx_h.update(g_h, oh, h)
                h = optax.apply_updates(h, u)
            g = jnp.mean(jnp.stack(g_zs), 0) + cfg.tv_weight * jax.grad(ulp.total_variation)(z)
            u, oz = tx_z.update(g, oz, z)
            z = jnp.clip(optax.apply_updates(z, u), 0.0, 1.0)
    return np.asarray(z), jax.tree.map(np.asarray, h)


def test_per_model_classifier_steps_follow_the_reference_loop(random_zoo):
    """12 models in batches of 5 (a padded last batch), 2 epochs: the compiled step equals the plain loop."""
    model, variables, labels = random_zoo
    cfg = ulp.ULPConfig(n_patterns=2, epochs=2, batch_models=5, pattern_lr=0.5, classifier_lr=0.01, tv_weight=0.01)
    res = ulp.train_ulp(model, variables, labels, variables, labels, SHAPE, 10, cfg)
    # train_ulp keeps its best-validation epoch: run the loop for as many epochs
    z, h = _reference_loop(model, variables, labels, dataclasses_replace(cfg, epochs=res.best_epoch), SHAPE, 10)
    assert not np.allclose(res.patterns, jax.random.uniform(jax.random.split(jax.random.key(0))[0], (2, *SHAPE)))
    np.testing.assert_allclose(res.patterns, z, atol=1e-5)
    np.testing.assert_allclose(res.classifier["kernel"], h["kernel"], atol=1e-5)


ULP_SHARDED_SCRIPT = r"""
import json, os, sys
os.environ["BDJAX_CPU_DEVICES"] = "4"
sys.path.insert(0, sys.argv[1])
import bdjax, jax, numpy as np, optax
assert jax.device_count() == 4, jax.devices()
from bdjax.defenses import ulp
from bdjax.models import get_model
from bdjax.zoo import population as pop
from bdjax.zoo.plan import ModelRecord
shape = (8, 8, 1)
model = get_model("mnist_cnn", 10, width=4, hidden=8)
recs = [ModelRecord(index=i, poisoned=bool(i % 2), seed=7 + i, trigger="t", trigger_id=0, source=0, target=1,
                    corner="top_left") for i in range(8)]
states = pop.init_population(model, optax.sgd(0.1), pop.tasks_from_records(recs, shape, (2, 2)), shape)
v = jax.device_get({"params": states.params})
y = np.array([r.poisoned for r in recs], np.int32)
cfg = ulp.ULPConfig(n_patterns=2, epochs=3, batch_models=4, pattern_lr=0.5, classifier_lr=0.01)
assert pop.model_mesh(4) is not None
sharded = ulp.train_ulp(model, v, y, v, y, shape, 10, cfg)
pop.model_mesh = lambda n: None
ulp._compiled.cache_clear()
single = ulp.train_ulp(model, v, y, v, y, shape, 10, cfg)
print(json.dumps({"z": float(np.max(np.abs(sharded.patterns - single.patterns))),
                  "h": float(np.max(np.abs(sharded.classifier["kernel"] - single.classifier["kernel"]))),
                  # accuracies are counts (exact); losses are float means whose reduction order may differ
                  "same_accs": [{k: v for k, v in h.items() if k != "loss"} for h in sharded.history]
                               == [{k: v for k, v in h.items() if k != "loss"} for h in single.history],
                  "loss": max(abs(a["loss"] - b["loss"]) for a, b in zip(sharded.history, single.history))}))
"""


def test_ulp_sharded_over_4_simulated_devices_equals_one_device():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BDJAX_PROGRESS": "0"}
    r = subprocess.run([sys.executable, "-c", ULP_SHARDED_SCRIPT, str(root)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["z"] < 1e-5 and out["h"] < 1e-5 and out["same_accs"] and out["loss"] < 1e-5, out
