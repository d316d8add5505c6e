"""The ULP experiment pipeline end to end on a small digits zoo whose backdoors ULP must find on held-out models
(conftest.ulp_run): rows, figures, resume without recomputation, rows recomputed when their settings change, and
bad input."""
import json
import shutil

import numpy as np
import pytest
from conftest import detect_config

from bdjax.config import apply_overrides, from_dict, matches_saved, saved_form
from bdjax.defenses.metrics import roc_auc
from bdjax.errors import ConfigError
from bdjax.pipelines import ulp as pipe
from bdjax.zoo import ZooStore

TINY = ["data.dataset=digits", "zoo.trigger_dir=random", "zoo.trigger_size=3", "zoo.n_clean=6", "zoo.n_poisoned=6",
        "zoo.chunk_size=6", "zoo.mode=vmap", "test_zoo.n_clean=3", "test_zoo.n_poisoned=3", "train.model_options=width=4,hidden=16",
        "train.epochs=3", "train.lr=0.01", "patterns=1,2", "ulp.epochs=4", "ulp.batch_models=6",
        "baselines.nc_models=2", "baselines.nc_images=64", "baselines.nc.batch_size=16",
        "baselines.nc.steps_per_check=2", "baselines.nc.max_checks=3"]


def tiny_config(*extra):
    return apply_overrides(pipe.ULPExperimentConfig(experiment="ulp_tiny", scale="test"), TINY + list(extra))


def kept_test_labels(out):
    return np.array([r.poisoned for r in ZooStore.open(out / "zoo_test").records if r.kept], bool)


def test_ulp_finds_the_backdoors_of_held_out_models(ulp_run):
    out, summary, _ = ulp_run
    got = [(r["method"], r["M"]) for r in summary["rows"]]
    assert got == [("ULP", 1), ("noise", 1), ("ULP", 2), ("noise", 2), ("neural_cleanse", None)]
    assert summary["M"] == 2 and summary["auc"] == summary["rows"][2]["auc"]
    # the test zoo: models never seen in meta-training, poisoned with the unseen test triggers
    assert summary["auc"] >= 0.9, summary["rows"]
    y = kept_test_labels(out)
    assert summary["zoo_test"]["n_kept"] == len(y) and 0 < y.sum() < len(y)
    for r in summary["rows"][:4]:  # each row's AUC is the one of its own scores over the kept test models
        scores = json.loads((out / "ulp" / f"{r['method'].lower()}_M{r['M']}.json").read_text())["value"]["test_scores"]
        assert len(scores) == len(y) and r["auc"] == pytest.approx(roc_auc(np.asarray(scores), y)) and r["scale"] == "test"
    with np.load(out / "ulp" / "ulp_M2.npz", allow_pickle=False) as z:
        assert z["patterns"].shape == (2, 8, 8, 1) and roc_auc(z["test_scores"], y) == summary["auc"]
    assert summary["rows"][-1]["n_models"] == 2
    assert summary["zoo_train"]["n_models"] == 24 and summary["zoo_test"]["n_models"] == 16
    assert summary["zoo_train"]["n_meta_train"] + summary["zoo_train"]["n_meta_val"] == summary["zoo_train"]["n_kept"]
    for f in ("roc.png", "ulp_patterns_M1.png", "ulp_patterns_M2.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert "| ULP | 2 |" in (out / "table.md").read_text()


def test_keep_filters_read_validation_accuracy(ulp_run):
    out, summary, cfg = ulp_run
    for which in ("zoo_train", "zoo_test"):
        for r in ZooStore.open(out / which).records:
            assert r.val_acc is not None and r.kept is (r.val_acc >= 0.8 and (not r.poisoned or r.val_asr >= 0.8))
    assert summary["zoo_train"]["mean_val_acc"] is not None


def _stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "ulp").iterdir()}


def test_rerun_resumes_without_recomputing(ulp_run):
    out, summary, cfg = ulp_run
    stamps = _stamps(out)
    again = pipe.run_ulp_experiment(cfg, out)
    assert _stamps(out) == stamps
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in summary["rows"]]
    assert json.loads((out / "summary.json").read_text())["rows"] == again["rows"]


@pytest.fixture
def run_copy(ulp_run, tmp_path):
    out, summary, cfg = ulp_run
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", summary, cfg


