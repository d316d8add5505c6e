"""MoCo v2, BYOL, RotNet and Jigsaw on the training core: losses by hand, the queue, the EMAs, learning on tiny data,
data-parallel == single device, exact resume."""
import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ssl_tiny import TinyNet

from bdjax.errors import ConfigError
from bdjax.ssl import byol, jigsaw, moco, rotnet
from bdjax.ssl import pretraining as P
from bdjax.ssl.augment import AugmentConfig
from bdjax.ssl.encoder import apply_grouped
from bdjax.train import core
from bdjax.train.loop import train_loop
from bdjax.train.sharding import axis_mesh, replicated

AUG = AugmentConfig(crop_scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
MOCO = moco.MocoConfig(dim=8, hidden=16, queue_size=16, momentum=0.9, augment=AUG)
BYOL = byol.ByolConfig(dim=8, hidden=16, predictor_hidden=16, augment=AUG)
N, B = 64, 8


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)  # a distinct colour per image, plus texture: instances can be told apart
    return (rng.integers(0, 256, (N, 1, 1, 3)) * 0.7 + rng.integers(0, 256, (N, 8, 8, 3)) * 0.3).astype(np.uint8)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_infonce_by_hand():
    rng = np.random.default_rng(1)
    q, k, queue = unit(rng.normal(size=(4, 5))), unit(rng.normal(size=(4, 5))), unit(rng.normal(size=(6, 5)))
    loss, _ = moco.infonce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), 0.2)
    expected = []
    for i in range(4):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / 0.2
        expected.append(np.log(np.exp(logits).sum()) - logits[0])
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    _, acc = moco.infonce(jnp.asarray(q), jnp.asarray(q), -jnp.asarray(np.repeat(q[:1], 6, 0)), 0.2)
    assert float(acc) == 1.0  # positive = the query itself beats every negative


def test_queue_replaces_the_oldest_batch_and_wraps():
    queue, ptr = jnp.zeros((6, 1)), jnp.int32(0)
    for b in range(4):
        queue, ptr = moco.enqueue(queue, ptr, jnp.full((2, 1), b + 1.0))
    # batches 1, 2, 3 filled rows 0-5; batch 4 overwrote the oldest (batch 1)
    np.testing.assert_array_equal(queue[:, 0], [4, 4, 2, 2, 3, 3])
    assert int(ptr) == 2


def test_queue_size_not_a_multiple_of_the_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="moco.queue_size=100 must be a positive multiple of the batch size 64"):
        moco.MocoConfig(queue_size=100).validate(64)


def test_ema_formulas():
    tx = optax.sgd(0.1)
    state = core.TrainState.create({"params": {"w": jnp.ones(2)}}, tx,
                                   extra={"key_params": {"w": jnp.zeros(2)}, "target_params": {"w": jnp.zeros(2)}})
    moved = moco.after_update(moco.MocoConfig(momentum=0.99))(state)
    np.testing.assert_allclose(moved.extra["key_params"]["w"], 0.01, rtol=1e-6)
    # BYOL: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2 for the step k just taken
    assert float(byol.tau_schedule(0, 10, 0.99)) == pytest.approx(0.99)
    assert float(byol.tau_schedule(5, 10, 0.99)) == pytest.approx(0.995)
    assert float(byol.tau_schedule(10, 10, 0.99)) == pytest.approx(1.0)
    moved = byol.after_update(byol.ByolConfig(tau_base=0.9), 10)(state.replace(step=jnp.int32(1)))
    np.testing.assert_allclose(moved.extra["target_params"]["w"], 0.1, rtol=1e-5)  # tau = 0.9 at k = 0


