"""Blind backdoors: the MGDA solvers against brute force, synthesizers, label functions, the compiled step
(threshold switch, running mean in TrainState.extra, MGDA combination), evasion, gradient shaping, bad input."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.attacks import blind
from bdjax.attacks.blind import BlindConfig, mgda
from bdjax.data import Dataset
from bdjax.errors import BdjaxError, ConfigError
from bdjax.train import core

SHAPE = (8, 8, 1)


def _random_gram(rng, K, P=6):
    V = rng.normal(size=(K, P))
    return V @ V.T


# ---------------------------------------------------------------------------------------------- MGDA solvers

def test_simplex_solver_matches_brute_force_for_three_tasks():
    rng = np.random.default_rng(0)
    solver = jax.jit(mgda.min_norm_simplex)
    for trial in range(8):
        P = 2 if trial % 2 else 6  # P=2: the hull can contain 0 (a zero-norm mix); P=6: a unique interior/edge point
        G = _random_gram(rng, 3, P) * 10.0 ** rng.uniform(-3, 3)
        w = np.asarray(solver(jnp.asarray(G, jnp.float32)))
        ref = mgda.brute_force_min_norm(G, resolution=300)
        assert w.min() >= -1e-6 and abs(w.sum() - 1) < 1e-5
        f = lambda v: float(v @ G @ v)  # noqa: E731
        # the solver is at least as good as the best grid point, and close to it
        assert f(w) <= f(ref) + 1e-4 * np.trace(G)
        if P == 6:
            np.testing.assert_allclose(w, ref, atol=0.01)


def test_two_task_closed_form_matches_the_iterative_solver():
    rng = np.random.default_rng(1)
    checked = 0
    closed_form = jax.jit(lambda G: mgda.min_norm_2(G, clip=0.0))
    iterative_solver = jax.jit(lambda G: mgda.min_norm_simplex(G, steps=500))
    for _ in range(20):
        G = jnp.asarray(_random_gram(rng, 2), jnp.float32)
        closed, iterative = np.asarray(closed_form(G)), np.asarray(iterative_solver(G))
        np.testing.assert_allclose(closed, iterative, atol=2e-3)
        np.testing.assert_allclose(closed, mgda.brute_force_min_norm(np.asarray(G), 2000), atol=1e-3)
        checked += 0 < closed[0] < 1
    assert checked >= 5  # interior solutions were exercised, not only the vertices


def test_closed_form_by_hand_and_its_clip():
    # g1 = (1, 0), g2 = (0, 2): min |a g1 + (1-a) g2|^2 = a^2 + 4 (1-a)^2  ->  a = 4/5
    G = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(mgda.min_norm_2(G, clip=0.0), [0.8, 0.2], atol=1e-6)
    # g2 = 2 g1: the min-norm point is g1 alone; the reference keeps 0.1% on the other task
    G = jnp.array([[1.0, 2.0], [2.0, 4.0]])
    np.testing.assert_allclose(mgda.min_norm_2(G, clip=1e-3), [0.999, 0.001], atol=1e-7)


def test_normalisations_by_hand():
    G = jnp.array([[9.0, 1.0], [1.0, 0.25]])  # norms 3 and 0.5
    losses = jnp.array([2.0, 40.0])
    eps = mgda.EPS
    np.testing.assert_allclose(mgda.task_scales(G, losses, "l2"), [3 + eps, 0.5 + eps], rtol=1e-6)
    np.testing.assert_allclose(mgda.task_scales(G, losses, "loss"), [2 + eps, 40 + eps], rtol=1e-6)
    np.testing.assert_allclose(mgda.task_scales(G, losses, "loss+"), [6 + eps, 10 + eps], rtol=1e-6)  # 20 capped
    np.testing.assert_allclose(mgda.task_scales(G, losses, "none"), [1 + eps, 1 + eps], rtol=1e-6)
    # l2: both unit vectors -> weights from their angle only; with 'none' the small gradient dominates
    w_l2 = np.asarray(mgda.mgda_weights(G, losses, "l2", clip=0.0))
    w_none = np.asarray(mgda.mgda_weights(G, losses, "none", clip=0.0))
    assert abs(w_l2[0] - 0.5) < 0.15 and w_none[1] > 0.9


# ---------------------------------------------------------------------------------- synthesizers and labels

def test_pixel_pattern_and_single_pixel_stamp_exact_pixels():
    x = jnp.full((2, 8, 8, 3), 0.5)
    out = np.asarray(blind.pixel_pattern(x.shape[1:], pattern=((1, 0), (-1, 1)), row=2, col=5).apply(None, x))
    np.testing.assert_array_equal(out[:, 2, 5], 1.0)
    np.testing.assert_array_equal(out[:, 2, 6], 0.0)
    np.testing.assert_array_equal(out[:, 3, 5], 0.5)  # transparent
    np.testing.assert_array_equal(out[:, 3, 6], 1.0)
    assert int((out != 0.5).any(-1).sum()) == 2 * 3  # nothing else changed
    px = np.asarray(blind.single_pixel(x.shape[1:], row=7, col=0).apply(None, x))
    assert px[0, 7, 0].tolist() == [1.0] * 3 and int((px != 0.5).any(-1).sum()) == 2


def test_physical_varies_size_flip_and_position():
    pattern = ((1, 1, 0), (1, 0, 0), (1, 1, 1), (0, 0, 1), (1, 0, 1))  # asymmetric: a flip is visible
    synth = blind.physical((32, 32, 1), pattern=pattern)
    x = jnp.full((64, 32, 32, 1), 0.5)
    out = np.asarray(jax.jit(synth.apply)(jax.random.key(0), x))[..., 0]
    heights, corners, flips = set(), set(), set()
    for img in out:
        rows, cols = np.nonzero(img != 0.5)
        heights.add(rows.max() - rows.min() + 1)
        corners.add((rows.min(), cols.min()))
        top = img[rows.min(), cols.min():cols.max() + 1]
        flips.add(bool(top[0] == 1.0))  # the top row starts white unflipped, black flipped
    assert heights <= set(range(5, 11)) and len(heights) >= 4
    assert len(corners) > 30 and flips == {True, False}
    again = np.asarray(jax.jit(synth.apply)(jax.random.key(0), x))[..., 0]
    np.testing.assert_array_equal(out, again)  # a function of the key


def test_label_functions_and_the_calculator():
    y = jnp.array([0, 37, 99, 45])
    assert blind.constant(8, 10).apply(jnp.array([0, 3])).tolist() == [8, 8]
    assert blind.calculator("sum").apply(y).tolist() == [0, 10, 18, 9]
    assert blind.calculator("product").apply(y).tolist() == [0, 21, 81, 20]
    rng = np.random.default_rng(0)
    digits = Dataset("mnist", rng.integers(0, 255, (50, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 50),
                     rng.integers(0, 255, (20, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 20),
                     tuple(map(str, range(10))))
    calc = blind.calculator_dataset(digits, 30, 10, seed=0)
    assert calc.x_train.shape == (30, 28, 56, 1) and calc.num_classes == 100
    # every pair's label is 10 * left + right, read back from the digits it was built from
    lookup = {digits.x_train[i].tobytes(): digits.y_train[i] for i in range(50)}
    for img, label in zip(calc.x_train[:10], calc.y_train[:10]):
        assert label == 10 * lookup[img[:, :28].tobytes()] + lookup[img[:, 28:].tobytes()]


# --------------------------------------------------------------------------------------------- bad input

def test_bad_input_gives_one_line_errors():
    cases = [
        (lambda: BlindConfig(normalization="l1").validate(), "blind.normalization"),
        (lambda: mgda.check_normalization("l1"), "unknown gradient normalisation 'l1'"),
        (lambda: BlindConfig(threshold=-1.0).validate(), "blind.threshold must be >= 0"),
        (lambda: BlindConfig(poison_fraction=0.0).validate(), "blind.poison_fraction must be in \\(0, 1\\]"),
        (lambda: BlindConfig(poison_fraction=1.5).validate(), "blind.poison_fraction must be in \\(0, 1\\]"),
        (lambda: blind.pixel_pattern((4, 4, 1)), "does not fit in 4x4 images"),
        (lambda: blind.physical((9, 9, 1)), "does not fit in 9x9 images"),
        (lambda: blind.constant(10, 10), "outside the 10 classes"),
        (lambda: blind.constant(-1, 10), "maps class 0 to -1"),
        (lambda: blind.check_label_function(blind.LabelFunction("bad", lambda y: y - 1), 10), "maps class 0 to -1"),
        (lambda: blind.calculator_dataset(Dataset("cifar10", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, int),
                                                  np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, int),
                                                  tuple(map(str, range(10)))), 4, 4), "28x28 single-channel digits"),
    ]
    for fn, message in cases:
        with pytest.raises(BdjaxError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
    assert BlindConfig(threshold=float("inf")).validate().always_on


# ----------------------------------------------------------------------------------------------- the step

class TinyMLP(nn.Module):
    """The step does not care what the model is; an MLP compiles in a fraction of a CNN's time (per-example
    gradients of a convolution take XLA:CPU ~12 s to compile), which keeps these tests at a few seconds."""
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(16, *SHAPE)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    return TinyMLP(), {"x": x, "y": y}


def _state(model, tx, extra):
    return core.init_state(model, tx, jax.random.key(0), SHAPE, extra)


def test_threshold_keeps_the_attack_off_and_the_step_is_plain_training(tiny):
    """T = 0: never on, so the blind step moves the model exactly as the plain cross-entropy step."""
    model, batch = tiny
    tx = optax.sgd(0.1, momentum=0.9)
    attack = blind.make_blind(model, BlindConfig(threshold=0.0, target=3), SHAPE, 10, 16)
    s_blind, s_plain = _state(model, tx, attack.extra), _state(model, tx, None)
    step_blind = jax.jit(core.make_update(attack.grad_fn, tx))
    step_plain = jax.jit(core.make_update(core.value_and_grad(core.classification_loss(model)), tx))
    ema = 0.0
    for i in range(3):
        s_blind, m = step_blind(s_blind, batch, jax.random.key(i))
        s_plain, mp = step_plain(s_plain, batch, jax.random.key(i))
        assert float(m["attack_on"]) == 0.0 and float(m["w_backdoor"]) == 0.0
        assert float(m["loss"]) == pytest.approx(float(mp["loss"]), rel=1e-5)
        ema = 0.99 * ema + 0.01 * float(mp["loss"])
    chex.assert_trees_all_close(s_blind.params, s_plain.params, rtol=1e-5, atol=1e-6)
    # the running mean of the main loss is device state in TrainState.extra, bias-corrected
    assert int(s_blind.extra["loss_count"]) == 3
    assert float(blind.running_mean(s_blind.extra, 0.99)) == pytest.approx(ema / (1 - 0.99 ** 3), rel=1e-5)


def test_switch_turns_on_once_the_running_mean_is_below_T():
    cfg = BlindConfig(threshold=1.0)
    extra = lambda ema, n: {"loss_ema": jnp.float32(ema), "loss_count": jnp.int32(n)}  # noqa: E731
    assert not bool(blind.attack_on(cfg, extra(0.0, 0)))  # no mean yet
    assert not bool(blind.attack_on(cfg, extra(0.01 * 1.5, 1)))  # mean 1.5
    assert bool(blind.attack_on(cfg, extra(0.01 * 0.5, 1)))  # mean 0.5
    assert bool(blind.attack_on(BlindConfig(), extra(0.0, 0)))  # T = inf: always on


@pytest.mark.parametrize("balancing,fraction", [("mgda", 1.0), ("fixed", 1.0), ("mgda", 0.5)])
def test_blind_gradient_is_the_weighted_sum_of_task_gradients(tiny, balancing, fraction):
    """The step's gradient equals grad(w_main * L_main + w_backdoor * L_backdoor) with the weights it reports,
    and MGDA's weights are the min-norm weights of the normalised task gradients. With poison_fraction 0.5 the
    backdoor task's batch is half synthesised, half the clean examples with their true labels."""
    model, batch = tiny
    tx = optax.sgd(0.1)
    cfg = BlindConfig(target=3, balancing=balancing, scales=(0.7, 0.3), clip=0.0, poison_fraction=fraction)
    attack = blind.make_blind(model, cfg, SHAPE, 10, 16)
    state = _state(model, tx, attack.extra)
    rng = jax.random.key(4)
    grads, aux = jax.jit(attack.grad_fn)(state.params, state, batch, rng)
    w = np.array([aux["metrics"]["w_main"], aux["metrics"]["w_backdoor"]])
    # rebuild the two tasks by hand with the same synthesised batch
    k_syn = jax.random.split(rng, 3)[0]
    n = int(16 * fraction)
    x_bd = attack.synthesizer.apply(k_syn, batch["x"]).at[n:].set(batch["x"][n:])
    y_bd = jnp.full_like(batch["y"], 3).at[n:].set(batch["y"][n:])
    ce = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply({"params": p}, x, train=True), y).mean()
    g_m = jax.grad(ce)(state.params, batch["x"], batch["y"])
    g_b = jax.grad(ce)(state.params, x_bd, y_bd)
    xs, ys, mask = blind.backdoor_batch(attack.synthesizer, attack.label_fn, k_syn, batch["x"], batch["y"], fraction)
    np.testing.assert_array_equal(xs, x_bd)
    np.testing.assert_array_equal(ys, y_bd)
    assert float(mask.sum()) == n
    assert not np.array_equal(np.asarray(x_bd[:n]), np.asarray(batch["x"][:n]))  # the synthesised part changed
    expected = jax.tree.map(lambda a, b: w[0] * a + w[1] * b, g_m, g_b)
    chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-6)
    if balancing == "fixed":
        np.testing.assert_allclose(w, [0.7, 0.3])
    else:
        losses = jnp.array([aux["metrics"]["loss"], aux["metrics"]["backdoor_loss"]])
        ref = mgda.mgda_weights(mgda.gram([g_m, g_b]), losses, "loss+", clip=0.0)
        np.testing.assert_allclose(w, ref, atol=1e-4)
        assert 0.0 < w[1] < 1.0


