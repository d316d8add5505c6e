"""Training: optimiser/schedule choices, augmentation, bit-exact determinism, sharded vs single device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.config import TrainConfig
from bdjax.data import load_dataset
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.train import core, evaluate, fit, make_optimizer, make_schedule, per_class_accuracy
from bdjax.train.augment import random_crop, random_flip


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_cfg(**kw):
    base = dict(model="mnist_cnn", epochs=5, batch_size=64, lr=0.05, schedule="cosine", checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


def params_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))


def test_fit_learns_and_is_bit_exact_for_a_seed(digits):
    model = get_model("mnist_cnn", 10)
    s1 = fit(model, small_cfg(), digits.x_train, digits.y_train, seed=3)
    s2 = fit(model, small_cfg(), digits.x_train, digits.y_train, seed=3)
    s3 = fit(model, small_cfg(), digits.x_train, digits.y_train, seed=4)
    assert params_equal(s1.params, s2.params)
    assert not params_equal(s1.params, s3.params)
    r = evaluate(model, s1.variables, digits.x_test, digits.y_test, 10)
    assert r["clean_acc"] > 0.8  # five epochs on 8x8 digits


def test_sharded_step_matches_single_device(digits, monkeypatch):
    """The batch split over devices computes the same update as one device (up to float reassociation)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs >= 2 devices")
    import bdjax.train.loop as loop

    model = get_model("mnist_cnn", 10)
    cfg = small_cfg(epochs=1)
    sharded = fit(model, cfg, digits.x_train, digits.y_train, seed=0)
    monkeypatch.setattr(loop, "data_mesh", lambda b: jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
    single = fit(model, cfg, digits.x_train, digits.y_train, seed=0)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_bn_model_trains_with_batch_stats():
    model = get_model("ulp_cnn", 3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 64).astype(np.int32)
    state = fit(model, small_cfg(model="ulp_cnn", epochs=1, batch_size=32, optimizer="adam", lr=1e-3), x, y, seed=0)
    assert int(state.step) == 2 and state.batch_stats


def test_schedules():
    step = make_schedule(TrainConfig(lr=0.1, epochs=10, schedule="step", lr_milestones=(5, 8), lr_gamma=0.1), 10)
    assert np.isclose(step(0), 0.1) and np.isclose(step(49), 0.1) and np.isclose(step(50), 0.01) and np.isclose(step(80), 0.001)
    cos = make_schedule(TrainConfig(lr=0.1, epochs=10, schedule="cosine"), 10)
    assert np.isclose(cos(0), 0.1) and cos(100) < 1e-6
    with pytest.raises(ConfigError, match="lr_milestones"):
        make_schedule(TrainConfig(epochs=10, schedule="step", lr_milestones=(12,)), 10)


def test_flip_flips_some_images_and_keeps_others():
    x = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6, 1)
    flipped = random_flip(jax.random.key(0), jnp.concatenate([x] * 16))
    assert any(bool(jnp.array_equal(f, x[0][:, ::-1])) for f in flipped[::2])  # some flipped ...
    assert any(bool(jnp.array_equal(f, x[0])) for f in flipped[::2])  # ... and some not


def test_batch_larger_than_data_is_an_error(digits):
    with pytest.raises(ConfigError, match="larger than the"):
        fit(get_model("mnist_cnn", 10), small_cfg(batch_size=5000), digits.x_train, digits.y_train, seed=0)


def test_per_class_accuracy():
    acc = per_class_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
    assert acc[:3] == [1.0, 1.0, 0.5] and np.isnan(acc[3])


def test_evaluate_accepts_variables_on_one_device(digits):
    model = get_model("mnist_cnn", 10)
    state = fit(model, small_cfg(epochs=1), digits.x_train, digits.y_train, seed=0)
    on_one = jax.device_put(state.variables, jax.devices()[0])
    a = evaluate(model, on_one, digits.x_test, digits.y_test, 10)["clean_acc"]
    b = evaluate(model, state.variables, digits.x_test, digits.y_test, 10)["clean_acc"]
    assert a == b


def test_trainable_layers_only_move_and_unknown_names_are_refused():
    """train.trainable=fc2: finetune the last layer (HTBA's setting); every other parameter stays bit-identical."""

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 64).astype(np.int32)
    model = get_model("mnist_cnn", 10, width=4, hidden=16)
    cfg = TrainConfig(model="mnist_cnn", epochs=1, batch_size=16, lr=0.1, trainable=("fc2",), checkpoint_every=0)
    start = core.create_state(model, make_optimizer(cfg, 4), core.stream_keys(0)["init"], (8, 8, 1))
    state = fit(model, cfg, x, y, seed=0)
    moved = {k: not np.array_equal(jax.tree.leaves(state.params[k])[0], jax.tree.leaves(start.params[k])[0])
             for k in state.params}
    assert moved == {k: k == "fc2" for k in state.params}, moved
    with pytest.raises(ConfigError, match="fc9.*conv1"):
        fit(model, dataclasses.replace(cfg, trainable=("fc9",)), x, y, seed=0)


def test_crop_is_the_window_of_the_padded_image_at_the_drawn_offsets():
    x = jnp.arange(3 * 5 * 6 * 2, dtype=jnp.float32).reshape(3, 5, 6, 2) + 1
    key, pad = jax.random.key(7), 2
    got = np.asarray(random_crop(key, x, pad))
    offsets = np.asarray(jax.random.randint(key, (3, 2), 0, 2 * pad + 1))  # what random_crop draws
    assert len({tuple(o) for o in offsets}) > 1  # the key gives distinct windows: a fixed offset would fail
    xp = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i, (r, c) in enumerate(offsets):
        np.testing.assert_array_equal(got[i], xp[i, r:r + 5, c:c + 6])


@pytest.mark.parametrize("override, message", [
    ("seed=-1", r"seed must be an integer in \[0, 2147483647\], got -1"),
    ("data.n_train=0", r"data.n_train must be >= 1 or none \(all\), got 0"),
    ("train.crop_padding=-1", "train.crop_padding must be >= 0, got -1"),
    ("train.lr=inf", "train.lr='inf': expected a finite number"),
    ("train.lr=nan", "train.lr='nan': expected a finite number"),
    ("train.lr_milestones=5,5", r"train.lr_milestones must be strictly increasing epochs, got \(5, 5\)"),
    ("train.lr_milestones=7,3", r"train.lr_milestones must be strictly increasing epochs, got \(7, 3\)"),
])
def test_impossible_settings_are_one_clear_error(override, message):
    from bdjax.config import ExperimentConfig, apply_overrides

    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), ["train.schedule=step", "train.lr_milestones=3", override]).validate()


def test_programmatic_non_finite_lr_and_duplicate_milestones_are_rejected():
    with pytest.raises(ConfigError, match="train.lr must be a finite number > 0, got nan"):
        raise_failed_for(TrainConfig(lr=float("nan")))
    with pytest.raises(ConfigError, match="train.lr must be a finite number > 0, got inf"):
        raise_failed_for(TrainConfig(lr=float("inf")))
    with pytest.raises(ConfigError, match="strictly increasing"):  # optax would merge the two boundaries
        make_schedule(TrainConfig(epochs=10, schedule="step", lr_milestones=(5, 5)), 10)


def raise_failed_for(cfg: TrainConfig):
    from bdjax.config import raise_failed

    raise_failed(cfg.checks())
