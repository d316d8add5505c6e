"""The SSL backdoor experiment end to end on real CIFAR-10 images at a smoke size (experiments/ssl_backdoor_cifar10.py
--scale tiny, smaller still): the poison counts, the rows and their FP accounting, the seeds' table, the summary's
ratio and the attack monitor during pretraining."""
import json

import numpy as np
import pytest

from conftest import load_script, require_data_root

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    require_data_root("cifar10")
    from bdjax.config import apply_overrides
    from bdjax.ssl.experiment import run

    exp = load_script("experiments/ssl_backdoor_cifar10.py")
    cfg = apply_overrides(exp.get_config("moco", "tiny"), ["n_train=512", "n_val=300", "widths=[4,4,4,4]",
                                                           "moco.queue_size=128", "linear.epochs=3"])
    out = tmp_path_factory.mktemp("ssl")
    return cfg, out, run(cfg, out)


def test_rows_count_the_target_false_positives_of_each_model(smoke):
    from bdjax.data import load_dataset
    from bdjax.ssl.experiment import _subset

    cfg, out, summary = smoke
    ds = load_dataset("cifar10")
    rng = np.random.default_rng(cfg.seed)  # the experiment's own draws, in its order
    y_tr = ds.y_train[_subset(rng, len(ds.x_train), cfg.n_train)]
    y_va = ds.y_test[_subset(rng, len(ds.x_test), cfg.n_val)]
    target = cfg.poison.target
    assert summary["n_poisoned"] == round(cfg.poison.rate * np.sum(y_tr == target)) > 0
    assert summary["n_patched"] == np.sum(y_va != target)  # every non-target validation image, patched
    rows = summary["rows"]
    assert [(r["model"], r["fraction"]) for r in rows] == [("clean", 0.1), ("backdoored", 0.1)]
    for r in rows:
        assert r["method"] == "moco"
        assert 0 <= r["clean_fp"] <= np.sum(y_va != target) and 0 <= r["patched_fp"] <= summary["n_patched"]
    by = {r["model"]: r for r in rows}
    assert summary["patched_fp_ratio"]["0.1"] == by["backdoored"]["patched_fp"] / max(by["clean"]["patched_fp"], 1)
    assert summary["asr"] == by["backdoored"]["patched_fp"] / summary["n_patched"]


def test_table_is_the_seeds_layout_of_the_rows(smoke):
    _, out, summary = smoke
    lines = (out / "moco" / "table.md").read_text().splitlines()
    assert lines[0].startswith("| Method | labels | Clean model: clean Acc | FP") and len(lines) == 3
    by = {r["model"]: r for r in summary["rows"]}
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    expected = ["moco", "0.1"]
    for m in ("clean", "backdoored"):
        expected += [f"{by[m]['clean_acc'] * 100:.1f}", str(by[m]["clean_fp"]), f"{by[m]['patched_acc'] * 100:.1f}",
                     str(by[m]["patched_fp"])]
    assert cells == expected
    assert json.loads((out / "moco" / "summary.json").read_text())["rows"] == summary["rows"]


def test_pretraining_logs_the_knn_monitor_with_the_attack_share(smoke):
    cfg, out, summary = smoke
    n_probe = min(summary["n_patched"], 2000)
    for name in ("clean", "backdoored"):
        records = [json.loads(l) for l in (out / "moco" / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "knn_acc" in r]
        assert len(evals) == cfg.train.epochs // cfg.knn_every
        for r in evals:  # shares of the 300 validation images and of the patched probe: whole counts
            assert r["knn_acc"] * cfg.n_val == pytest.approx(round(r["knn_acc"] * cfg.n_val), abs=1e-6)
            assert r["knn_patched_target"] * n_probe == pytest.approx(round(r["knn_patched_target"] * n_probe),
                                                                      abs=1e-6)
