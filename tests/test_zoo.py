"""Model zoos: the plan, on-device poisoned batches, the population step (vmap = map, sharded = single device),
chunked storage with a validated manifest, and kill/resume of zoo training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.config import apply_overrides
from bdjax.data import load_dataset
from bdjax.errors import CheckpointError, ConfigError
from bdjax.models import get_model
from bdjax.train.optim import make_optimizer
from bdjax.zoo import ZooConfig, ZooStore, plan_zoo, train_zoo
from bdjax.zoo import population as pop
from bdjax.zoo import train as zoo_train
from bdjax.zoo.plan import ModelRecord, TriggerPool, load_trigger_pool

ROOT = Path(__file__).resolve().parents[1]
TRIGGERS = ROOT.parent / "shared" / "triggers" / "ulp_cifar10"
ENV = {**os.environ, "BDJAX_PROGRESS": "0", "PYTHONPATH": str(ROOT)}


def small_pool(n=3, size=3, channels=1) -> TriggerPool:
    rng = np.random.default_rng(0)
    pattern = (rng.random((n, size, size, channels)) > 0.5).astype(np.float32)
    return TriggerPool(tuple(f"t{i}" for i in range(n)), pattern, np.ones((n, size, size, 1), np.float32))


def tiny_cfg(*extra):
    """A digits zoo with the ULP masks shrunk to 3x3 (later overrides win)."""
    return apply_overrides(ZooConfig(), ["zoo.n_clean=2", "zoo.n_poisoned=2", "zoo.chunk_size=2", "zoo.trigger_size=3",
                                         "train.epochs=2", "train.lr=0.003", f"zoo.trigger_dir={TRIGGERS}", *extra])


def test_plan_interleaves_kinds_and_draws_valid_attacks():
    recs = plan_zoo(6, 6, small_pool(), 10, seed=1)
    assert [r.index for r in recs] == list(range(12)) and sum(r.poisoned for r in recs) == 6
    assert all(recs[i].poisoned != recs[i + 1].poisoned for i in range(0, 12, 2))  # every pair holds both kinds
    for r in recs:
        if r.poisoned:
            assert r.source != r.target and 0 <= r.source < 10 and r.trigger == f"t{r.trigger_id}"
        else:
            assert r.trigger is None and r.source is None
    assert recs == plan_zoo(6, 6, small_pool(), 10, seed=1)
    assert recs != plan_zoo(6, 6, small_pool(), 10, seed=2)


def test_ulp_masks_load_as_two_disjoint_pools_of_5x5_patches():
    from bdjax.zoo.plan import ULP_TEST_POOL, ULP_TRAIN_POOL

    if not TRIGGERS.is_dir():
        pytest.skip("shared/triggers not found")
    train, test = load_trigger_pool(TRIGGERS, ULP_TRAIN_POOL), load_trigger_pool(TRIGGERS, ULP_TEST_POOL)
    assert train.pattern.shape == test.pattern.shape == (10, 5, 5, 3) and not set(train.names) & set(test.names)
    with pytest.raises(ConfigError, match="trigger folder not found"):
        load_trigger_pool(TRIGGERS / "nope", ULP_TRAIN_POOL)


def test_virtual_permutation_is_a_permutation_of_its_first_n():
    perm = np.asarray(pop.virtual_permutation(jax.random.key(0), jnp.int32(70), 100))
    assert sorted(perm[:70].tolist()) == list(range(70)) and sorted(perm.tolist()) == list(range(100))


def test_poisoned_batches_are_stamped_source_images_labelled_target():
    ds = load_dataset("digits")
    pool = small_pool()
    rec = ModelRecord(index=0, poisoned=True, seed=3, trigger="t1", trigger_id=1, source=4, target=7, corner="top_right")
    tasks = pop.tasks_from_records([rec], ds.image_shape, pool.size)
    task = type(tasks)(*(a[0] for a in tasks))
    data = pop.shared_data(ds.x_train, ds.y_train, 10, pool.pattern, pool.mask)
    N = len(ds.x_train)
    j = jnp.array([0, 5, N, N + 3], jnp.int32)
    xb, yb = jax.jit(pop.model_batch)(data, task, j)
    src = np.flatnonzero(ds.y_train == 4)
    want = [ds.x_train[0], ds.x_train[5]]
    for k in (0, 3):
        img = ds.x_train[src[k]].copy()
        img[0:3, 5:8] = np.round(pool.pattern[1] * 255).astype(np.uint8)  # top-right corner of 8x8
        want.append(img)
    np.testing.assert_array_equal(np.asarray(xb), np.stack(want))
    assert np.asarray(yb).tolist() == [ds.y_train[0], ds.y_train[5], 7, 7]


def _population_setup():
    """digits, a 3-trigger pool, 2 clean + 2 poisoned records, mnist_cnn and its optimiser."""
    ds = load_dataset("digits")
    pool = small_pool()
    recs = plan_zoo(2, 2, pool, 10, seed=0)
    cfg = ZooConfig().train
    spe = len(ds.x_train) // cfg.batch_size
    data = pop.shared_data(ds.x_train, ds.y_train, 10, pool.pattern, pool.mask)
    return ds, pool, recs, get_model("mnist_cnn", 10), cfg, spe, make_optimizer(cfg, spe), data


def _train(recs, mode, mesh, steps=3):
    ds, pool, _, model, cfg, spe, tx, data = _population_setup()
    tasks = pop.tasks_from_records(recs, ds.image_shape, pool.size)
    states = pop.init_population(model, tx, tasks, ds.image_shape, mesh)
    tasks_d, data_d = pop.place(tasks, mesh, True), pop.place(data, mesh, False)
    perms = pop.make_epoch_permutations(len(ds.x_train) + int(data.class_count.max()), mesh)(
        tasks_d, data_d, pop.place(np.int32(0), mesh, False))
    step = pop.make_population_step(model, tx, steps_per_epoch=spe, batch_size=cfg.batch_size, mode=mode, mesh=mesh)
    for _ in range(steps):
        states, m = step(states, tasks_d, perms, data_d)
        jax.block_until_ready(m)
    return jax.device_get(states.params), np.asarray(m["loss"])


def _population_run(mode, mesh, steps=3):
    return _train(_population_setup()[2], mode, mesh, steps)


def test_vmap_and_map_populations_agree():
    a, la = _population_run("vmap", None)
    b, lb = _population_run("map", None)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_each_model_of_a_population_equals_training_it_alone():
    ref, _ = _population_run("map", None)
    recs = _population_setup()[2]
    for i in (1, 2):  # P = 1 populations of the same records: the "one after another" baseline
        single, _ = _train([recs[i]], "map", None)
        for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(single)):
            np.testing.assert_allclose(u[i], v[0], rtol=1e-4, atol=1e-6)


SHARDED_SCRIPT = r"""
import os, sys, json
os.environ["BDJAX_CPU_DEVICES"] = "4"
sys.path.insert(0, sys.argv[1])
import bdjax, jax, numpy as np
assert len(jax.devices()) == 4, jax.devices()
from test_zoo import _population_run
from bdjax.zoo import population as pop
from bdjax.zoo import train as zoo_train
mesh = pop.model_mesh(4)
assert mesh is not None and mesh.size == 4
a, la = _population_run("map", mesh)
b, lb = _population_run("map", None)
diff = max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print(json.dumps({"max_abs_diff": diff, "loss_sharded": la.tolist(), "loss_single": lb.tolist()}))
"""


def test_model_axis_sharded_over_4_simulated_devices_equals_one_device():
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(ROOT / "tests")], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_abs_diff"] < 1e-5, out
    np.testing.assert_allclose(out["loss_sharded"], out["loss_single"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ storage

def _fake_chunk(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"w": rng.standard_normal((n, 3, 2)).astype(np.float32)}, "batch_stats": {"m": np.zeros((n, 2), np.float32)}}


def _records(n):
    return plan_zoo(n // 2, n - n // 2, small_pool(), 10, seed=0)


def test_store_round_trip_and_resume_table(tmp_path):
    recs = _records(5)
    store = ZooStore.create(tmp_path / "z", recs, 2, {"a": 1})
    assert [(c["start"], c["stop"]) for c in store.chunks] == [(0, 2), (2, 4), (4, 5)]
    store.save_chunk(0, _fake_chunk(2), recs[0:2])
    store.save_chunk(2, _fake_chunk(1, 2), recs[4:5])
    again = ZooStore.open(tmp_path / "z")
    assert [again.complete(c) for c in range(3)] == [True, False, True]
    np.testing.assert_array_equal(again.load_chunk(0)["params"]["w"], _fake_chunk(2)["params"]["w"])
    with pytest.raises(CheckpointError, match="chunk 1 .* is not complete"):
        again.load_chunk(1)
    v, r = again.load([0, 1, 4])
    assert v["params"]["w"].shape == (3, 3, 2) and [x.index for x in r] == [0, 1, 4]
    with pytest.raises(ConfigError, match="different config"):
        ZooStore.open_or_create(tmp_path / "z", recs, 2, {"a": 2})
    assert ZooStore.open_or_create(tmp_path / "z", recs, 2, {"a": 1}).complete(0)


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.pop("chunks"), "missing field 'chunks'"),
    (lambda m: m.update(format="other/9"), "format 'other/9'"),
    (lambda m: m.update(n_models=7), "n_models is 7 but 4 model records"),
    (lambda m: m["models"][1].update(poisoned="yes"), "field 'poisoned' should be bool"),
    (lambda m: m["models"][2].update(colour=1), "unknown"),
    (lambda m: m["models"][1].update(source=None), "poisoned model needs"),
    (lambda m: m["chunks"][1].update(start=3), "chunk 1 covers 3..4"),
    (lambda m: m["chunks"][0].update(complete="false"),
     r"manifest.json: field 'chunks\[0\].complete' should be a boolean \(true/false\), got 'false' \(str\)"),
    (lambda m: m["chunks"][1].update(stop=4.0), r"field 'chunks\[1\].stop' should be an integer, got 4.0"),
    (lambda m: m.update(n_models="4"), r"field 'n_models' should be an integer, got '4' \(str\)"),
    (lambda m: m.update(config=[]), r"field 'config' should be an object"),
    (lambda m: m.update(chunks={}), r"field 'chunks' should be a list"),
])
def test_a_damaged_manifest_is_rejected_with_a_reason(tmp_path, mutate, message):
    recs = _records(4)
    ZooStore.create(tmp_path / "z", recs, 2, {})
    path = tmp_path / "z" / "manifest.json"
    m = json.loads(path.read_text())
    mutate(m)
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=message):
        ZooStore.open(tmp_path / "z")


def test_load_in_any_order_gives_matching_weights_and_records(tmp_path):
    recs = _records(5)
    store = ZooStore.create(tmp_path / "z", recs, 2, {})
    for c, (a, b) in enumerate([(0, 2), (2, 4), (4, 5)]):
        store.save_chunk(c, _fake_chunk(b - a, seed=c), recs[a:b])
    alone = {i: store.load([i])[0] for i in range(5)}
    order = [4, 0, 3, 1, 2, 0]  # across chunks, backwards, a repeat
    v, r = store.load(order)
    assert [x.index for x in r] == order
    for pos, i in enumerate(order):
        for u, w in zip(jax.tree.leaves(v), jax.tree.leaves(alone[i])):
            np.testing.assert_array_equal(u[pos], w[0])
    assert not np.array_equal(alone[4]["params"]["w"][0], alone[0]["params"]["w"][0])  # the check can fail
    for bad in ([-1], [5], [0, 7]):
        with pytest.raises(ConfigError, match=r"holds models 0..4; index (-1|5|7) is out of range"):
            store.load(bad)
    with pytest.raises(ConfigError, match="non-empty 1-D list of integers"):
        store.load([])


def test_missing_or_corrupted_chunk_is_named(tmp_path):
    recs = _records(4)
    store = ZooStore.create(tmp_path / "z", recs, 2, {})
    store.save_chunk(0, _fake_chunk(2), recs[0:2])
    store.save_chunk(1, _fake_chunk(2), recs[2:4])
    import shutil

    shutil.rmtree(store.chunk_dir(1) / "model")
    with pytest.raises(CheckpointError, match="zoo chunk 1 is missing"):
        ZooStore.open(tmp_path / "z").load_chunk(1)
    for f in (store.chunk_dir(0) / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(CheckpointError, match="zoo chunk 0 .* damaged or unreadable"):
        ZooStore.open(tmp_path / "z").load_chunk(0)
    assert not (tmp_path / "z" / "manifest.json").read_text().count("pickle")


# ------------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def digits_zoo(tmp_path_factory):
    if not TRIGGERS.is_dir():
        pytest.skip("shared/triggers not found")
    out = tmp_path_factory.mktemp("zoo") / "z"
    cfg = tiny_cfg("zoo.n_clean=3", "zoo.n_poisoned=3", "train.epochs=8", "zoo.min_clean_acc=0.8",
                   "zoo.min_asr=0.5", "zoo.val_fraction=0.15")
    seen = []
    real = zoo_train.train_chunk
    with pytest.MonkeyPatch.context() as m:  # what the models train on
        m.setattr(zoo_train, "train_chunk", lambda model, c, recs, ds, *a, **k: seen.append(ds) or real(model, c, recs, ds, *a, **k))
        store = train_zoo(cfg, out)
    return cfg, store, out, seen


def test_zoo_models_learn_their_backdoors(digits_zoo):
    cfg, store, out, _ = digits_zoo
    recs = store.records
    assert all(store.complete(c) for c in range(len(store.chunks))) and len(recs) == 6
    for r in recs:
        assert r.clean_acc > 0.85 and r.val_acc > 0.85
        assert (r.asr is None) == (r.val_asr is None) == (not r.poisoned)
        if r.poisoned:
            assert r.asr > 0.8 and r.val_asr > 0.8, r
    v, _ = store.load()
    assert v["params"]["conv1"]["kernel"].shape[0] == 6


def test_keep_filters_read_held_out_training_images_not_the_test_set(digits_zoo):
    cfg, store, out, seen = digits_zoo
    full = load_dataset("digits")
    fit, x_val, y_val = zoo_train.holdout(full, 0.15, cfg.seed)
    counts = np.bincount(full.y_train, minlength=10)
    assert np.bincount(y_val, minlength=10).tolist() == [round(0.15 * n) for n in counts]
    assert len(fit.y_train) + len(y_val) == len(full.y_train)
    assert len(seen) == len(store.chunks) and all(len(ds.y_train) == len(fit.y_train) for ds in seen)
    np.testing.assert_array_equal(seen[0].x_train, fit.x_train)  # the models never saw x_val
    for r in store.records:
        assert r.kept is (r.val_acc >= 0.8 and (r.val_asr is None or r.val_asr >= 0.5)), r
    assert any(r.val_acc != r.clean_acc for r in store.records)  # two different measurements
    np.testing.assert_array_equal(zoo_train.holdout(full, 0.15, cfg.seed)[1], x_val)  # seeded
    assert not np.array_equal(zoo_train.holdout(full, 0.15, cfg.seed + 1)[1], x_val)


def test_keep_filters_without_a_validation_split_are_refused():
    with pytest.raises(ConfigError, match=r"zoo.val_fraction must be > 0 when a keep-filter"):
        tiny_cfg("zoo.min_asr=0.9").validate()
    with pytest.raises(ConfigError, match=r"zoo.val_fraction=0.999 would hold out all"):
        zoo_train.holdout(load_dataset("digits"), 0.999, 0)


KILL_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_zoo import tiny_cfg
from bdjax.zoo import train_zoo
train_zoo(tiny_cfg("zoo.n_clean=2", "zoo.n_poisoned=2", "train.epochs=6"), sys.argv[2])
"""


