"""SSL poisoning (target category only, random placement) and linear evaluation (subsets, features, FP, kNN)."""
import json

import numpy as np
import pytest
import jax

from bdjax.errors import BdjaxError, ConfigError
from bdjax.ssl import linear_eval as L
from bdjax.ssl import poison
from bdjax import triggers


def test_poison_touches_half_the_target_category_only():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    trig = triggers.checkerboard(3, 3)
    out, idx = poison.poison_target_category(jax.random.key(0), x, y, poison.PoisonConfig(target=2, rate=0.5), trig)
    assert len(idx) == 5 and (y[idx] == 2).all()
    changed = np.flatnonzero((out != x).reshape(40, -1).any(1))
    assert set(changed) <= set(idx) and len(changed) >= 4  # a random spot may already hold the pattern: rare
    for i in idx:  # a 3x3 checkerboard somewhere in each poisoned image, at its own position
        d = out[i].astype(int)
        hits = [(r, c) for r in range(10) for c in range(10)
                if (d[r:r + 3, c:c + 3] == np.asarray(trig.pattern * 255).astype(int)).all()]
        assert hits


def test_htba_trigger_loads_and_an_unreadable_one_is_a_one_line_error(tmp_path):
    trig = poison.load_trigger(poison.PoisonConfig())
    assert trig.pattern.shape == (8, 8, 3) and 0 <= float(trig.pattern.min()) <= float(trig.pattern.max()) <= 1
    bad = tmp_path / "trigger.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BdjaxError, match="cannot read trigger image") as e:
        poison.load_trigger(poison.PoisonConfig(trigger=str(bad)))
    assert "\n" not in str(e.value)
    with pytest.raises(BdjaxError, match="trigger image not found"):
        poison.load_trigger(poison.PoisonConfig(trigger=str(tmp_path / "missing.png")))


def test_a_poison_rate_larger_than_the_target_category_is_a_config_error():
    with pytest.raises(ConfigError, match=r"poison.rate=1.5 must be a fraction of the target category"):
        poison.PoisonConfig(rate=1.5).validate(10)
    with pytest.raises(ConfigError, match="poison.target=10 is not a class"):
        poison.PoisonConfig(target=10).validate(10)
    x, y = np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ConfigError, match="poison.rate=2.0"):
        poison.poison_target_category(jax.random.key(0), x, y, poison.PoisonConfig(target=1, rate=2.0),
                                      triggers.patch(2, 3))


def test_labelled_subset_is_per_class_and_an_empty_class_is_an_error():
    y = np.concatenate([np.zeros(200, int), np.ones(100, int), np.full(50, 2)])
    idx = L.labelled_subset(0, y, 0.1, 3)
    np.testing.assert_array_equal(np.bincount(y[idx]), [20, 10, 5])
    with pytest.raises(ConfigError, match="linear_eval.fraction=0.01 leaves class 2 empty"):
        L.labelled_subset(0, y, 0.01, 3)


def test_false_positives_are_column_sum_minus_diagonal():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 1, 1, 2])
    conf = L.confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [0, 2, 1]])
    assert L.false_positives(conf, 1) == 3 and L.false_positives(conf, 0) == 0
    m = L.backdoor_metrics(y_true, y_pred, y_true[:4], np.ones(4, int), 1, 3)
    assert m == {"clean_acc": pytest.approx(4 / 7), "clean_fp": 3, "patched_acc": 0.5, "patched_fp": 2}


def test_features_are_l2_normalised_then_standardised():
    rng = np.random.default_rng(0)
    train, other = rng.normal(size=(50, 4)) * 5 + 2, rng.normal(size=(10, 4))
    t, o = L.normalise_features(train, other)
    np.testing.assert_allclose(t.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(t.std(0), 1, atol=1e-4)
    u = train / np.linalg.norm(train, axis=1, keepdims=True)
    np.testing.assert_allclose(o[0], (other[0] / np.linalg.norm(other[0]) - u.mean(0)) / (u.std(0) + 1e-6))


def test_knn_by_hand():
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 0, 1])
    test = np.array([[1.0, 0.05], [0.1, 1.0]])
    np.testing.assert_array_equal(L.knn_predict(bank, labels, test, 2, k=1), [0, 1])
    # k = 3 with a hot temperature: the two class-0 neighbours outvote the single class-1 one everywhere
    np.testing.assert_array_equal(L.knn_predict(bank, labels, test, 2, k=3, temperature=100.0), [0, 0])


def test_knn_monitor_counts_patched_images_sent_to_the_target():
    import flax.linen as nn
    from types import SimpleNamespace

    class Flat(nn.Module):  # features = the pixels themselves
        def __call__(self, x):
            return x.reshape(len(x), -1)

        def features(self, x):
            return self(x)

    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32).reshape(4, 1, 2, 1)
    labels = np.array([0, 0, 1, 1])
    patched = np.array([[0.05, 1.0], [0.0, 0.8], [1.0, 0.0]], np.float32).reshape(3, 1, 2, 1)  # 2 of 3 near 1
    state = SimpleNamespace(variables={})
    rec = L.knn_monitor(Flat(), bank, labels, bank, labels, 2, k=1, x_patched=patched, target=1)(state)
    assert rec["knn_acc"] == 1.0 and rec["knn_patched_target"] == pytest.approx(2 / 3)
    assert "knn_patched_target" not in L.knn_monitor(Flat(), bank, labels, bank, labels, 2, k=1)(state)


