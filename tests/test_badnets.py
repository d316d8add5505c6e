"""BadNets poisoning: counts, masks, label maps, clean-label variant, test-set construction, bad input."""
import numpy as np
import pytest

from bdjax.attacks import LabelMap, make_trigger, poison_test_set, poison_training_set
from bdjax.errors import ConfigError


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (1000, 8, 8, 1), dtype=np.uint8)
    y = np.repeat(np.arange(10), 100).astype(np.int32)
    return x, y


def trig():
    return make_trigger("patch", (8, 8, 1), size=2)


def test_rate_count_and_mask(data):
    x, y = data
    p = poison_training_set(x, y, trig(), LabelMap("all_to_one", 3), 10, rate=0.05, seed=1)
    assert p.mask.sum() == 50 and len(p.indices) == 50
    assert (p.y[p.mask] == 3).all() and (p.y_true[p.mask] != 3).all()  # target-class images are never chosen
    np.testing.assert_array_equal(p.x[~p.mask], x[~p.mask])  # nothing else touched
    np.testing.assert_array_equal(p.y[~p.mask], y[~p.mask])
    assert (p.x[p.mask][:, 6:, 6:] == 255).all()
    changed = (p.x != x).reshape(len(x), -1).any(1)
    assert not changed[~p.mask].any()


def test_exact_count_and_determinism(data):
    x, y = data
    a = poison_training_set(x, y, trig(), LabelMap("all_to_one", 0), 10, count=17, seed=5)
    b = poison_training_set(x, y, trig(), LabelMap("all_to_one", 0), 10, count=17, seed=5)
    c = poison_training_set(x, y, trig(), LabelMap("all_to_one", 0), 10, count=17, seed=6)
    assert a.mask.sum() == 17
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_all_to_all_and_source_specific(data):
    x, y = data
    p = poison_training_set(x, y, trig(), LabelMap("all_to_all"), 10, rate=0.1)
    np.testing.assert_array_equal(p.y[p.mask], (p.y_true[p.mask] + 1) % 10)
    s = poison_training_set(x, y, trig(), LabelMap("source_specific", 7, (1, 2)), 10, count=30)
    assert set(s.y_true[s.mask]) <= {1, 2} and (s.y[s.mask] == 7).all()


def test_clean_label_keeps_labels(data):
    x, y = data
    p = poison_training_set(x, y, trig(), LabelMap("all_to_one", 4), 10, count=20, clean_label=True)
    assert (p.y_true[p.mask] == 4).all() and np.array_equal(p.y, y)
    assert (p.x[p.mask][:, 6:, 6:] == 255).all()


def test_test_set_excludes_target(data):
    x, y = data
    xs, ys = poison_test_set(x, y, trig(), LabelMap("all_to_one", 2), 10)
    assert len(xs) == 900 and (ys == 2).all() and (xs[:, 6:, 6:] == 255).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(rate=0.0), r"poison rate must be in \(0, 1\]"),
    (dict(rate=1.5), r"poison rate must be in \(0, 1\]"),
    (dict(count=0), "poison count must be >= 1"),
    (dict(count=950), "only 900 are eligible"),
])
def test_bad_rates(data, kwargs, match):
    x, y = data
    with pytest.raises(ConfigError, match=match):
        poison_training_set(x, y, trig(), LabelMap("all_to_one", 0), 10, **kwargs)


def test_bad_label_maps(data):
    x, y = data
    with pytest.raises(ConfigError, match="target label 10 is outside the 10 classes"):
        poison_training_set(x, y, trig(), LabelMap("all_to_one", 10), 10, rate=0.1)
    with pytest.raises(ConfigError, match="unknown label map"):
        poison_training_set(x, y, trig(), LabelMap("one_to_many", 1), 10, rate=0.1)
    with pytest.raises(ConfigError, match="at least one source"):
        poison_training_set(x, y, trig(), LabelMap("source_specific", 1), 10, rate=0.1)
    with pytest.raises(ConfigError, match="unknown trigger kind"):
        make_trigger("sticker", (8, 8, 1))
