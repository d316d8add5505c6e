"""Neural Cleanse: the per-label cost schedule, all labels at once = one at a time, detection of a digits
BadNets backdoor, the MAD anomaly index, the trigger grid PNG, unlearning, bad input."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from bdjax.attacks import LabelMap, make_trigger, poison_test_set, poison_training_set
from bdjax.config import TrainConfig
from bdjax.data import load_dataset
from bdjax.defenses import neural_cleanse as NC
from bdjax.defenses.metrics import mad_anomaly_index
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.train import evaluate, fit

os.environ.setdefault("BDJAX_PROGRESS", "0")
INF = float("inf")


# ---------------------------------------------------------------------------------------------- schedule

def reference_schedule(accs, regs, cfg):
    """The official Visualizer.visualize bookkeeping (bolunwang/backdoor), transcribed for one label:
    returns the cost after each check-point and the check-point index of the early stop (or None)."""
    cost = 0.0 if cfg.reset_cost_to_zero else cfg.init_cost
    reg_best, es_reg_best = INF, INF
    set_c = up_c = down_c = es_c = 0
    up_f = down_f = False
    costs, improved = [], []
    for step, (acc, reg) in enumerate(zip(accs, regs)):
        imp = acc >= cfg.success_threshold and reg < reg_best
        improved.append(imp)
        if imp:
            reg_best = reg
        if cfg.early_stop:
            if reg_best < INF:
                es_c = es_c + 1 if reg_best >= cfg.early_stop_threshold * es_reg_best else 0
            es_reg_best = min(reg_best, es_reg_best)
            if down_f and up_f and es_c >= cfg.early_stop_patience:
                return costs, step, improved
        if cost == 0 and acc >= cfg.success_threshold:
            set_c += 1
            if set_c >= cfg.patience:
                cost = cfg.init_cost
                up_c = down_c = 0
                up_f = down_f = False
        else:
            set_c = 0
        if acc >= cfg.success_threshold:
            up_c, down_c = up_c + 1, 0
        else:
            up_c, down_c = 0, down_c + 1
        if up_c >= cfg.patience:
            up_c = 0
            cost *= cfg.cost_multiplier
            up_f = True
        elif down_c >= cfg.patience:
            down_c = 0
            cost /= cfg.cost_multiplier ** 1.5
            down_f = True
        costs.append(cost)
    return costs, None, improved


def run_schedule(accs, regs, cfg):
    """bdjax's array schedule on (T, L) sequences; returns per-check (cost, done, n_checks, improved) arrays."""
    accs, regs = np.asarray(accs, np.float32), np.asarray(regs, np.float32)
    s = NC.schedule_init(accs.shape[1], cfg)
    update = jax.jit(lambda s, a, r: NC.schedule_update(s, a, r, cfg))
    out = []
    for a, r in zip(accs, regs):
        s, imp = update(s, a, r)
        out.append((np.asarray(s.cost), np.asarray(s.done), np.asarray(s.n_checks), np.asarray(imp)))
    return out, s


def test_cost_is_set_then_doubled_after_5_successes():
    cfg = NC.NCConfig()
    out, _ = run_schedule(np.ones((16, 1)), np.full((16, 1), 10.0), cfg)
    costs = [float(c[0]) for c, *_ in out]
    assert costs[:4] == [0.0] * 4  # cost starts at 0
    assert costs[4] == pytest.approx(1e-3)  # set to init_cost after 5 successes
    # x2 after 5 consecutive successes; as in the original, the check-point that set the cost is the first
    assert costs[5:8] == [pytest.approx(1e-3)] * 3
    assert costs[8] == pytest.approx(2e-3)
    assert costs[9:13] == [pytest.approx(2e-3)] * 4
    assert costs[13] == pytest.approx(4e-3)
    ref, _, _ = reference_schedule(np.ones(16), np.full(16, 10.0), cfg)
    np.testing.assert_allclose(costs, ref, rtol=1e-6)