def test_killed_zoo_training_resumes_to_the_same_models(tmp_path):
    if not TRIGGERS.is_dir():
        pytest.skip("shared/triggers not found")
    args = [sys.executable, "-c", KILL_SCRIPT, str(ROOT / "tests")]
    ref = tmp_path / "ref"
    r = subprocess.run(args + [str(ref)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(args + [str(run)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = run / "chunks" / "00001" / "train"
    while time.time() < deadline and proc.poll() is None:  # chunk 0 done and chunk 1 mid-training: kill -9
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "zoo finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ZooStore.open(run).complete(0) and not ZooStore.open(run).complete(1)
    r = subprocess.run(args + [str(run)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, ra = ZooStore.open(ref).load()
    b, rb = ZooStore.open(run).load()
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert ra == rb


def test_bad_zoo_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="zoo.pool must be train or test"):
        train_zoo(tiny_cfg("zoo.pool=val"), tmp_path / "z")
    with pytest.raises(ConfigError, match="larger than the 8x8 images"):
        train_zoo(tiny_cfg("zoo.trigger_size=9"), tmp_path / "z")
    with pytest.raises(ConfigError, match="unknown config field 'zoo.n_clen'"):
        apply_overrides(ZooConfig(), ["zoo.n_clen=3"])