def test_neural_cleanse_evasion_is_a_third_task_with_its_state_in_extra(tiny):
    model, batch = tiny
    tx = optax.sgd(0.1)
    attack = blind.make_blind(model, BlindConfig(target=3, evasion="neural_cleanse"), SHAPE, 10, 16)
    state = _state(model, tx, attack.extra)
    step = jax.jit(core.make_update(attack.grad_fn, tx))
    mask0 = np.asarray(state.extra["nc"].params["mask"])
    for i in range(2):
        state, m = step(state, batch, jax.random.key(i))
    w = [float(m[k]) for k in ("w_main", "w_backdoor", "w_evasion")]
    assert abs(sum(w) - 1) < 1e-5 and min(w) >= 0 and "evasion_loss" in m
    assert int(state.extra["nc"].step) == 2  # the inner Neural Cleanse advanced once per training step
    assert not np.allclose(np.asarray(state.extra["nc"].params["mask"]), mask0)


def test_gradient_shaping_clips_per_example_and_is_plain_without_clip_or_noise(tiny):
    from bdjax.defenses.gradient_shaping import shaped_grads

    model, batch = tiny
    state = _state(model, optax.sgd(0.1), None)
    loss = core.classification_loss(model)
    plain, _ = core.value_and_grad(loss)(state.params, state, batch, jax.random.key(0))
    shaped = jax.jit(lambda clip, noise: shaped_grads(loss, state.params, state, batch, jax.random.key(0), clip=clip,
                                                      noise=noise))
    loose, _, _ = shaped(1e6, 0.0)
    chex.assert_trees_all_close(loose, plain, rtol=1e-4, atol=1e-7)  # mean of per-example grads = batch grad
    tight, _, norms = shaped(1e-3, 0.0)
    assert float(mgda.flat(tight) @ mgda.flat(tight)) ** 0.5 <= 1e-3 + 1e-7 < float(norms.min())
    noisy, _, _ = shaped(1e-3, 1.0)  # noise std sigma * S on the sum, / B on the mean
    np.testing.assert_allclose(float(jnp.std(mgda.flat(noisy) - mgda.flat(tight))), 1e-3 / 16, rtol=0.1)
    # in the blind step: the attacker's weighted loss, shaped per example by the defender's trainer
    attack = blind.make_blind(model, BlindConfig(target=3, shaping_clip=1e-3, shaping_noise=0.0), SHAPE, 10, 16)
    g, aux = jax.jit(attack.grad_fn)(state.params, attack_state := _state(model, optax.sgd(0.1), attack.extra),
                                     batch, jax.random.key(0))
    assert float(mgda.flat(g) @ mgda.flat(g)) ** 0.5 <= 1e-3 + 1e-7
    del attack_state