def test_cost_divided_by_2_pow_1_5_after_5_failures():
    cfg = NC.NCConfig(reset_cost_to_zero=False)
    acc = np.array([[1, 0]] * 5 + [[0, 0]] * 5, np.float32)  # label 0: 5 successes then failures; label 1: failures
    out, _ = run_schedule(acc, np.full((10, 2), 10.0), cfg)
    costs = np.array([c for c, *_ in out])
    np.testing.assert_allclose(costs[3], [1e-3, 1e-3])
    np.testing.assert_allclose(costs[4], [2e-3, 1e-3 / 2 ** 1.5], rtol=1e-6)  # both after exactly 5 check-points
    np.testing.assert_allclose(costs[9], [2e-3 / 2 ** 1.5, 1e-3 / 2 ** 3], rtol=1e-6)


def test_early_stop_and_frozen_labels():
    cfg = NC.NCConfig(reset_cost_to_zero=False)
    # label 0: 5 successes (cost up), 5 failures (cost down), then successes with a constant norm: no improvement
    acc = np.r_[np.ones(5), np.zeros(5), np.ones(40)][:, None].repeat(2, 1)
    acc[:, 1] = 1.0  # label 1 only ever goes up: never stops (the original needs both flags)
    out, s = run_schedule(acc, np.full(acc.shape, 10.0), cfg)
    done = np.array([d for _, d, _, _ in out])
    stop = int(np.argmax(done[:, 0]))
    ref_costs, ref_stop, _ = reference_schedule(acc[:, 0], np.full(50, 10.0), cfg)
    assert stop == ref_stop and done[stop:, 0].all() and not done[:, 1].any()
    assert np.asarray(s.n_checks).tolist() == [stop + 1, 50]  # counts the stopping check-point, then no more
    costs = np.array([c for c, *_ in out])
    assert (costs[stop:, 0] == costs[stop - 1, 0]).all()  # frozen after the stop


def test_schedule_matches_the_official_loop_on_random_sequences():
    rng = np.random.default_rng(0)
    cfg = NC.NCConfig(patience=3, early_stop_patience=6)
    T, L = 120, 8
    acc = (rng.random((T, L)) < np.linspace(0.3, 0.9, L)).astype(np.float32)  # success rate varies per label
    reg = rng.uniform(5, 20, (T, L))  # new record lows get rare over time: the early stop comes into play
    out, _ = run_schedule(acc, reg.astype(np.float32), cfg)
    costs = np.array([c for c, *_ in out])
    done = np.array([d for _, d, _, _ in out])
    imps = np.array([i for *_, i in out])
    n_stopped = 0
    for lab in range(L):
        ref_costs, ref_stop, ref_imp = reference_schedule(acc[:, lab], reg.astype(np.float32)[:, lab], cfg)
        n = len(ref_costs)
        np.testing.assert_allclose(costs[:n, lab], ref_costs, rtol=1e-5)
        np.testing.assert_array_equal(imps[:len(ref_imp), lab], ref_imp)
        if ref_stop is None:
            assert not done[:, lab].any()
        else:
            n_stopped += 1
            assert int(np.argmax(done[:, lab])) == ref_stop
    assert n_stopped >= 2  # the sequences exercise the early stop


# ---------------------------------------------------------------------------------------------- on a model

@pytest.fixture(scope="module")
def badnets_digits():
    """mnist_cnn on the digits with a 2x2 white patch, all-to-one target 0, 10% poisoned (trains in seconds)."""
    ds = load_dataset("digits")
    trig = make_trigger("patch", ds.image_shape, size=2)
    lm = LabelMap("all_to_one", 0)
    p = poison_training_set(ds.x_train, ds.y_train, trig, lm, 10, rate=0.1, seed=0)
    x_asr, y_asr = poison_test_set(ds.x_test, ds.y_test, trig, lm, 10)
    model = get_model("mnist_cnn", 10)
    cfg = TrainConfig(model="mnist_cnn", epochs=8, batch_size=64, lr=0.05, checkpoint_every=0)
    state = fit(model, cfg, p.x, p.y, seed=0)
    r = evaluate(model, state.variables, ds.x_test, ds.y_test, 10, x_asr, y_asr)
    assert r["asr"] > 0.9 and r["clean_acc"] > 0.9
    return ds, model, state.variables, x_asr, y_asr, r