def test_byol_loss_is_2_minus_2_cos():
    p, z = jnp.array([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0]]), jnp.array([[0.0, 2.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(byol.regression_loss(p, z), [2.0, 0.0, 4.0], atol=1e-6)


def test_rotations_and_labels():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    xs, ys = rotnet.rotations(x)
    np.testing.assert_array_equal(ys, [0, 1, 2, 3])
    np.testing.assert_array_equal(xs[1, ..., 0], [[1, 3], [0, 2]])  # 90 degrees anticlockwise
    np.testing.assert_array_equal(xs[2, ..., 0], [[3, 2], [1, 0]])


def test_grouped_batchnorm_is_per_group():
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
    run = jax.jit(lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"]))
    out, stats = jax.jit(lambda x: apply_grouped(model, variables["params"], variables["batch_stats"], x, 2))(x)
    (a, sa), (b, sb) = run(x[:4]), run(x[4:])
    np.testing.assert_allclose(out, jnp.concatenate([a, b]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn"]["mean"], (sa["batch_stats"]["bn"]["mean"] + sb["batch_stats"]["bn"]["mean"]) / 2,
                               rtol=1e-5)
    whole, _ = run(x)
    assert not np.allclose(out, whole, atol=1e-4)  # the whole-batch statistics differ


def _setup(method, cfg, images, total=48, lr=0.1):
    m = P.build(method, TinyNet(), cfg, batch_size=B, total_steps=total)
    tx = optax.sgd(lr, 0.9)
    # an rbg key: its RNG compiles in half the time of threefry (init is most of these tests' compile time)
    state = jax.jit(lambda k: P.init_state(m, tx, k, images.shape[1:]))(jax.random.key(0, impl="rbg"))
    return m, tx, state


def _run_steps(m, tx, state, images, n_steps):
    """n_steps compiled pretraining steps over `images` in order; returns (state, the loss of every step)."""
    step = P.make_step(m, tx, batch_size=B, steps_per_epoch=N // B)
    task, data, perm = core.RunTask(jnp.int32(0)), (jnp.asarray(images),), jnp.arange(N)
    losses = []
    for _ in range(n_steps):
        state, metrics = step(state, task, perm, data)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("method,cfg", [("moco", MOCO), ("byol", BYOL)])
def test_a_few_steps_reduce_the_loss(images, method, cfg):
    m, tx, state = _setup(method, cfg, images)
    state, losses = _run_steps(m, tx, state, images, 48)
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.9 * first, (first, last)
    assert int(state.step) == 48
    if method == "moco":  # the queue holds the last two batches' keys (unit rows), the pointer wrapped
        assert int(state.extra["ptr"]) == 0
        np.testing.assert_allclose(np.linalg.norm(state.extra["queue"], axis=1), 1.0, rtol=1e-5)
        key_leaf, q_leaf = state.extra["key_params"]["projector"]["fc2"]["kernel"], state.params["projector"]["fc2"]["kernel"]
        assert not np.allclose(key_leaf, q_leaf) and np.abs(key_leaf - q_leaf).max() < np.abs(q_leaf).max()


def test_byol_groups_hold_both_views_of_their_own_images():
    v1, v2 = jnp.arange(4)[:, None] * 1.0, 10 + jnp.arange(4)[:, None] * 1.0
    np.testing.assert_array_equal(byol._by_group(v1, v2, 1)[:, 0], [0, 1, 2, 3, 10, 11, 12, 13])  # [v1; v2]
    np.testing.assert_array_equal(byol._by_group(v1, v2, 2)[:, 0], [0, 1, 10, 11, 2, 3, 12, 13])
    for g in (1, 2, 4):
        a, b = byol._views_of(byol._by_group(v1, v2, g), g)
        np.testing.assert_array_equal(a, v1) and np.testing.assert_array_equal(b, v2)
    with pytest.raises(ConfigError, match="byol.bn_groups=3 must be 0"):
        byol.ByolConfig(bn_groups=3).validate(8)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (bdjax makes one per CPU core)")
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_data_parallel_step_is_the_single_device_step(images, method):
    """Two devices, one BN group per device (MoCo's Shuffle-BN; BYOL with bn_groups=0) == one device with two
    BN groups."""
    if method == "moco":
        cfg = moco.MocoConfig(dim=8, hidden=16, queue_size=16, momentum=0.9, bn_groups=2, augment=AUG)
    else:
        cfg = byol.ByolConfig(dim=8, hidden=16, predictor_hidden=16, bn_groups=2, augment=AUG)
    m, tx, state = _setup(method, cfg, images)
    task, data, perm = core.RunTask(jnp.int32(0)), (jnp.asarray(images),), jnp.arange(N)
    mesh = axis_mesh("data", 2)
    single = P.make_step(m, tx, batch_size=B, steps_per_epoch=N // B)
    sharded = P.make_step(m, tx, batch_size=B, steps_per_epoch=N // B, mesh=mesh)
    host = jax.device_get(state)  # two independent copies: both steps donate their state
    s1 = jax.device_put(host, jax.devices()[0])
    s2, task2, data2, perm2 = jax.device_put((host, task, data, perm), replicated(mesh))
    for _ in range(3):
        s1, m1 = single(s1, task, perm, data)
        s2, m2 = sharded(s2, task2, perm2, data2)
        jax.block_until_ready(m2)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    chex.assert_trees_all_close(s1.params, jax.device_get(s2.params), rtol=1e-4, atol=1e-6)
    leaf = "queue" if method == "moco" else "target_params"
    chex.assert_trees_all_close(s1.extra[leaf], jax.device_get(s2.extra[leaf]), rtol=1e-4, atol=1e-6)


def test_pretraining_resumes_exactly(images, tmp_path):
    """Stopped after one epoch and resumed from its orbax checkpoint, BYOL (target network and all) ends where
    the uninterrupted run does."""
    m, tx, state = _setup("byol", BYOL, images, total=16)
    host = jax.device_get(state)
    fresh = lambda: jax.device_put(host, jax.devices()[0])  # a new copy per run: the step donates its state
    step = P.make_step(m, tx, batch_size=B, steps_per_epoch=N // B)
    keys = core.stream_keys(0)
    data, task = (jnp.asarray(images),), core.RunTask(jnp.int32(0))
    order = lambda e: core.epoch_permutation(keys["perm"], e, N)
    run = lambda st, perm: step(st, task, perm, data)
    kw = dict(steps_per_epoch=N // B, show_progress=False)
    whole, _ = train_loop(run, fresh(), order, epochs=2, **kw)
    train_loop(run, fresh(), order, epochs=1, checkpoint_dir=tmp_path, **kw)
    resumed, n_rest = train_loop(run, fresh(), order, epochs=2, checkpoint_dir=tmp_path, **kw)
    assert n_rest == N // B
    chex.assert_trees_all_equal(resumed.params, whole.params)
    chex.assert_trees_all_equal(resumed.extra, whole.extra)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown ssl method 'simclr'"):
        P.build("simclr", TinyNet(), None, batch_size=8, total_steps=1)


# ------------------------------------------------------------------------------------------------ Jigsaw


def test_permutation_set_is_far_apart_distinct_and_seeded():
    orders = jigsaw.permutation_set(100, grid=3, seed=0)
    assert orders.shape == (100, 9) and orders.dtype == np.int32
    assert all(sorted(o) == list(range(9)) for o in orders.tolist())
    dist = (orders[:, None] != orders[None]).sum(-1)
    np.fill_diagonal(dist, 9)
    assert dist.min() >= 6  # random orders: pairs of 100 at distance <= 5 are the rule, not the exception
    np.testing.assert_array_equal(orders, jigsaw.permutation_set(100, grid=3, seed=0))
    assert not np.array_equal(orders, jigsaw.permutation_set(100, grid=3, seed=1))
    all_four = jigsaw.permutation_set(24, grid=2)  # every order of a 2x2 grid
    assert sorted(map(tuple, all_four.tolist())) == sorted(itertools.permutations(range(4)))


def test_shuffled_tiles_put_cell_order_j_at_position_j_standardised():
    cfg = jigsaw.JigsawConfig(grid=3, tile=2, gray_p=0.0)  # tile = cell: no jitter room
    x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 3))
    orders = jnp.array([[8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    tiles = np.asarray(jigsaw.shuffled_tiles(jax.random.key(1), x, orders, cfg))
    assert tiles.shape == (2, 9, 2, 2, 3)
    xn = np.asarray(x)
    for b in range(2):
        for j, cell in enumerate(np.asarray(orders[b])):
            r, c = divmod(int(cell), 3)
            want = xn[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
            np.testing.assert_allclose(tiles[b, j], (want - want.mean()) / (want.std() + 1e-5), rtol=1e-4, atol=1e-4)
    gray = np.asarray(jigsaw.shuffled_tiles(jax.random.key(1), x, orders, dataclasses.replace(cfg, gray_p=1.0)))
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-5)  # grayscale: equal channels
    assert not np.allclose(tiles[..., 0], tiles[..., 2], atol=1e-2)


def test_tile_jitter_stays_inside_its_cell_and_uses_the_whole_room():
    cfg = jigsaw.JigsawConfig(grid=3, tile=8, gray_p=0.0)  # 32 px: cells of 10, a 0-2 px jitter
    x = jax.random.uniform(jax.random.key(0), (16, 32, 32, 1))
    identity = jnp.tile(jnp.arange(9), (16, 1))
    tiles = np.asarray(jigsaw.shuffled_tiles(jax.random.key(1), x, identity, cfg))
    xn, seen = np.asarray(x), set()
    std = lambda a: (a - a.mean()) / (a.std() + 1e-5)
    for b in range(16):
        for cell in range(9):
            r, c = divmod(cell, 3)
            crop = lambda dy, dx: xn[b, 10 * r + dy:10 * r + dy + 8, 10 * c + dx:10 * c + dx + 8]
            match = [(dy, dx) for dy in range(3) for dx in range(3)
                     if np.allclose(tiles[b, cell], std(crop(dy, dx)), atol=1e-4)]
            assert len(match) == 1, (b, cell, match)  # a crop inside its own cell, nowhere else
            seen.add(match[0])
    assert seen == {(dy, dx) for dy in range(3) for dx in range(3)}  # the whole room is drawn


def _position_images(n=64, side=12, seed=0):
    """Images whose 3x3 cells each carry their own colour mix plus noise: a cell's content tells its position,
    which survives per-tile standardisation (the channels' relative levels)."""
    rng = np.random.default_rng(seed)
    mix = rng.random((3, 3, 3))
    cells = np.repeat(np.repeat(mix, side // 3, 0), side // 3, 1)
    return (255 * np.clip(0.8 * cells[None] + 0.2 * rng.random((n, side, side, 3)), 0, 1)).astype(np.uint8)


def test_jigsaw_learns_the_permutation_of_positional_tiles():
    images = _position_images()
    cfg = jigsaw.JigsawConfig(grid=3, tile=4, n_permutations=8, hidden=32, gray_p=0.0, augment="none")
    m, tx, state = _setup("jigsaw", cfg, images, lr=0.05)
    state, losses = _run_steps(m, tx, state, images, 48)
    assert np.mean(losses[:4]) > 0.9 * np.log(8)  # chance at the start
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4]), losses
    feats = m.model.apply(state.variables, jnp.asarray(images[:2], jnp.float32) / 255, method="features")
    assert feats.shape == (2, TinyNet().width)  # linear evaluation reads the backbone on whole images


def test_jigsaw_config_errors():
    with pytest.raises(ConfigError, match="jigsaw.tile=8 does not fit a cell of a 12-pixel image"):
        P.init_state(P.build("jigsaw", TinyNet(), jigsaw.JigsawConfig(tile=8), batch_size=8, total_steps=1),
                     optax.sgd(0.1), jax.random.key(0), (12, 12, 3))
    for bad, match in ((dict(grid=1), "grid must be >= 2"), (dict(grid=2, n_permutations=25), r"\[2, 24\]"),
                       (dict(gray_p=1.5), "gray_p"), (dict(augment="rotate"), "jigsaw.augment")):
        with pytest.raises(ConfigError, match=match):
            jigsaw.JigsawConfig(**bad).validate()
