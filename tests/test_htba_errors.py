"""HTBA bad input: each mistake is one clear ConfigError / DataError line, raised before anything compiles."""
import dataclasses

import numpy as np
import pytest

from bdjax import triggers as T
from bdjax.attacks import htba
from bdjax.errors import ConfigError, DataError
from bdjax.models import get_model

MODEL = get_model("mnist_cnn", 3, width=2, hidden=4)
CFG = htba.HTBAConfig(poisons_per_batch=4, num_batches=2, max_iters=2, feature_layer="penultimate")
VARIABLES = None  # never reached: every check below fires before the model runs


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("field,value,expected", [
    ("eps", 0.0, r"htba eps must be in \(0, 1\]"),
    ("eps", 1.5, r"htba eps must be in \(0, 1\]"),
    ("eps", -16 / 255, r"htba eps must be in \(0, 1\]"),
    ("eps", float("nan"), "must be finite numbers"),
    ("lr", 0.0, "htba lr must be > 0"),
    ("lr_decay", 1.5, r"lr_decay must be in \(0, 1\]"),
    ("lr_decay_every", 0, "lr_decay_every must be an integer >= 1"),
    ("max_iters", 2.5, "max_iters must be an integer >= 1"),
    ("poisons_per_batch", 0, "poisons_per_batch must be an integer >= 1"),
    ("num_batches", True, "num_batches must be an integer >= 1"),
    ("stop_distance", -1.0, "stop_distance must be >= 0"),
    ("matching", "auction", "matching must be one of hungarian, greedy, got 'auction'"),
    ("keep", "first", "keep must be one of last, best"),
    ("feature_layer", "", "feature_layer must be a layer name"),
    ("optimizer", "sign", "optimizer must be one of sgd, adam"),
])
def test_config_validation(field, value, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        dataclasses.replace(htba.HTBAConfig(), **{field: value}).validate()
    _one_line(e)


def test_defaults_are_the_reference():
    c = htba.HTBAConfig().validate()
    assert (c.eps, c.lr, c.lr_decay, c.lr_decay_every, c.max_iters, c.stop_distance) == (16 / 255, 0.01, 0.5, 1000,
                                                                                          5000, 10.0)
    assert (c.poisons_per_batch * c.num_batches, c.feature_layer, c.matching) == (400, "fc7", "hungarian")
    assert c.optimizer == "sgd"  # the official plain gradient step


def _craft(targets, sources, trigger=T.checkerboard(3, 3), cfg=CFG):
    return htba.craft_poisons(MODEL, VARIABLES, targets, sources, trigger, cfg)


def test_bad_craft_inputs():
    rng = np.random.default_rng(0)
    imgs = rng.random((12, 8, 8, 3)).astype(np.float32)
    cases = [
        (dict(trigger=T.checkerboard(9, 3)), ConfigError, "trigger of size 9x9 is larger than the 8x8 images"),
        (dict(targets=imgs[:7]), DataError, r"needs 8 target images \(num_batches 2 x poisons_per_batch 4"),
        (dict(sources=imgs[:3]), DataError, "at least poisons_per_batch = 4 source images"),
        (dict(cfg=dataclasses.replace(CFG, feature_layer="fc7")), ConfigError,
         "unknown htba feature_layer 'fc7' for this model; valid layers: conv1, conv2, penultimate, logits"),
        (dict(sources=rng.random((6, 9, 9, 3))), DataError, "same image shape"),
        (dict(targets=imgs[0]), DataError, r"\(N, H, W, C\) image array"),
        (dict(targets=imgs * 2), DataError, r"must lie in \[0, 1\]"),
        (dict(targets=imgs.astype(np.int32)), DataError, "uint8 .* or float"),
        (dict(cfg=dataclasses.replace(CFG, eps=2.0)), ConfigError, r"eps must be in \(0, 1\]"),
    ]
    for change, error, message in cases:
        args = dict(targets=imgs, sources=imgs, trigger=T.checkerboard(3, 3), cfg=CFG) | change
        with pytest.raises(error, match=message) as e:
            _craft(**args)
        _one_line(e)


def test_pair_images():
    x = np.arange(10)[:, None, None, None].astype(np.uint8) * np.ones((1, 2, 2, 3), np.uint8)
    y = np.array([0, 1, 2, 1, 0, 1, 2, 2, 1, 0])
    targets, sources = htba.pair_images(x, y, source_class=2, target_class=1)
    assert targets[:, 0, 0, 0].tolist() == [1, 3, 5, 8] and sources[:, 0, 0, 0].tolist() == [2, 6, 7]
    shuffled, _ = htba.pair_images(x, y, source_class=2, target_class=1, seed=0)
    assert sorted(shuffled[:, 0, 0, 0].tolist()) == [1, 3, 5, 8]
    with pytest.raises(ConfigError, match="source_class and target_class must differ, both are 1") as e:
        htba.pair_images(x, y, source_class=1, target_class=1)
    _one_line(e)
    with pytest.raises(DataError, match="source class 7 has no images"):
        htba.pair_images(x, y, source_class=7, target_class=1)


def test_a_rerun_refuses_pairs_made_with_other_settings(tmp_path):
    from conftest import load_script
    from bdjax.pipelines.htba import check_rerun
    from bdjax.results import RunDir

    setting, _ = load_script("experiments/htba_cifar10.py").setting_for("tiny")
    config = lambda pairs=((5, 8), (3, 0)), **change: {
        "experiment": "htba_cifar10", "scale": "tiny", "seed": 0, "pairs": list(pairs), "multi_source": False,
        "setting": dataclasses.asdict(dataclasses.replace(setting, **change))}
    run_dir = RunDir(tmp_path)
    check_rerun(run_dir, config())  # a new folder
    run_dir.write_config(config())
    check_rerun(run_dir, config(craft_optimizer="adam"))  # nothing made yet: nothing reused
    (tmp_path / "pairs" / "5_8").mkdir(parents=True)
    check_rerun(run_dir, config())
    check_rerun(run_dir, config(pairs=((5, 8),)))  # fewer pairs of the same sequence
    check_rerun(run_dir, config(pairs=((5, 8), (3, 0), (8, 0))))  # more
    with pytest.raises(ConfigError) as e:
        check_rerun(run_dir, config(craft_optimizer="adam"))
    assert "made with other settings (setting.craft_optimizer)" in _one_line(e)
    with pytest.raises(ConfigError, match=r"other settings \(pairs\)"):
        check_rerun(run_dir, config(pairs=((3, 0), (5, 8))))
    # htba_vs_badnets: one folder per poison count, so the counts may change; its other settings may not
    run_dir.write_config({**config(), "counts": [50, 100]})
    check_rerun(run_dir, {**config(), "counts": [400]}, free=("counts",))
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        check_rerun(run_dir, {**config(), "counts": [50], "seed": 1}, free=("counts",))
