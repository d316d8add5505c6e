"""STRIP (Gao et al., ACSAC 2019; official notebook garrisongys/STRIP): run-time detection of triggered inputs.

Each input x is superimposed with N clean held-out images; a clean input's predictions then scatter over the
classes (high entropy) while a triggered input keeps predicting the attacker's target (low entropy). The score
of x is the mean Shannon entropy (log base 2) of the N softmax outputs; x is rejected as trojaned when its score
is below a threshold set on clean inputs for a chosen false rejection rate (FRR).

    res = run_strip(model, variables, x_clean, x_triggered, x_pool, n_overlay=100, frr=0.01)
    res.far, res.frr, res.auc, res.threshold

Choices (and how they relate to the official notebook):

- Superimposition, `blend`:
  * "add" (default): clip(x + bg, 0, 1) on images in [0, 1], i.e. `cv2.addWeighted(x, 1, bg, 1, 0)` on uint8
    images (OpenCV saturates), as in BackdoorBox's STRIP. bdjax models take [0, 1] inputs, so the sum is
    clipped back into the range the model was trained on.
  * "sum": x + bg unclipped. This is what the notebook computes: its arrays are z-score standardised floats,
    for which addWeighted does not saturate. On [0, 1] inputs it feeds values up to 2 to the model.
  * "average": (x + bg) / 2, a blend that stays in range without saturating.
- Overlays: for every input, N distinct images drawn without replacement from the held-out pool (the notebook
  draws N indices with replacement from 10,000 training images); hence N larger than the pool is an error.
  The draw is a function of (seed, input position), so results are reproducible.
- Threshold, `rule`: "normal" (official) fits a normal distribution to the clean entropies (maximum likelihood:
  mean and the ddof=0 standard deviation, as scipy.stats.norm.fit) and takes its `frr` quantile;
  "empirical" takes the empirical `frr` quantile of the clean entropies.
- Rates: FRR = fraction of clean inputs with entropy < threshold; FAR = fraction of triggered inputs with
  entropy >= threshold (accepted as clean); AUC = ROC AUC of -entropy for triggered vs clean inputs.
  The notebook sets the threshold on 2000 clean inputs and reports the FRR on those same inputs; pass
  `x_calib` to set it on a separate clean set instead (both FRRs are then reported).

Compute: for a batch of B inputs, the B x N superimposed images are built on device and go through the model in
ONE compiled call (one trace; the last batch is padded to the same shape), on a single device.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.defenses.metrics import roc_auc
from bdjax.errors import ConfigError
from bdjax.train.core import to_float
from bdjax.plots import save_entropy_histogram  # noqa: F401  (re-exported: the figures live with the others)

BLENDS = ("add", "sum", "average")
RULES = ("normal", "empirical")
IMAGES_PER_CALL = 2000  # default batch: about this many superimposed images per compiled call


@dataclasses.dataclass(frozen=True)
class StripConfig:
    """STRIP's settings, as run_strip's keyword arguments (bdjax.pipelines.defend passes them)."""

    n_overlay: int = 100  # clean held-out images superimposed on each input (N)
    frr: float = 0.01  # false rejection rate the entropy threshold is set for
    rule: str = "normal"  # normal (the official fit of a normal to clean entropies) | empirical (their quantile)
    blend: str = "add"  # add: clip(x + bg, 0, 1) | sum: x + bg unclipped (the notebook) | average: (x + bg) / 2
    batch_size: int | None = None  # inputs per compiled call (None: about 2000 superimposed images)

    def validate(self) -> "StripConfig":
        strip_threshold([0.0, 1.0], self.frr, self.rule)
        if self.blend not in BLENDS:
            raise ConfigError(f"strip blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.n_overlay < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError(f"strip n_overlay and batch_size must be >= 1, got {self.n_overlay}, {self.batch_size}")
        return self

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StripResult:
    threshold: float
    frr: float  # clean inputs rejected (entropy < threshold)
    far: float | None  # triggered inputs accepted (entropy >= threshold); None without triggered inputs
    auc: float | None  # ROC AUC of -entropy, triggered = positive
    calib_frr: float  # FRR on the calibration set (equals frr when the threshold is set on x_clean)
    target_frr: float
    rule: str
    blend: str
    n_overlay: int
    clean_entropy: np.ndarray
    triggered_entropy: np.ndarray
    calib_entropy: np.ndarray

    def summary(self) -> dict:
        """JSON-ready numbers (no per-input arrays)."""
        e_c, e_t = self.clean_entropy, self.triggered_entropy
        return {
            "threshold": float(self.threshold), "frr": float(self.frr), "far": self.far, "auc": self.auc,
            "calib_frr": float(self.calib_frr), "target_frr": float(self.target_frr), "rule": self.rule,
            "blend": self.blend, "n_overlay": int(self.n_overlay), "n_clean": int(len(e_c)),
            "n_triggered": int(len(e_t)), "n_calib": int(len(self.calib_entropy)),
            "clean_entropy_mean": float(e_c.mean()) if len(e_c) else None,
            "triggered_entropy_mean": float(e_t.mean()) if len(e_t) else None,
        }


def superimpose(x: jax.Array, bg: jax.Array, blend: str = "add") -> jax.Array:
    """Superimpose float images in [0, 1] (broadcasting); see the module docstring for the blends."""
    if blend == "add":
        return jnp.clip(x + bg, 0.0, 1.0)
    if blend == "sum":
        return x + bg
    if blend == "average":
        return 0.5 * (x + bg)
    raise ConfigError(f"strip blend must be one of {', '.join(BLENDS)}, got {blend!r}")


@functools.lru_cache(maxsize=32)
def _entropy_fn(model, blend: str):
    def fn(variables, x, pool, idx):
        # x (B, H, W, C), pool (P, H, W, C), idx (B, N): all B*N superimposed images in one forward pass.
        B, N = idx.shape
        mixed = superimpose(to_float(x)[:, None], to_float(pool[idx]), blend)  # (B, N, H, W, C)
        logits = model.apply(variables, mixed.reshape(B * N, *mixed.shape[2:]), train=False)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1) / jnp.log(2.0)  # bits
        return ent.reshape(B, N).mean(axis=1)
    return jax.jit(fn)


def _check_images(name: str, x, image_shape=None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ConfigError(f"strip {name} must be a batch of images (N, H, W, C), got shape {x.shape}")
    if image_shape is not None and x.shape[1:] != tuple(image_shape):
        raise ConfigError(f"strip {name} images are {x.shape[1:]}, expected {tuple(image_shape)} like the pool")
    return x


def _check_n(n_overlay, pool_size: int) -> int:
    if isinstance(n_overlay, bool) or not isinstance(n_overlay, (int, np.integer)) or n_overlay < 1:
        raise ConfigError(f"strip n_overlay must be a positive integer, got {n_overlay!r}")
    if n_overlay > pool_size:
        raise ConfigError(f"strip n_overlay={n_overlay} is larger than the held-out pool of {pool_size} clean "
                          f"images (each input is blended with n_overlay distinct pool images)")
    return int(n_overlay)


def overlay_indices(seed: int, start: int, count: int, pool_size: int, n_overlay: int) -> np.ndarray:
    """(count, n_overlay) distinct pool indices per input, for inputs start..start+count-1 of one call."""
    out = np.empty((count, n_overlay), np.int32)
    for i in range(count):
        rng = np.random.default_rng((seed, start + i))
        out[i] = rng.choice(pool_size, n_overlay, replace=False)
    return out


def strip_entropy(model, variables, x, x_pool, *, n_overlay: int = 100, blend: str = "add",
                  batch_size: int | None = None, seed: int = 0) -> np.ndarray:
    """Mean entropy (bits) of the predictions on `n_overlay` superimpositions of each input of `x`.

    `x` and `x_pool` are uint8 (or float [0, 1]) NHWC images; `batch_size` inputs (default: about
    IMAGES_PER_CALL superimposed images) are processed per compiled call."""
    x_pool = _check_images("x_pool", x_pool)
    x = _check_images("x", x, x_pool.shape[1:])
    n_overlay = _check_n(n_overlay, len(x_pool))
    if blend not in BLENDS:
        raise ConfigError(f"strip blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    if batch_size is None:
        batch_size = max(1, IMAGES_PER_CALL // n_overlay)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"strip batch_size must be a positive integer, got {batch_size!r}")
    if len(x) == 0:
        return np.zeros((0,), np.float32)
    batch_size = int(min(batch_size, len(x)))
    fn = _entropy_fn(model, blend)
    dev = jax.devices()[0]  # one device: plain jit on unsharded arrays
    pool = jax.device_put(x_pool, dev)
    variables = jax.device_put(variables, dev)  # trained weights may be replicated over a multi-device mesh
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        pad = batch_size - len(xb)
        if pad:  # one shape only: one trace, one compilation
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
        idx = overlay_indices(seed, i, batch_size, len(x_pool), n_overlay)
        out.append(np.asarray(fn(variables, jax.device_put(xb, dev), pool, jax.device_put(idx, dev)))[:batch_size - pad])
    return np.concatenate(out).astype(np.float32)


def strip_threshold(clean_entropy, frr: float = 0.01, rule: str = "normal") -> float:
    """Entropy threshold that rejects a fraction `frr` of clean inputs (those below it).

    normal: the `frr` quantile of the normal distribution fitted to `clean_entropy` (official);
    empirical: the empirical `frr` quantile (numpy's linear interpolation)."""
    if not isinstance(frr, (int, float, np.floating)) or not 0.0 < float(frr) < 1.0:
        raise ConfigError(f"strip frr must be a fraction in (0, 1), got {frr!r}")
    if rule not in RULES:
        raise ConfigError(f"strip rule must be one of {', '.join(RULES)}, got {rule!r}")
    e = np.asarray(clean_entropy, np.float64).reshape(-1)
    if len(e) < 2:
        raise ConfigError(f"strip needs at least 2 clean inputs to set the threshold, got {len(e)}")
    if rule == "empirical":
        return float(np.quantile(e, float(frr)))
    mu, sigma = float(e.mean()), float(e.std())  # maximum-likelihood fit, as scipy.stats.norm.fit
    if sigma == 0.0:
        return mu
    return float(statistics.NormalDist(mu, sigma).inv_cdf(float(frr)))


def run_strip(model, variables, x_clean, x_triggered, x_pool, *, n_overlay: int = 100, frr: float = 0.01,
              rule: str = "normal", blend: str = "add", x_calib=None, batch_size: int | None = None,
              seed: int = 0) -> StripResult:
    """STRIP end to end: entropies of clean and triggered inputs, threshold at `frr`, FRR / FAR / AUC.

    The threshold is set on `x_calib` when given, else on `x_clean` (as the official notebook does).
    `x_pool` holds the clean held-out images used as overlays; keep it disjoint from the inputs."""
    strip_threshold([0.0, 1.0], frr, rule)  # validate frr and rule before spending any compute
    common = dict(n_overlay=n_overlay, blend=blend, batch_size=batch_size)
    # distinct seeds per set, so the overlay draws of two sets are independent
    e_clean = strip_entropy(model, variables, x_clean, x_pool, seed=seed, **common)
    e_trig = strip_entropy(model, variables, x_triggered, x_pool, seed=seed + 1, **common)
    e_cal = e_clean if x_calib is None else strip_entropy(model, variables, x_calib, x_pool, seed=seed + 2, **common)
    thr = strip_threshold(e_cal, frr, rule)
    labels = np.r_[np.zeros(len(e_clean), bool), np.ones(len(e_trig), bool)]
    return StripResult(
        threshold=thr,
        frr=float(np.mean(e_clean < thr)) if len(e_clean) else float("nan"),
        far=float(np.mean(e_trig >= thr)) if len(e_trig) else None,
        auc=roc_auc(-np.r_[e_clean, e_trig], labels),
        calib_frr=float(np.mean(e_cal < thr)),
        target_frr=float(frr), rule=rule, blend=blend, n_overlay=int(n_overlay),
        clean_entropy=e_clean, triggered_entropy=e_trig, calib_entropy=e_cal,
    )