def test_linear_classifier_learns_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3
    y = np.repeat(np.arange(3), 40)
    f = centres[y] + rng.normal(size=(120, 6))
    (ft,) = L.normalise_features(f)
    head, variables = L.train_linear(ft, y, 3, L.LinearEvalConfig(fraction=1.0, epochs=20, lr=0.1, batch_size=40))
    assert np.mean(L.predict_linear(head, variables, ft) == y) > 0.95


def test_experiment_rows_table_and_fp_ratio():
    from bdjax.ssl import experiment as E
    rows = [{"method": "moco", "model": "clean", "fraction": 0.01, "clean_acc": 0.5, "clean_fp": 20,
             "patched_acc": 0.45, "patched_fp": 25},
            {"method": "moco", "model": "backdoored", "fraction": 0.01, "clean_acc": 0.49, "clean_fp": 22,
             "patched_acc": 0.30, "patched_fp": 400}]
    assert E.fp_ratio(rows, 0.01) == 16.0
    lines = E.table(rows).splitlines()
    assert lines[2] == "| moco | 0.01 | 50.0 | 20 | 45.0 | 25 | 49.0 | 22 | 30.0 | 400 |"
    with pytest.raises(ConfigError, match="method must be one of moco, byol, rotnet, jigsaw, got 'simclr'"):
        E.SSLExperimentConfig(method="simclr").validate()
    with pytest.raises(ConfigError, match="label_draws must be >= 1"):
        E.SSLExperimentConfig(label_draws=0).validate()
    for r, fp in zip(rows, (20.4, 399.75)):  # means over label draws print with one decimal
        r["patched_fp"] = fp
    assert E.table(rows).splitlines()[2] == "| moco | 0.01 | 50.0 | 20 | 45.0 | 20.4 | 49.0 | 22 | 30.0 | 399.8 |"


def test_evaluate_linear_averages_its_label_draws():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 2
    y_tr, y_va = np.repeat(np.arange(3), 100), np.repeat(np.arange(3), 30)
    f_tr, f_va = centres[y_tr] + rng.normal(size=(300, 6)), centres[y_va] + rng.normal(size=(90, 6))
    keep = y_va != 0
    f_pa, y_pa = f_va[keep] + 0.6 * (centres[0] - centres[y_va[keep]]), y_va[keep]  # pulled towards the target
    cfg = L.LinearEvalConfig(epochs=5, batch_size=8, lr=0.05)
    kw = dict(fraction=0.05, target=0, num_classes=3, cfg=cfg)
    singles = [L.evaluate_linear(f_tr, y_tr, f_va, y_va, f_pa, y_pa, seed=s, **kw) for s in (4, 5, 6)]
    assert all(isinstance(r["patched_fp"], int) and "label_draws" not in r for r in singles)
    assert not np.array_equal(L.labelled_subset(4, y_tr, 0.05, 3), L.labelled_subset(5, y_tr, 0.05, 3))
    many = L.evaluate_linear(f_tr, y_tr, f_va, y_va, f_pa, y_pa, seed=4, draws=3, **kw)
    assert many["label_draws"] == 3
    for k in ("clean_acc", "clean_fp", "patched_acc", "patched_fp"):
        values = [r[k] for r in singles]
        assert many[k] == pytest.approx(np.mean(values)) and many[f"{k}_std"] == pytest.approx(np.std(values))
    assert many["patched_fp"] > many["clean_fp"]  # the pull towards the target shows in the mean


def test_a_rerun_refuses_checkpoints_of_other_pretraining_settings(tmp_path):
    from bdjax.config import apply_overrides
    from bdjax.results import RunDir
    from bdjax.ssl import experiment as E

    out = RunDir(tmp_path / "moco")
    cfg = E.SSLExperimentConfig(n_train=1000)
    E.check_resumable(out, cfg)  # a new folder
    out.write_config(E.dataclasses.asdict(cfg))
    E.check_resumable(out, apply_overrides(cfg, ["train.epochs=5"]))  # no checkpoint yet: nothing to continue
    (out.path / "backdoored" / "checkpoints" / "40").mkdir(parents=True)
    E.check_resumable(out, cfg)
    # evaluation-only settings reuse the pretrainings
    E.check_resumable(out, apply_overrides(cfg, ["linear.epochs=7", "label_draws=5", "fractions=[0.1]", "knn_every=2"]))
    E.check_resumable(out, apply_overrides(cfg, ["byol.tau_base=0.9", "jigsaw.tile=6"]))  # another method's section
    for changed, named in ((["train.epochs=5"], "train.epochs"),
                           (["poison.trigger_size=12", "seed=3"], "poison.trigger_size, seed"),
                           (["moco.augment.blur_p=0"], "moco.augment.blur_p")):
        with pytest.raises(ConfigError, match=f"backdoored pretraining checkpoints made with other settings "
                                              f"\\({named}\\)"):
            E.check_resumable(out, apply_overrides(cfg, changed))
    # a config saved before a field existed (here label_draws, jigsaw) still resumes when nothing else changed
    saved = json.loads((out.path / "config.json").read_text())
    del saved["label_draws"], saved["jigsaw"]
    (out.path / "config.json").write_text(json.dumps(saved))
    E.check_resumable(out, cfg)
