"""The training core: one step for a single model, a population and a data mesh; extra state and custom gradients."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.models import get_model
from bdjax.train import core, population
from bdjax.train.loop import train_loop

N, B, SHAPE = 64, 16, (8, 8, 1)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8)
    y = rng.integers(0, 10, N).astype(np.int32)
    model = get_model("mnist_cnn", 10, width=4, hidden=16)
    return model, optax.sgd(0.1, momentum=0.9), x, y


def _run_single(model, tx, x, y, seed, steps):
    step = core.single_model_step(model, tx, batch_size=B, steps_per_epoch=N // B)
    state = core.create_state(model, tx, core.stream_keys(seed)["init"], SHAPE)
    perm = core.epoch_permutation(core.stream_keys(seed)["perm"], 0, N)
    task = core.RunTask(jnp.int32(seed))
    losses = []
    for _ in range(steps):
        state, m = step(state, task, perm, (jnp.asarray(x), jnp.asarray(y)))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_population_step_is_the_single_model_step(setup, mode):
    """Model i of a population trains exactly as the same seed trained alone: one core, two drivers."""
    model, tx, x, y = setup
    seeds = [3, 7]
    step = population.compile_population_step(
        core.training_step(model, tx, core.gather_arrays, batch_size=B, steps_per_epoch=N // B), mode)
    states = population.init_population(model, tx, seeds, SHAPE)
    tasks = core.RunTask(jnp.asarray(seeds, jnp.int32))
    perms = jnp.stack([core.epoch_permutation(core.stream_keys(s)["perm"], 0, N) for s in seeds])
    for _ in range(3):
        states, metrics = step(states, tasks, perms, (jnp.asarray(x), jnp.asarray(y)))
    for i, s in enumerate(seeds):
        alone, losses = _run_single(model, tx, x, y, s, 3)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], states.params), alone.params, rtol=2e-5, atol=2e-6)
        assert float(metrics["loss"][i]) == pytest.approx(losses[-1], rel=1e-4)
    # the two models really differ (different seeds), so the comparison above is not trivially true
    leaf = jax.tree.leaves(states.params)[-1]
    assert not np.allclose(leaf[0], leaf[1])


class ExtraStateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_extra_state_and_after_update_are_carried(self):
        """A running loss mean kept in `extra` by the loss, and an EMA of the parameters kept by after_update:
        the two state-carrying patterns the blind-backdoor and SSL trainers build on."""
        w_true = jnp.array([2.0, -1.0])
        x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        batch = {"x": x, "y": x @ w_true}

        def loss_fn(params, state, batch, rng):
            loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
            mean = 0.9 * state.extra["loss_mean"] + 0.1 * loss
            return loss, {"extra": {**state.extra, "loss_mean": mean}, "metrics": {"loss": loss}}

        def ema(state):
            target = jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, state.extra["target"], state.params)
            return state.replace(extra={**state.extra, "target": target})

        tx = optax.sgd(0.1)
        params = {"w": jnp.zeros(2)}
        state = core.TrainState.create({"params": params}, tx, extra={"loss_mean": jnp.float32(0.0), "target": params})
        update = self.variant(core.make_update(core.value_and_grad(loss_fn), tx, after_update=ema))
        mean, target, w = 0.0, np.zeros(2), np.zeros(2)
        for _ in range(4):
            state, m = update(state, batch, jax.random.key(0))
            # by hand: the loss at the old weights, an SGD step, then the EMA towards the new weights
            Xn, yn = np.asarray(x), np.asarray(batch["y"])
            loss = np.mean((Xn @ w - yn) ** 2)
            w = w - 0.1 * (2 / len(yn)) * Xn.T @ (Xn @ w - yn)
            mean, target = 0.9 * mean + 0.1 * loss, 0.5 * target + 0.5 * w
            assert float(m["loss"]) == pytest.approx(loss, rel=1e-5)
        np.testing.assert_allclose(state.params["w"], w, rtol=1e-5)
        np.testing.assert_allclose(state.extra["target"]["w"], target, rtol=1e-5)
        assert float(state.extra["loss_mean"]) == pytest.approx(mean, rel=1e-5)
        assert int(state.step) == 4


def test_custom_grad_fn_combines_task_gradients():
    """A grad_fn that combines two losses' gradients with weights equals value_and_grad of the weighted sum."""
    def loss_a(p):
        return jnp.sum((p["w"] - 1.0) ** 2)

    def loss_b(p):
        return jnp.sum(jnp.sin(p["w"]))

    def combined(params, state, batch, rng):
        ga, gb = jax.grad(loss_a)(params), jax.grad(loss_b)(params)
        return jax.tree.map(lambda a, b: 0.3 * a + 0.7 * b, ga, gb), {"metrics": {}}

    def weighted(params, state, batch, rng):
        return 0.3 * loss_a(params) + 0.7 * loss_b(params), {}

    tx = optax.adam(0.05)
    s1 = s2 = core.TrainState.create({"params": {"w": jnp.linspace(-1, 1, 5)}}, tx)
    u1, u2 = jax.jit(core.make_update(combined, tx)), jax.jit(core.make_update(core.value_and_grad(weighted), tx))
    for _ in range(5):
        s1, _ = u1(s1, {}, None)
        s2, _ = u2(s2, {}, None)
    chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-6)
    assert not np.allclose(s1.params["w"], np.linspace(-1, 1, 5))


def test_train_loop_resumes_exactly(setup, tmp_path):
    """Stopped after one epoch and restarted from its checkpoint, the loop ends where an uninterrupted one does."""
    model, tx, x, y = setup
    step = core.single_model_step(model, tx, batch_size=B, steps_per_epoch=N // B)
    keys = core.stream_keys(5)
    data, task = (jnp.asarray(x), jnp.asarray(y)), core.RunTask(jnp.int32(5))
    order = lambda e: core.epoch_permutation(keys["perm"], e, N)
    fresh = lambda: core.create_state(model, tx, keys["init"], SHAPE)
    run = lambda st, perm: step(st, task, perm, data)
    whole, n_whole = train_loop(run, fresh(), order, steps_per_epoch=N // B, epochs=3, show_progress=False)
    _, n_first = train_loop(run, fresh(), order, steps_per_epoch=N // B, epochs=1, checkpoint_dir=tmp_path,
                            show_progress=False)
    resumed, n_rest = train_loop(run, fresh(), order, steps_per_epoch=N // B, epochs=3, checkpoint_dir=tmp_path,
                                 show_progress=False)
    assert (n_whole, n_first, n_rest) == (12, 4, 8)
    chex.assert_trees_all_equal(resumed.params, whole.params)


def test_a_grad_fn_with_the_wrong_structure_is_caught_at_trace_time():
    tx = optax.sgd(0.1)
    state = core.TrainState.create({"params": {"w": jnp.zeros(3)}}, tx)
    bad = lambda params, state, batch, rng: ({"w": jnp.zeros(2)}, {})
    with pytest.raises(AssertionError, match="shape"):
        core.make_update(bad, tx)(state, {}, None)
