"""The ULP experiment pipeline end to end on a tiny digits zoo (random triggers, no files): rows, figures,
resume without recomputation, and bad input."""
import json

import numpy as np
import pytest

from bdjax.config import apply_overrides
from bdjax.errors import ConfigError
from bdjax.pipelines import ulp as pipe

TINY = ["data.dataset=digits", "zoo.trigger_dir=random", "zoo.trigger_size=3", "zoo.n_clean=6", "zoo.n_poisoned=6",
        "zoo.chunk_size=6", "zoo.mode=vmap", "test_zoo.n_clean=3", "test_zoo.n_poisoned=3", "train.model_options=width=4,hidden=16",
        "train.epochs=3", "train.lr=0.01", "patterns=1,2", "ulp.epochs=4", "ulp.batch_models=6",
        "baselines.nc_models=2", "baselines.nc_images=64", "baselines.nc_batch=16",
        "baselines.nc_steps_per_check=2", "baselines.nc_max_checks=3"]


def tiny_config(*extra):
    return apply_overrides(pipe.ULPExperimentConfig(experiment="ulp_tiny", scale="test"), TINY + list(extra))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ulp_run")
    return out, pipe.run_ulp_experiment(tiny_config(), out)


def test_rows_cover_every_method_and_m(tiny_run):
    out, summary = tiny_run
    got = [(r["method"], r["M"]) for r in summary["rows"]]
    assert got == [("ULP", 1), ("noise", 1), ("ULP", 2), ("noise", 2), ("neural_cleanse", None)]
    for r in summary["rows"]:
        assert 0.0 <= r["auc"] <= 1.0 and r["scale"] == "test"
    assert summary["zoo_test"]["n_models"] == 6 and summary["zoo_train"]["n_models"] == 12
    assert summary["M"] == 2 and summary["auc"] == summary["rows"][2]["auc"]
    assert summary["rows"][-1]["n_models"] == 2
    for f in ("roc.png", "ulp_patterns_M1.png", "ulp_patterns_M2.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert "| ULP | 2 |" in (out / "table.md").read_text()
    with np.load(out / "ulp" / "ulp_M2.npz", allow_pickle=False) as z:
        assert z["patterns"].shape == (2, 8, 8, 1) and z["test_scores"].shape == (6,)


def test_rerun_resumes_without_recomputing(tiny_run):
    out, summary = tiny_run
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "ulp").iterdir()}
    again = pipe.run_ulp_experiment(tiny_config(), out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "ulp").iterdir()} == stamps
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in summary["rows"]]
    assert json.loads((out / "summary.json").read_text())["rows"] == again["rows"]


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
    ("baselines.nc_images=4", "baselines.nc_images"),
    ("ulp.init=noise", "init must be uniform or stamped"),
])
def test_bad_config_is_one_clear_error(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(override).validate()


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