def test_fit_runs_the_blind_grad_fn_logs_its_weights_and_fine_tunes_from_given_weights(tiny, tmp_path):
    """fit(grad_fn=, extra=, init_variables=): the blind step through the one host loop, no loop of its own."""
    from bdjax.config import TrainConfig
    from bdjax.results import RunDir
    from bdjax.train import fit

    model, _ = tiny
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (64, *SHAPE), dtype=np.uint8), rng.integers(0, 10, 64).astype(np.int32)
    start = core.init_state(model, optax.sgd(0.1), jax.random.key(9), SHAPE).variables
    attack = blind.make_blind(model, BlindConfig(target=3), SHAPE, 10, 16)
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=1e-6, momentum=0.0, weight_decay=0.0,
                      schedule="constant")
    state = fit(model, cfg, x, y, seed=0, run=RunDir(tmp_path), grad_fn=attack.grad_fn, extra=attack.extra,
                init_variables=start)
    assert int(state.extra["loss_count"]) == 4  # the running mean saw every step
    chex.assert_trees_all_close(state.params, start["params"], atol=1e-5)  # started from `start`, barely moved
    leaf = lambda v: jax.tree.leaves(v)[0]  # noqa: E731
    assert not np.allclose(leaf(state.params), leaf(core.init_state(model, optax.sgd(0.1), core.stream_keys(0)["init"],
                                                                    SHAPE).params))
    logged = RunDir(tmp_path).metrics()[-1]
    assert {"w_main", "w_backdoor", "backdoor_acc", "train_acc"} <= set(logged)
    assert logged["w_main"] + logged["w_backdoor"] == pytest.approx(1.0, abs=1e-5)


