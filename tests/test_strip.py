"""STRIP: triggered inputs have lower entropy, one compiled call per batch, the threshold rules, FRR, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bdjax.data import load_dataset
from bdjax.defenses import strip as S
from bdjax.errors import ConfigError

TARGET = 0


class ToyTrojan(nn.Module):
    """A random linear classifier, except that a white 2x2 bottom-right corner always gives TARGET."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        logits = 5.0 * nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
        trig = jnp.min(x[:, -2:, -2:, :], axis=(1, 2, 3)) >= 0.999
        return jnp.where(trig[:, None], 50.0 * jax.nn.one_hot(TARGET, self.num_classes), logits)


class Counting(nn.Module):
    """Records every trace of its __call__ (Python runs only while tracing) and the batch it saw."""
    num_classes: int = 10
    traces = []  # class-level on purpose: a module is a frozen dataclass

    @nn.compact
    def __call__(self, x, train: bool = False):
        Counting.traces.append(tuple(x.shape))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    clean = ds.x_test[ds.x_test[:, -2:, -2:].max(axis=(1, 2, 3)) < 200]  # no accidental trigger
    return ds, clean


def toy(num_classes=10):
    model = ToyTrojan(num_classes)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def triggered(x):
    x = x.copy()
    x[:, -2:, -2:] = 255
    return x


def test_triggered_inputs_have_lower_entropy(digits):
    ds, clean = digits
    model, v = toy()
    pool, xc = ds.x_train[:200], clean[:60]
    e_clean = S.strip_entropy(model, v, xc, pool, n_overlay=20)
    e_trig = S.strip_entropy(model, v, triggered(xc), pool, n_overlay=20)
    assert e_clean.shape == (60,) and e_trig.shape == (60,)
    assert e_trig.max() < 1e-3 < e_clean.min()  # the trigger survives every superimposition
    assert e_clean.max() <= np.log2(10) + 1e-5
    res = S.run_strip(model, v, xc, triggered(xc), pool, n_overlay=20, frr=0.05)
    assert res.far == 0.0 and res.auc == 1.0 and res.threshold > e_trig.max()


def test_entropy_matches_a_direct_computation(digits):
    ds, clean = digits
    model, v = toy()
    pool, xc = ds.x_train[:50], clean[:3]
    e = S.strip_entropy(model, v, xc, pool, n_overlay=5, blend="add", seed=7)
    idx = S.overlay_indices(7, 0, 3, len(pool), 5)
    for i in range(3):
        mixed = np.clip(xc[i][None] / 255.0 + pool[idx[i]] / 255.0, 0, 1).astype(np.float32)
        p = np.asarray(jax.nn.softmax(model.apply(v, jnp.asarray(mixed))), np.float64)
        ent = -np.sum(p * np.log2(np.maximum(p, 1e-300)), axis=1).mean()
        np.testing.assert_allclose(e[i], ent, rtol=1e-4, atol=1e-5)
    assert all(len(set(row)) == 5 for row in idx)  # distinct overlays per input


def test_all_superimposed_images_go_through_one_compiled_call(digits, monkeypatch):
    ds, clean = digits
    model = Counting(10)
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    calls = []
    real = S._entropy_fn

    def counting_fn(m, blend):
        fn = real(m, blend)
        return lambda *a: calls.append(a[1].shape) or fn(*a)

    monkeypatch.setattr(S, "_entropy_fn", counting_fn)
    Counting.traces.clear()
    e = S.strip_entropy(model, v, clean[:25], ds.x_train[:100], n_overlay=7, batch_size=10)
    assert e.shape == (25,)
    assert len(calls) == 3  # ceil(25 / 10) calls, one per input batch (the last one padded)
    assert Counting.traces == [(70, 8, 8, 1)]  # traced once, on all 10 x 7 superimposed images
    Counting.traces.clear()
    S.strip_entropy(model, v, clean[:10], ds.x_train[:100], n_overlay=7, batch_size=10)
    assert Counting.traces == []  # cached: no retrace for the same shapes


def test_threshold_rules_match_scipy_and_numpy():
    e = np.random.default_rng(0).gamma(4.0, 0.3, 2000)
    mu, sigma = scipy.stats.norm.fit(e)
    for frr in (0.01, 0.05):
        assert S.strip_threshold(e, frr) == pytest.approx(scipy.stats.norm.ppf(frr, mu, sigma), rel=1e-9)
        assert S.strip_threshold(e, frr, "empirical") == pytest.approx(np.quantile(e, frr), rel=1e-12)
    assert S.strip_threshold(np.full(10, 0.7), 0.01) == 0.7  # degenerate: no spread


def test_frr_on_clean_calibration_is_close_to_the_requested_rate(digits):
    e = np.random.default_rng(1).normal(2.0, 0.4, 20000)  # normal entropies: the normal rule is exact
    thr = S.strip_threshold(e, 0.01)
    assert abs(np.mean(e < thr) - 0.01) < 0.003
    ds, clean = digits
    model, v = toy()
    xc = clean[:300]
    res = S.run_strip(model, v, xc, triggered(xc[:50]), ds.x_train[:300], n_overlay=10, frr=0.05, rule="empirical")
    assert abs(res.frr - 0.05) <= 1 / len(xc) + 1e-9 and res.frr == res.calib_frr
    res_n = S.run_strip(model, v, xc[:150], triggered(xc[:50]), ds.x_train[:300], n_overlay=10, frr=0.05,
                        x_calib=xc[150:])  # threshold on a separate clean set, FRR reported on held-out inputs
    assert len(res_n.calib_entropy) == 150 and 0.0 <= res_n.frr <= 0.2 and res_n.far == 0.0


def test_bad_input_is_a_config_error(digits):
    ds, clean = digits
    model, v = toy()
    pool = ds.x_train[:50]
    with pytest.raises(ConfigError, match="n_overlay=51 is larger than the held-out pool of 50"):
        S.strip_entropy(model, v, clean[:4], pool, n_overlay=51)
    with pytest.raises(ConfigError, match="blend"):
        S.strip_entropy(model, v, clean[:4], pool, n_overlay=5, blend="max")
    with pytest.raises(ConfigError, match="frr"):
        S.run_strip(model, v, clean[:4], clean[:4], pool, n_overlay=5, frr=1.5)
    with pytest.raises(ConfigError, match="rule"):
        S.strip_threshold([1.0, 2.0], 0.01, rule="gauss")
    with pytest.raises(ConfigError, match="expected"):
        S.strip_entropy(model, v, np.zeros((2, 9, 9, 1), np.uint8), pool, n_overlay=5)