# Short runs for the tests: batch 16, 5 steps per check-point, patience 2 (early stop after 6 check-points
# without improvement) so labels stop at different check-points and frozen labels are exercised.
CFG = NC.NCConfig(batch_size=16, steps_per_check=5, max_checks=30, patience=2, early_stop_patience=6)


@pytest.fixture(scope="module")
def nc_result(badnets_digits):
    ds, model, v, *_ = badnets_digits
    return NC.neural_cleanse(model, v, ds.x_test, 10, config=CFG)  # all 10 labels at once


def test_all_labels_at_once_equals_one_at_a_time(badnets_digits, nc_result):
    ds, model, v, *_ = badnets_digits
    a = nc_result
    b = NC.neural_cleanse(model, v, ds.x_test, 10, labels=[0, 5], config=CFG, mode="sequential")
    rows = [0, 5]
    assert b.labels.tolist() == rows and b.masks.shape == (2, 8, 8) and b.patterns.shape == (2, 8, 8, 1)
    assert a.early_stopped.any() and len(set(a.n_checks.tolist())) > 1  # labels stopped at different times
    np.testing.assert_array_equal(a.n_checks[rows], b.n_checks)
    np.testing.assert_array_equal(a.reached[rows], b.reached)
    # float32 reassociation (one conv over 10 x 16 images vs 16) drifts ~1e-4 over ~150 Adam steps
    np.testing.assert_allclose(a.masks[rows], b.masks, atol=2e-3)
    np.testing.assert_allclose(a.patterns[rows], b.patterns, atol=2e-3)
    np.testing.assert_allclose(a.norms[rows], b.norms, rtol=1e-3)
    np.testing.assert_allclose(a.cost[rows], b.cost, rtol=1e-6)


def test_compiled_loop_driver_equals_the_host_driver(badnets_digits, nc_result):
    """The same pure update, run under lax.fori_loop on device instead of one jitted call per step."""
    ds, model, v, *_ = badnets_digits
    loop = NC.neural_cleanse(model, v, ds.x_test, 10, labels=[0, 5],
                             config=dataclasses.replace(CFG, driver="loop"), mode="sequential")
    rows = [0, 5]
    np.testing.assert_array_equal(loop.n_checks, nc_result.n_checks[rows])
    np.testing.assert_allclose(loop.masks, nc_result.masks[rows], atol=2e-3)
    np.testing.assert_allclose(loop.cost, nc_result.cost[rows], rtol=1e-6)


def test_target_label_has_the_smallest_mask_and_is_flagged(nc_result):
    r = nc_result
    assert r.reached.all()
    assert int(np.argmin(r.norms)) == 0 and int(np.argmax(r.anomaly_index)) == 0
    assert 0 in r.flagged_labels and r.anomaly_index[0] > 3
    mask, pattern = r.trigger(0)
    assert mask.shape == (8, 8, 1) and pattern.shape == (8, 8, 1)
    assert mask[-3:, -3:].sum() > 0.5 * mask.sum()  # the reversed mask sits on the bottom-right patch


def test_anomaly_index_matches_a_hand_computation(nc_result):
    n = nc_result.norms
    med = sorted(n)[4:6]
    median = (med[0] + med[1]) / 2  # 10 labels: mean of the two middle values
    dev = sorted(abs(v - median) for v in n)
    mad = 1.4826 * (dev[4] + dev[5]) / 2
    np.testing.assert_allclose(nc_result.anomaly_index, [abs(v - median) / mad for v in n], rtol=1e-10)
    flagged = [i for i, v in enumerate(n) if v < median and abs(v - median) / mad > 2]
    assert nc_result.flagged_labels == flagged


