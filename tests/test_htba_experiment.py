"""The HTBA pipeline end to end on CIFAR-10 at the tiny preset: a single-source pair evaluates the right classes
and images, the poisons a victim reads back are 8-bit images within eps of the target images they started from,
and a rerun reuses the pair's rows. The multi-source variant differs from it only in its class lists
(`pair_classes`, checked below; measured end to end in the README)."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from conftest import load_script, require_data_root

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_data_root("cifar10")
    from bdjax.data import load_dataset
    from bdjax.pipelines.htba import random_pairs, run_pair

    setting, _ = load_script("experiments/htba_cifar10.py").setting_for("tiny")
    # CIFAR-10 cut to 400 training and 100 test images per class: every stage still runs on real images, and the
    # evaluation (most of this fixture's time on the full test set) reads 1000 images, not 10000
    full = load_dataset("cifar10")
    keep = lambda y, n: np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in range(full.num_classes)]))
    tr, te = keep(full.y_train, 400), keep(full.y_test, 100)
    ds = dataclasses.replace(full, x_train=full.x_train[tr], y_train=full.y_train[tr], x_test=full.x_test[te],
                             y_test=full.y_test[te])
    out = tmp_path_factory.mktemp("htba")
    (source, target), = random_pairs(ds.num_classes, 1, 0, among=setting.holdout)
    single = run_pair(setting, ds, source, target, 0, out, seed=0)
    return setting, ds, out, (source, target), single


def test_multi_source_classes_are_every_class_and_the_feature_net_sees_all_but_the_target():
    from bdjax.pipelines.htba import pair_classes

    assert pair_classes(10, 5, 3) == ([3, 5], [5], [5, 3])
    assert pair_classes(10, None, 3, multi_source=True) == (list(range(10)), [0, 1, 2, 4, 5, 6, 7, 8, 9], [3])


def test_single_source_rows_read_their_classes(tiny):
    setting, ds, _, (source, target), single = tiny
    n_test = np.bincount(ds.y_test, minlength=ds.num_classes)
    for result, variant, sources, classes in ((single, "single_source", [source], [source, target]),):
        assert [r["model"] for r in result["rows"]] == ["clean", "poisoned"]
        for r in result["rows"]:
            assert r["variant"] == variant and r["pair"] == [None if variant == "multi_source" else source, target]
            assert r["n_poisons"] == setting.n_poisons and r["n_clean"] == setting.n_clean_per_class * len(classes)
            assert r["n_val_clean"] == n_test[classes].sum() and r["n_val_patched"] == n_test[sources].sum()
            assert r["val_patched_source"] + r["asr"] <= 1.0 + 1e-9  # a patched source image counts once at most


def test_poisons_are_8_bit_images_within_eps_of_their_start_images(tiny):
    from bdjax.attacks import htba
    from bdjax.pipelines.htba import split_pair_data

    setting, ds, out, (source, target), _ = tiny
    for name, classes in ((f"{source}_{target}", sorted((source, target))),):
        poisons = htba.load_poisons(out / "pairs" / name / "poisons")
        _, _, starts = split_pair_data(ds, classes, target, setting.n_clean_per_class, setting.n_poisons, 0)
        assert poisons.dtype == np.uint8 and poisons.shape == starts.shape
        moved = np.abs(poisons.astype(int) - starts.astype(int))
        assert moved.max() <= round(setting.eps * 255) and moved.max() > 0, name
        assert Image.open(out / "pairs" / name / "craft_trace.png").size[0] >= 300  # the descent, as a figure


def test_a_rerun_reuses_the_rows_of_the_pair(tiny):
    from bdjax.pipelines.htba import run_pair

    setting, ds, out, (source, target), single = tiny
    done = out / "pairs" / f"{source}_{target}" / "pair.json"
    stamp = done.stat().st_mtime_ns
    again = run_pair(setting, ds, source, target, 0, out, seed=0)
    assert again["rows"] == single["rows"] and done.stat().st_mtime_ns == stamp
    assert json.loads(done.read_text())["rows"] == single["rows"]