def test_experiment_configs_validate_and_rows_name_their_mistakes():
    from bdjax.pipelines import blind as pipeline
    from conftest import load_script

    load = lambda name: load_script(f"experiments/{name}.py")

    cifar, calc, evasion = (load(n) for n in ("blind_cifar10", "blind_calculator_mnist", "blind_evasion"))

    for module in (cifar, calc, evasion):
        for scale in ("small", "full"):
            module.get_config(scale).validate()
    assert cifar.get_config("small").rows[0] == "synthesizer=pixel_pattern"
    assert cifar.get_config("small").mode == "scratch"  # 1 fine-tune epoch was too short for MGDA (docstring)
    assert cifar.get_config("small").blind.poison_fraction == 0.5  # whole batches: a BatchNorm shortcut (docstring)
    assert pipeline.row_config(cifar.get_config("small"), "synthesizer=physical/balancing=fixed").balancing == "fixed"
    with pytest.raises(ConfigError, match="row 'normalization=l3': blind.normalization must be"):
        pipeline.row_config(cifar.get_config("small"), "normalization=l3")
    with pytest.raises(ConfigError, match="unknown config field 'blind.synth'"):
        pipeline.row_config(cifar.get_config("small"), "synth=physical")


def test_save_curves_draws_the_blind_runs_main_and_backdoor_accuracy(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from unittest import mock

    from bdjax import plots
    records = [{"step": 1, "loss": 2.0}, {"step": 62, "main_acc": 0.3, "backdoor_acc": 0.99},
               {"step": 124, "main_acc": 0.4, "backdoor_acc": 0.98}]
    with mock.patch("matplotlib.axes.Axes.legend") as legend:
        plots.save_curves(tmp_path / "c.png", records)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert legend.call_count == 1  # the accuracy panel has series, so it gets a legend
    with mock.patch("matplotlib.axes.Axes.plot") as plot:
        plots.save_curves(tmp_path / "d.png", records)
    labels = [c.kwargs.get("label") for c in plot.call_args_list]
    assert labels == [None, "main accuracy", "backdoor accuracy"]