def test_trigger_grid_png_is_written(nc_result, tmp_path):
    path = tmp_path / "nc_triggers.png"
    NC.save_trigger_grid(path, nc_result)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    s = nc_result.summary()
    assert s["flagged_labels"] == nc_result.flagged_labels and len(s["norms"]) == 10 and len(s["anomaly_index"]) == 10


def test_unlearning_removes_the_backdoor(badnets_digits, nc_result):
    ds, model, v, x_asr, y_asr, before = badnets_digits
    new, info = NC.unlearn(model, v, ds.x_train, ds.y_train, nc_result, fraction=0.2, epochs=2, seed=0)
    after = evaluate(model, new, ds.x_test, ds.y_test, 10, x_asr, y_asr)
    assert info["unlearn_labels"] == nc_result.flagged_labels and info["unlearn_steps"] > 0
    assert after["asr"] < 0.5 * before["asr"]
    assert after["clean_acc"] > before["clean_acc"] - 0.05
    assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(v))  # the caller's model is left intact


def test_bad_input_is_a_config_error(badnets_digits):
    ds, model, v, *_ = badnets_digits
    with pytest.raises(ConfigError, match="mode"):
        NC.neural_cleanse(model, v, ds.x_test, 10, mode="parallel")
    with pytest.raises(ConfigError, match="labels"):
        NC.neural_cleanse(model, v, ds.x_test, 10, labels=[3, 10])
    with pytest.raises(ConfigError, match="batch_size=64 is larger than the 20 clean images"):
        NC.neural_cleanse(model, v, ds.x_test[:20], 10, config=NC.NCConfig(batch_size=64))
    with pytest.raises(ConfigError, match="patience"):
        NC.neural_cleanse(model, v, ds.x_test, 10, config=NC.NCConfig(patience=0))


def test_an_odd_label_count_is_padded_over_the_devices_and_matches(badnets_digits, nc_result):
    # 3 labels on 2 devices: one padding label is added, run, and dropped.
    ds, model, v, *_ = badnets_digits
    r = NC.neural_cleanse(model, v, ds.x_test, 10, labels=[0, 3, 5], config=CFG)
    assert r.labels.tolist() == [0, 3, 5] and r.masks.shape == (3, 8, 8) and len(r.norms) == 3
    np.testing.assert_array_equal(r.n_checks, nc_result.n_checks[[0, 3, 5]])
    np.testing.assert_allclose(r.norms, nc_result.norms[[0, 3, 5]], rtol=1e-3)


def fake_result(norms) -> NC.NCResult:
    """An NCResult with the given mask norms and their anomaly index (the other fields are placeholders)."""
    norms = np.asarray(norms, np.float64)
    L = len(norms)
    z = np.zeros(L)
    return NC.NCResult(labels=np.arange(L), norms=norms, anomaly_index=mad_anomaly_index(norms),
                       flagged_labels=[], masks=np.zeros((L, 2, 2)), patterns=np.zeros((L, 2, 2, 1)),
                       reached=z > -1, cost=z, n_checks=z.astype(int), early_stopped=z > 0, steps=0,
                       mode="batched", wall_s=0.0, config=NC.NCConfig())


def test_model_score_is_the_largest_index_below_the_median(nc_result):
    r = fake_result([10.0, 11.0, 12.0, 13.0, 2.0, 40.0])  # 2.0 is the small outlier; 40.0 is large, not suspicious
    assert NC.model_score(r) == pytest.approx(r.anomaly_index[4])
    assert NC.model_score(fake_result([10.0, 11.0, 12.0, 13.0, 14.0, 80.0])) < 1.5  # only a large outlier
    assert NC.model_score(fake_result([5.0, 5.0, 5.0])) == 0.0  # no label below the median
    assert isinstance(NC.model_score(r), float)
    assert NC.model_score(nc_result) == pytest.approx(float(nc_result.anomaly_index[0]))  # the backdoor target