def test_changed_settings_recompute_the_rows_they_change(run_copy, capsys):
    out, summary, cfg = run_copy
    stamps = _stamps(out)
    # ULP's own setting: the ULP rows are recomputed, the noise and Neural Cleanse rows are still valid
    new = pipe.run_ulp_experiment(apply_overrides(cfg, ["ulp.epochs=3"]), out)
    assert [r["epochs"] for r in new["rows"] if r["method"] == "ULP"] == [3, 3]
    assert json.loads((out / "config.json").read_text())["ulp"]["epochs"] == 3
    after = _stamps(out)
    changed = {n for n in stamps if after[n] != stamps[n]}
    assert changed == {"ulp_M1.json", "ulp_M1.npz", "ulp_M2.json", "ulp_M2.npz"}
    assert "recomputing it" in capsys.readouterr().err
    # fewer M values: every remaining row is reused as it is
    fewer = pipe.run_ulp_experiment(apply_overrides(cfg, ["ulp.epochs=3", "patterns=2"]), out)
    assert _stamps(out) == after and fewer["rows"][0] == new["rows"][2]
    # the Neural Cleanse budget: only its row
    nc = pipe.run_ulp_experiment(apply_overrides(cfg, ["ulp.epochs=3", "baselines.nc.max_checks=2"]), out)
    assert {n for n, t in _stamps(out).items() if after.get(n) != t} == {"neural_cleanse.json",
                                                                          "neural_cleanse_partial.json"}
    assert nc["rows"][:4] == new["rows"][:4]
    # back to the first settings: recomputed again, to the first run's numbers
    back = pipe.run_ulp_experiment(cfg, out)
    assert [r["auc"] for r in back["rows"]] == [r["auc"] for r in summary["rows"]]


def test_rows_written_without_their_settings_are_vouched_for_by_the_old_config(run_copy):
    out, summary, cfg = run_copy
    for p in (out / "ulp").glob("*.json"):  # the format of a bdjax before the producers were recorded
        p.write_text(json.dumps(json.loads(p.read_text())["value"]))
    stamps = _stamps(out)
    pipe.run_ulp_experiment(cfg, out)  # config.json describes them: reused
    assert _stamps(out) == stamps
    pipe.run_ulp_experiment(apply_overrides(cfg, ["ulp.epochs=3"]), out)
    assert {n for n, t in _stamps(out).items() if stamps[n] != t} >= {"ulp_M1.json", "ulp_M2.json"}


def test_a_config_saved_with_the_old_nc_fields_reads_back():
    cfg = tiny_config()
    old = saved_form(cfg)  # as a bdjax with baselines.nc_batch etc. wrote it (and no other NC field)
    nc = old["baselines"].pop("nc")
    old["baselines"].update(nc_batch=nc["batch_size"], nc_steps_per_check=nc["steps_per_check"],
                            nc_max_checks=nc["max_checks"])
    assert from_dict(pipe.ULPExperimentConfig, old).baselines.nc == cfg.baselines.nc
    assert matches_saved(old, cfg) and not matches_saved(old, tiny_config("baselines.nc.batch_size=8"))


def test_split_is_stratified_and_disjoint():
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    tr, va = pipe.split_train_val(labels, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 20
    assert labels[va].sum() == 2 and (labels[va] == 0).sum() == 2


def test_nc_subset_takes_both_kinds():
    labels = np.r_[np.zeros(7, int), np.ones(5, int)]
    idx = pipe.nc_subset(labels, 4, seed=0)
    assert len(idx) == 4 and labels[idx].sum() == 2
    assert len(pipe.nc_subset(labels, 0, seed=0)) == 12


@pytest.mark.parametrize("override, field", [
    ("test_zoo.n_poisoned=0", "test_zoo.n_clean/n_poisoned"),
    ("val_fraction=1.0", "val_fraction"),
    ("patterns=0", "patterns"),
    ("zoo.pool=test", "zoo.pool"),
    ("baselines.nc_images=4", "baselines.nc_images must be >= baselines.nc.batch_size (16)"),
    ("ulp.init=noise", "init must be uniform or stamped"),
    ("seed=-1", "seed must be an integer in [0, 2147483647]"),
    ("zoo.min_asr=0.9", "zoo.val_fraction must be > 0 when a keep-filter"),
])
def test_bad_config_is_one_clear_error(override, field):
    import re

    with pytest.raises(ConfigError, match=re.escape(field)):
        tiny_config(override).validate()


@pytest.mark.parametrize("override, source", [("ulp.seed=3", "seed"), ("ulp.n_patterns=3", "patterns"),
                                              ("baselines.nc.seed=1", "seed")])
def test_fields_the_pipeline_sets_itself_are_not_overrides(override, source):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} is set from {source}: override {source} instead"):
        tiny_config(override)


def test_stamped_init_is_clean_images_with_train_triggers_in_the_corners():
    from bdjax.data import load_dataset

    ds = load_dataset("digits")
    assert pipe.initial_patterns(tiny_config(), ds, 3) is None  # uniform, the reference
    z = pipe.initial_patterns(tiny_config("ulp.init=stamped"), ds, 3)
    assert z.shape == (3, *ds.image_shape) and z.min() >= 0 and z.max() <= 1
    for m in range(3):
        changed = ~np.isclose(z[m], ds.x_train[ds.y_train == m][0] / 255.0)
        assert changed[:3, :3].any() and changed[-3:, -3:].any() and changed[:3, -3:].any() and changed[-3:, :3].any()
        assert not changed[3:5, 3:5].any()  # the 3x3 triggers stay in the corners of the 8x8 digit


def test_misspelled_field_is_rejected():
    with pytest.raises(ConfigError, match="baselines"):
        tiny_config("baselines.nc_model=3")


def test_detect_config_is_valid(tmp_path):
    assert detect_config(tmp_path / "d.npz").validate().patterns == (1, 2)
