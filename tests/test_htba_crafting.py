"""HTBA poison crafting: one iteration against a plain re-derivation, the compiled loop's descent and constraints,
no host transfer inside it, the same poisons on one device or several, the early stop, and the XLA:CPU convolution
workaround (same values and gradients, canonical layout inside loops)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from bdjax import triggers as T
from bdjax.attacks import htba
from bdjax.attacks.htba.crafter import patched_sources
from bdjax.attacks.htba.loop_convs import loop_friendly_convs
from bdjax.attacks.htba.weights import from_torch_layout
from bdjax.models import get_model, init_model

SHAPE = (8, 8, 3)
K, B = 8, 2
MODEL = get_model("mnist_cnn", 4, width=4, hidden=16)
TRIGGER = T.checkerboard(3, 3)
CFG = htba.HTBAConfig(poisons_per_batch=K, num_batches=B, eps=0.1, lr=1.0, max_iters=60, stop_distance=0.0,
                      feature_layer="penultimate")


def _images():
    rng = np.random.default_rng(0)
    targets = np.clip(0.3 + 0.1 * rng.standard_normal((B * K + 3, *SHAPE)), 0, 1).astype(np.float32)
    targets[:, 0, 0] = 0.0  # pixels on the box's edges: the [0, 1] projection must act there
    targets[:, -1, -1] = 1.0
    sources = np.clip(0.7 + 0.1 * rng.standard_normal((3 * K, *SHAPE)), 0, 1).astype(np.float32)
    return targets, sources


@pytest.fixture(scope="module")
def setup():
    targets, sources = _images()
    return init_model(MODEL, jax.random.key(0, impl="rbg"), SHAPE), targets, sources  # rbg: a quicker init compile


@pytest.fixture(scope="module")
def crafted(setup):
    variables, targets, sources = setup
    return htba.craft_poisons(MODEL, variables, targets, sources, TRIGGER, CFG, key=jax.random.key(0))


def test_patched_sources_are_distinct_sources_with_the_trigger_pasted(setup):
    _, _, sources = setup
    draw = jax.jit(patched_sources, static_argnums=3)
    patched = np.asarray(draw(jax.random.key(3), jnp.asarray(sources), TRIGGER, K))
    board = np.asarray(TRIGGER.pattern)
    used = []
    for img in patched:
        i = int(np.argmin((img[None] != sources).sum(axis=(1, 2, 3))))  # the source it came from: fewest changes
        changed = np.argwhere(np.abs(img - sources[i]).max(-1) > 0)
        r, c = changed.min(0) if len(changed) else (0, 0)
        r, c = min(r, SHAPE[0] - 3), min(c, SHAPE[1] - 3)
        assert (changed >= (r, c)).all() and (changed < (r + 3, c + 3)).all()
        np.testing.assert_allclose(img[r:r + 3, c:c + 3], board, atol=1e-6)
        used.append(i)
    assert len(set(used)) == K  # drawn without replacement


def _matched_gradient(variables, features, state, inputs, key, step=0):
    """Iteration `step` re-derived from its own draw of sources: scipy's assignment, jax.grad of the plain
    matched loss. Returns (gradient at the poisons, cost matrix, permutation)."""
    patched = jax.jit(patched_sources, static_argnums=3)(jax.random.fold_in(key, step), inputs.sources, TRIGGER, K)
    f = jax.jit(features)
    fs, fz = np.asarray(f(variables, patched)), np.asarray(f(variables, state.poisons))
    cost = ((fz[:, None] - fs[None]) ** 2).sum(-1)
    _, perm = linear_sum_assignment(cost)
    loss = lambda z: jnp.sum((features(variables, z) - fs[perm]) ** 2)  # noqa: E731
    return np.asarray(jax.jit(jax.grad(loss))(state.poisons)), cost, perm


def test_one_update_is_the_projected_gradient_step_of_the_matched_loss(setup):
    variables, targets, sources = setup
    cfg = htba.HTBAConfig(**{**CFG.__dict__, "lr": 0.5, "stop_distance": 1e9})
    features = htba.feature_fn(MODEL, cfg.feature_layer)
    # the crafter with the CPU convolution rewrite, the re-derivation with plain autodiff: also checks the rewrite
    crafter = htba.poison_crafter(loop_friendly_convs(features), cfg)
    inputs = htba.CraftInputs(variables, jnp.asarray(sources), TRIGGER)
    key = jax.random.key(7)
    state = crafter.init(jnp.asarray(targets[:K]), key)
    update = jax.jit(crafter.update)
    new = update(state, inputs)

    grad, cost, perm = _matched_gradient(variables, features, state, inputs, key)
    z = np.asarray(state.poisons) - 0.5 * grad
    t = targets[:K]
    expected = np.clip(t + np.clip(z - t, -cfg.eps, cfg.eps), 0, 1)
    np.testing.assert_allclose(new.poisons, expected, atol=1e-5)
    assert np.abs(np.asarray(new.poisons) - t).max() > 1e-3  # the step moved the poisons
    np.testing.assert_allclose(new.distance, cost[np.arange(K), perm], rtol=1e-4, atol=1e-7)
    assert int(new.step) == 1 and float(new.lr) == pytest.approx(0.5)
    assert bool(new.converged)  # max distance < 1e9
    assert float(new.best_mean) == pytest.approx(float(np.mean(cost[np.arange(K), perm])), rel=1e-4)
    np.testing.assert_array_equal(new.best_poisons, state.poisons)  # measured before the step

    later = update(state._replace(step=jnp.asarray(2500, jnp.int32)), inputs)
    assert float(later.lr) == pytest.approx(0.5 * 0.5 ** 2)  # halved every 1000 iterations
    assert int(later.step) == 2501
    # the decayed rate is the one applied, whatever the optimiser state's own count
    grad_later, _, _ = _matched_gradient(variables, features, state, inputs, key, step=2500)
    z_later = np.asarray(state.poisons) - 0.125 * grad_later
    np.testing.assert_allclose(later.poisons, np.clip(t + np.clip(z_later - t, -cfg.eps, cfg.eps), 0, 1), atol=1e-5)


def test_adam_option_takes_adams_first_step_then_the_same_projection(setup):
    variables, targets, sources = setup
    cfg = htba.HTBAConfig(**{**CFG.__dict__, "lr": 0.05, "optimizer": "adam"})
    features = htba.feature_fn(MODEL, cfg.feature_layer)
    crafter = htba.poison_crafter(features, cfg)
    inputs = htba.CraftInputs(variables, jnp.asarray(sources), TRIGGER)
    key = jax.random.key(7)
    state = crafter.init(jnp.asarray(targets[:K]), key)
    new = jax.jit(crafter.update)(state, inputs)
    grad, _, _ = _matched_gradient(variables, features, state, inputs, key)
    # Adam's first step (bias-corrected moments m = g, v = g^2): -lr * g / (|g| + 1e-8), about -lr * sign(g)
    z = np.asarray(state.poisons) - 0.05 * grad / (np.abs(grad) + 1e-8)
    t = targets[:K]
    np.testing.assert_allclose(new.poisons, np.clip(t + np.clip(z - t, -cfg.eps, cfg.eps), 0, 1), atol=1e-5)
    moved = np.abs(np.asarray(new.poisons) - t)
    assert np.isclose(moved[(np.abs(grad) > 1e-4) & (t > 0.06) & (t < 0.94)], 0.05, atol=1e-5).all()


def test_loop_reduces_the_feature_distance_within_the_constraints(setup, crafted):
    _, targets, _ = setup
    r = crafted
    assert r.poisons.shape == (B * K, *SHAPE) and r.iterations.tolist() == [CFG.max_iters] * B
    np.testing.assert_array_equal(r.targets, targets[: B * K])
    assert not np.isnan(r.trace).any()
    first, last = r.trace[:, 0], r.trace[:, -1]
    assert (last < 0.5 * first).all(), (first, last)  # a clear descent, batch by batch
    # every iteration draws fresh sources, so the trace is noisy, but its late part sits well below its start
    assert (r.trace[:, -10:].mean(1) < 0.5 * r.trace[:, :5].mean(1)).all()
    dev = np.abs(r.poisons - r.targets)
    assert dev.max() <= CFG.eps + 1e-6 and dev.max() > 0.9 * CFG.eps  # the eps-ball binds
    assert r.poisons.min() >= 0.0 and r.poisons.max() <= 1.0
    assert r.poisons[:, 0, 0].min() == 0.0 and r.poisons[:, -1, -1].max() == 1.0
    assert np.isfinite(r.distance).all() and not r.converged.any()


def test_compiled_loop_makes_no_host_transfer(setup, crafted):
    variables, targets, sources = setup
    mesh = htba.batch_mesh(B)
    split, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    t, keys = jax.device_put((targets[: B * K].reshape(B, K, *SHAPE), jax.random.split(jax.random.key(0), B)), split)
    inputs = jax.device_put(htba.CraftInputs(variables, sources, TRIGGER), replicated)
    run = htba.make_crafter(MODEL, CFG, mesh)
    with jax.transfer_guard("disallow"):
        state, trace = jax.block_until_ready(run(t, keys, inputs))
    np.testing.assert_array_equal(jax.device_get(state.poisons).reshape(B * K, *SHAPE), crafted.poisons)
    np.testing.assert_array_equal(jax.device_get(trace), crafted.trace)


def test_progress_bar_counts_the_iterations_and_changes_no_poison(setup, crafted, monkeypatch, capsys):
    variables, targets, sources = setup
    monkeypatch.setenv("BDJAX_PROGRESS", "1")
    shown = htba.craft_poisons(MODEL, variables, targets, sources, TRIGGER, CFG, key=jax.random.key(0),
                               desc="crafting test")
    bar = capsys.readouterr().err
    assert "crafting test" in bar and f"{CFG.max_iters}/{CFG.max_iters}" in bar, bar[-500:]
    np.testing.assert_array_equal(shown.poisons, crafted.poisons)
    assert htba.craft.PROGRESS.bar is None  # released after the call


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (bdjax makes one per CPU core)")
def test_one_device_gives_the_poisons_of_several(setup, crafted):
    variables, targets, sources = setup
    assert htba.batch_mesh(B).devices.size == 2
    single = htba.craft_poisons(MODEL, variables, targets, sources, TRIGGER, CFG, key=jax.random.key(0),
                                devices=jax.devices()[:1])
    np.testing.assert_allclose(single.poisons, crafted.poisons, atol=1e-5)
    np.testing.assert_allclose(single.trace, crafted.trace, rtol=1e-4)


def test_early_stop_and_greedy_matching(setup):
    variables, targets, sources = setup
    cfg = htba.HTBAConfig(**{**CFG.__dict__, "num_batches": 1, "stop_distance": 1e9, "matching": "greedy",
                             "keep": "best"})
    r = htba.craft_poisons(MODEL, variables, targets, sources, TRIGGER, cfg, key=1)
    assert r.iterations.tolist() == [1] and r.converged.tolist() == [True]
    assert np.isfinite(r.trace[0, 0]) and np.isnan(r.trace[0, 1:]).all()
    np.testing.assert_array_equal(r.poisons, targets[:K])  # keep="best": measured before the only step


def _conv_labels(hlo: str) -> set:
    return set(re.findall(r"dim_labels=\w+_(\w+)->", hlo))


def test_loop_friendly_convs_same_values_and_gradients_on_strided_padded_convs():
    model = get_model("alexnet", 3, conv_widths=(4, 4, 8, 4, 4), fc_widths=(8, 8))  # conv1: 11x11, stride 4, pad 2
    shape = (32, 32, 3)
    rng = np.random.default_rng(0)
    tensors = {n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in htba.torch_shapes(model).items()}
    variables = from_torch_layout(tensors, model)  # no init to compile
    x = jnp.asarray(rng.random((2, *shape)), jnp.float32)
    plain = htba.feature_fn(model, "fc7")

    def value_and_grad(f):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(f(variables, x) ** 2)))(x)

    (l0, g0), (l1, g1) = value_and_grad(plain), value_and_grad(loop_friendly_convs(plain))
    assert float(l0) > 0 and float(l1) == pytest.approx(float(l0), rel=1e-5)
    assert float(jnp.abs(g0).max()) > 0
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6 * float(jnp.abs(g0).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout question")
def test_loop_friendly_convs_keep_gradient_convolutions_canonical_inside_loops(setup):
    variables, targets, _ = setup
    plain = htba.feature_fn(MODEL, "penultimate")

    def loop(f):
        step = lambda _, z: z - jax.grad(lambda z: jnp.sum(f(variables, z) ** 2))(z)  # noqa: E731
        return jax.jit(lambda z: jax.lax.fori_loop(0, 3, step, z)).lower(jnp.asarray(targets[:K])).compile().as_text()

    assert _conv_labels(loop(loop_friendly_convs(plain))) == {"01io"}  # Eigen's layout for every kernel
