"""Spectral Signatures (Tran, Li, Madry, NeurIPS 2018): remove poisons by their outlier score along the top
singular direction of each class's centred representations, then retrain from scratch.

    feats = extract_features(model, variables, poisoned.x, "penultimate")
    res = spectral_filter(feats, poisoned.y, eps=0.1, poison_mask=poisoned.mask)
    state, after = retrain(model, cfg.train, poisoned.x, poisoned.y, res.keep, ...)

Scoring (Algorithm 1 of the paper / seeds/003): for each label y, M = [R(x_i) - mean]_i, v = top right singular
vector of M, tau_i = ((R(x_i) - mean) . v)^2. All classes are scored in ONE compiled call: the classes are padded
into a (K, n_max, D) array with a (K, n_max) validity mask and the randomized SVD is vmapped over K.
`centered=False` reproduces the official code's quirk (v from the centred matrix, but the score projects the
uncentred R(x_i)).

Removal:
- mode="eps" (the paper): from each analysed class remove the ceil(1.5 * eps_c) highest scores, where eps_c is the
  poison budget of that class. `eps` is read by type: a float in (0, 1) is a FRACTION OF EACH CLASS
  (eps_c = eps * n_c, n_c = the class's size including any poisons; the paper's 5% / 10% are fractions of the
  target class), an int >= 1 is a COUNT per class (Algorithm 1 literally: eps_c = eps).
- mode="percentile" (the official code): remove every score above the `percentile`-th (85) percentile of its class.
- labels=[t] analyses only the given labels (the official code analyses only the target label).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.defenses.metrics import filter_metrics, roc_auc
from bdjax.errors import ConfigError

MODES = ("eps", "percentile")
METHODS = ("randomized", "exact")
PAD_MULTIPLE = 64  # class sizes are padded up to a multiple of this, so nearby dataset sizes share one compile
_HI = jax.lax.Precision.HIGHEST  # full float32 matmuls on GPU/TPU too (no TF32/bf16 passes)

# Incremented each time the batched scorer is traced (i.e. compiled for a new shape); the tests read it.
TRACE_COUNT = 0


# ----------------------------------------------------------------------------------------------------------------
# Randomized SVD
#
# Hand-written rather than numpy/scipy/sklearn (randomized_svd): those run on the host only, one matrix at a time,
# and an exact SVD of a 5000 x 4096 matrix costs O(n d^2) when Algorithm 1 needs one singular vector. This version
# is pure jax.numpy, so it jits, vmaps over classes (one compiled call for every label) and runs on any backend;
# padded rows are handled by zeroing them, which leaves every product below unchanged.
#
# Orthonormalisation goes through the small (l x l) Gram matrix (eigh, twice, like CholeskyQR2) instead of
# jnp.linalg.qr: on XLA:CPU (jax 0.10) returning the Q factor of a 5000 x 11 matrix costs ~100 ms (a layout copy
# around the LAPACK call) against ~1 ms for the Gram route, and batched QR is slower still; eigh also copes with
# rank-deficient blocks (tiny classes, dead ReLU units) by zeroing the directions it cannot resolve. Products
# are written so that XLA:CPU picks its fast GEMM layouts (A^T Q is computed as (Q^T A), stored as rows).
# ----------------------------------------------------------------------------------------------------------------

_RANK_TOL = 1e-6  # eigenvalues of the Gram matrix below this fraction of the largest are treated as zero


def _orth_scale(gram: jax.Array) -> jax.Array:
    """(l, l) matrix S such that Y S has orthonormal columns when gram = Y^T Y (zero columns where rank-deficient)."""
    lam, vec = jnp.linalg.eigh(gram)
    keep = lam > _RANK_TOL * jnp.maximum(lam[-1], 0.0)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return vec * scale[None, :]


def _orth_cols(y: jax.Array) -> jax.Array:
    """Orthonormal basis of the columns of y (n, l), as (n, l)."""
    for _ in range(2):  # the second pass restores orthogonality lost to float32 rounding in the first
        y = jnp.einsum("nl,lm->nm", y, _orth_scale(jnp.einsum("nl,nm->lm", y, y, precision=_HI)), precision=_HI)
    return y


def _orth_rows(z: jax.Array) -> jax.Array:
    """Orthonormal basis of the rows of z (l, d), as (l, d)."""
    for _ in range(2):
        z = jnp.einsum("lm,ld->md", _orth_scale(jnp.einsum("ld,md->lm", z, z, precision=_HI)), z, precision=_HI)
    return z


def _top_singular(A: jax.Array, key: jax.Array, oversample: int = 10, n_iter: int = 4):
    """(v, sigma): the top right singular vector (unit norm, sign arbitrary) and singular value of A (n, D).

    Halko, Martinsson, Tropp (2011), Algorithms 4.4 + 5.1 with k = 1: a Gaussian test matrix with 1 + oversample
    columns, `n_iter` power iterations re-orthonormalised after every product (stable in float32), then the SVD
    of the small projected matrix B = Q^T A (l x D), taken through its l x l Gram matrix B B^T. The error shrinks
    like (sigma_{l+1} / sigma_1)^(2 n_iter + 1): exact to float precision when a poison direction stands out
    (r = 1 - 1e-12 on the digits BadNets features), approximate when sigma_1 barely leaves the noise bulk (r ~ 0.998
    in scripts/bench_spectral.py --shift 8); raise n_iter there.
    """
    n, d = A.shape
    width = max(1, min(1 + int(oversample), n, d))
    omega = jax.random.normal(key, (width, d), A.dtype)  # the test matrix, stored as rows
    q = _orth_cols(jnp.einsum("nd,ld->nl", A, omega, precision=_HI))  # range finder: Q (n, l)

    def power(_, q):
        w = _orth_rows(jnp.einsum("nl,nd->ld", q, A, precision=_HI))  # (A^T Q)^T, (l, D)
        return _orth_cols(jnp.einsum("nd,ld->nl", A, w, precision=_HI))  # A W, (n, l)

    q = jax.lax.fori_loop(0, int(n_iter), power, q)
    b = jnp.einsum("nl,nd->ld", q, A, precision=_HI)  # B = Q^T A, (l, D)
    lam, u = jnp.linalg.eigh(jnp.einsum("ld,md->lm", b, b, precision=_HI))  # B B^T = U S^2 U^T
    v = jnp.einsum("l,ld->d", u[:, -1], b, precision=_HI)  # B^T u_1 = sigma_1 v_1
    norm = jnp.linalg.norm(v)
    return v / jnp.maximum(norm, jnp.finfo(A.dtype).tiny), norm


def randomized_top_singular_vector(A, key, oversample: int = 10, n_iter: int = 4) -> jax.Array:
    """Top right singular vector (D,) of A (n, D), unit norm, sign arbitrary. Jittable and vmappable
    (oversample and n_iter must be static); rows of zeros (padding) do not change the result."""
    return _top_singular(jnp.asarray(A), key, oversample, n_iter)[0]


@functools.partial(jax.jit, static_argnames=("oversample", "n_iter"))
def score_padded(reps: jax.Array, mask: jax.Array, key: jax.Array, centered=True,
                 oversample: int = 10, n_iter: int = 4):
    """Scores of every class in one call. reps (K, n_max, D) float, mask (K, n_max) bool; `centered` is traced (a
    Python or array bool), so both variants share one compiled function.

    Returns (scores (K, n_max) with 0 at padded slots, v (K, D), sigma (K,)).
    """
    global TRACE_COUNT
    TRACE_COUNT += 1  # Python side effect: runs at trace time only
    m = mask.astype(reps.dtype)  # (K, n_max)
    count = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)  # (K, 1)
    # The masked mean as a matrix product: XLA:CPU lowers jnp.sum(reps * m, axis=1) to a column reduction that
    # is ~10^4 times slower (100 s vs 5 ms at 5000 x 4096).
    mean = jnp.einsum("kn,knd->kd", m, reps, precision=_HI) / count  # (K, D), padded rows excluded
    centred = (reps - mean[:, None, :]) * m[..., None]  # padded rows are exactly zero
    keys = jax.random.split(key, reps.shape[0])
    top = functools.partial(_top_singular, oversample=oversample, n_iter=n_iter)
    v, sigma = jax.vmap(top)(centred, keys)
    proj = jnp.einsum("knd,kd->kn", centred, v, precision=_HI)
    # The official code projects the uncentred R: R_i . v = (R_i - mean) . v + mean . v, an offset per class.
    offset = jnp.where(jnp.asarray(centered), 0.0, jnp.einsum("kd,kd->k", mean, v, precision=_HI))
    proj = proj + offset[:, None]
    return jnp.where(mask, proj * proj, 0.0), v, sigma


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers: validation, padding, removal
# ----------------------------------------------------------------------------------------------------------------

def _check_reps(reps, y) -> tuple[np.ndarray, np.ndarray]:
    reps = np.asarray(reps)
    y = np.asarray(y)
    if reps.ndim != 2 or not np.issubdtype(reps.dtype, np.number):
        raise ConfigError(f"representations must be a numeric (N, D) array, got {reps.dtype} {reps.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != len(reps):
        raise ConfigError(f"{len(reps)} representations but {len(y)} labels")
    if not np.isfinite(reps).all():
        raise ConfigError("representations contain NaN or infinite values")
    return reps.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _check_labels(labels, y: np.ndarray) -> tuple[int, ...]:
    present = [int(c) for c in np.unique(y)]
    if labels is None:
        return tuple(present)
    if isinstance(labels, (int, np.integer)):
        labels = [labels]
    out = []
    for c in labels:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ConfigError(f"labels must be integers, got {c!r}")
        if int(c) not in present:
            raise ConfigError(f"label {int(c)} has no samples; labels present: {present}")
        if int(c) not in out:
            out.append(int(c))
    if not out:
        raise ConfigError("labels is empty: give at least one label to analyse, or None for all")
    return tuple(out)


def _check_options(mode, eps, percentile, method, oversample, n_iter) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if mode == "eps":
        _eps_kind(eps)
    elif not (isinstance(percentile, (int, float, np.number)) and 0 < percentile < 100):
        raise ConfigError(f"percentile must be a number in (0, 100), got {percentile!r}")
    for name, value in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def _eps_kind(eps) -> str:
    if eps is None:
        raise ConfigError("mode='eps' needs eps: a fraction of each class in (0, 1), or a per-class count >= 1")
    if isinstance(eps, bool):
        raise ConfigError(f"eps must be a fraction in (0, 1) or an integer count >= 1, got {eps!r}")
    if isinstance(eps, (int, np.integer)):
        if eps < 1:
            raise ConfigError(f"eps as an integer is a per-class poison count and must be >= 1, got {eps}")
        return "count"
    if isinstance(eps, (float, np.floating)):
        if not 0 < eps < 1:
            raise ConfigError(f"eps as a float is a fraction of each class and must be in (0, 1), got {eps!r} "
                              "(pass an int for a per-class count)")
        return "fraction"
    raise ConfigError(f"eps must be a fraction in (0, 1) or an integer count >= 1, got {eps!r}")


def removal_count(eps, n_class: int) -> int:
    """ceil(1.5 * eps_c): eps a fraction of the class (eps_c = eps * n_class) or an int count (eps_c = eps)."""
    budget = eps * n_class if _eps_kind(eps) == "fraction" else eps
    return int(math.ceil(1.5 * budget - 1e-9))  # the tolerance keeps 1.5 * 0.1 * 5500 = 825, not 826


def pad_by_class(reps: np.ndarray, y: np.ndarray, labels: Sequence[int], multiple: int = PAD_MULTIPLE):
    """(padded (K, n_max, D) float32, mask (K, n_max) bool, index (K, n_max) int64 with -1 at padding);
    n_max is the largest class rounded up to `multiple`."""
    members = [np.flatnonzero(y == c) for c in labels]
    n_max = max(len(m) for m in members)
    n_max = -(-n_max // multiple) * multiple
    padded = np.zeros((len(labels), n_max, reps.shape[1]), np.float32)
    index = np.full((len(labels), n_max), -1, np.int64)
    for k, m in enumerate(members):
        padded[k, :len(m)] = reps[m]
        index[k, :len(m)] = m
    return padded, index >= 0, index


def _exact_class_scores(r: np.ndarray, centered: bool) -> tuple[np.ndarray, float]:
    r = r.astype(np.float64)
    m = r - r.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    proj = (m if centered else r) @ vt[0]
    return proj * proj, float(s[0])


@dataclasses.dataclass(frozen=True)
class SpectralConfig:
    """Spectral Signatures' settings, as spectral_filter's keyword arguments (bdjax.pipelines.defend)."""

    # assumed poison budget, a fraction of each class (the paper's eps); None: the attack's true one (the
    # paper's experiments), capped below a whole class by the pipeline. 1.5 * eps of every class is removed
    eps: float | None = None
    mode: str = "eps"  # eps: remove the top ceil(1.5 eps n_c) of each class (paper) | percentile (official code)
    percentile: float = 85.0  # mode=percentile: remove the scores above this percentile of each class
    centered: bool = True  # subtract each class's mean representation before the SVD
    method: str = "randomized"  # randomized: on-device randomized SVD | exact: numpy SVD
    oversample: int = 10  # randomized SVD: extra dimensions of the sketch
    n_iter: int = 4  # randomized SVD: power iterations

    def validate(self) -> "SpectralConfig":
        _check_options(self.mode, 0.1 if self.eps is None else self.eps, self.percentile, self.method,
                       self.oversample, self.n_iter)
        return self

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SpectralResult:
    """Outcome of a spectral filter over N samples."""

    scores: np.ndarray  # (N,) float32 outlier scores tau; NaN for samples of labels that were not analysed
    removed: np.ndarray  # (N,) bool
    labels: tuple[int, ...]  # the analysed labels
    per_class: list[dict]  # label, n, n_removed, n_poison (when known), sigma (top singular value), threshold
    mode: str
    eps: float | int | None
    percentile: float
    centered: bool
    method: str
    y: np.ndarray = dataclasses.field(default=None, repr=False)  # (N,) the labels the filter was run on
    metrics: dict | None = None  # filter_metrics(removed, poison_mask, scores) when a poison mask was given

    @property
    def keep(self) -> np.ndarray:
        return ~self.removed

    def evaluate(self, poison_mask) -> dict:
        """filter_metrics against the true poison mask (auc over the analysed samples); also stored in .metrics."""
        poison_mask = np.asarray(poison_mask, bool)
        if poison_mask.shape != self.removed.shape:
            raise ConfigError(f"poison_mask has shape {poison_mask.shape}, expected {self.removed.shape}")
        analysed = np.isfinite(self.scores)
        m = filter_metrics(self.removed, poison_mask)
        m["auc"] = roc_auc(self.scores[analysed], poison_mask[analysed])
        for row in self.per_class:
            members = np.flatnonzero(self.y == row["label"])
            row["n_poison"] = int(poison_mask[members].sum())
            row["poison_removed"] = int((poison_mask & self.removed)[members].sum())
        self.metrics = m
        return m

    def summary(self) -> dict:
        """A JSON-ready digest (no per-sample arrays)."""
        return {"mode": self.mode, "eps": self.eps, "percentile": self.percentile if self.mode == "percentile" else None,
                "centered": self.centered, "method": self.method, "labels": list(self.labels),
                "n_removed": int(self.removed.sum()), "per_class": self.per_class, **(self.metrics or {})}


def spectral_scores(reps, y, *, labels: Sequence[int] | None = None, centered: bool = True,
                    method: str = "randomized", seed: int = 0, oversample: int = 10, n_iter: int = 4):
    """(scores (N,) float32 with NaN outside `labels`, sigma {label: top singular value}).

    method="randomized": every analysed class in one compiled call (`score_padded`); "exact": numpy's full SVD
    in float64, one class at a time (the reference).
    """
    reps, y = _check_reps(reps, y)
    labels = _check_labels(labels, y)
    _check_options("percentile", None, 50, method, oversample, n_iter)
    scores = np.full(len(y), np.nan, np.float32)
    sigma: dict[int, float] = {}
    if method == "exact":
        for c in labels:
            members = np.flatnonzero(y == c)
            s, sigma[c] = _exact_class_scores(reps[members], centered)
            scores[members] = s
        return scores, sigma
    padded, mask, index = pad_by_class(reps, y, labels)
    out, _, sig = score_padded(padded, mask, jax.random.key(seed), centered=bool(centered),
                               oversample=int(oversample), n_iter=int(n_iter))
    out, sig = np.asarray(out), np.asarray(sig)
    scores[index[mask]] = out[mask]
    return scores, {c: float(sig[k]) for k, c in enumerate(labels)}


def _check_eps_fits(eps, label: int, n: int) -> int:
    k = removal_count(eps, n)
    if k >= n:
        budget = f"a fraction eps={eps} of the class" if _eps_kind(eps) == "fraction" else f"eps={eps} samples"
        raise ConfigError(f"eps is too large for label {label}: removing 1.5 x {budget} = {k} samples would leave "
                          f"nothing of its {n}; expected eps well below the class size")
    return k


def select_removed(scores: np.ndarray, y: np.ndarray, labels: Sequence[int], *, mode: str = "eps", eps=None,
                   percentile: float = 85.0) -> tuple[np.ndarray, list[dict]]:
    """The removal rule applied class by class: (removed (N,) bool, per-class rows)."""
    _check_options(mode, eps, percentile, "randomized", 0, 0)
    removed = np.zeros(len(y), bool)
    rows = []
    for c in labels:
        members = np.flatnonzero(y == c)
        s = scores[members]
        if mode == "eps":
            k = _check_eps_fits(eps, c, len(members))
            top = members[np.argsort(-s, kind="stable")[:k]]
            threshold = float(scores[top].min()) if k else None
        else:
            threshold = float(np.percentile(s, percentile))
            top = members[s > threshold]
        removed[top] = True
        rows.append({"label": int(c), "n": int(len(members)), "n_removed": int(len(top)), "threshold": threshold})
    return removed, rows


def spectral_filter(reps, y, *, eps=None, mode: str = "eps", percentile: float = 85.0,
                    labels: Sequence[int] | None = None, centered: bool = True, method: str = "randomized",
                    seed: int = 0, oversample: int = 10, n_iter: int = 4, poison_mask=None) -> SpectralResult:
    """Score every analysed class (one compiled call) and apply the removal rule; see the module docstring."""
    reps, y = _check_reps(reps, y)
    labels = _check_labels(labels, y)
    _check_options(mode, eps, percentile, method, oversample, n_iter)
    if mode == "eps":  # fail on an impossible eps before any compute
        for c in labels:
            _check_eps_fits(eps, c, int((y == c).sum()))
    scores, sigma = spectral_scores(reps, y, labels=labels, centered=centered, method=method, seed=seed,
                                    oversample=oversample, n_iter=n_iter)
    removed, rows = select_removed(scores, y, labels, mode=mode, eps=eps, percentile=percentile)
    for row in rows:
        row["sigma"] = sigma[row["label"]]
    result = SpectralResult(scores, removed, labels, rows, mode, eps, float(percentile), bool(centered), method, y)
    if poison_mask is not None:
        result.evaluate(poison_mask)
    return result


def spectral_defense(model, variables, x_uint8, y, *, layer: str = "penultimate", batch_size: int = 500,
                     **filter_kwargs) -> SpectralResult:
    """extract_features + spectral_filter in one call (keyword arguments as spectral_filter)."""
    from bdjax.defenses.features import extract_features

    reps = extract_features(model, variables, x_uint8, layer, batch_size=batch_size)
    return spectral_filter(reps, y, **filter_kwargs)


def retrain(model, train_cfg, x_uint8, y, keep, *, num_classes: int, x_test, y_test, x_asr=None, y_asr=None,
            seed: int = 0, run=None, desc: str = "retrain"):
    """Train `model` from scratch on the kept samples (bdjax.train.fit; resumes from `run`'s checkpoints) and
    evaluate it: returns (state, {"clean_acc", "asr", "per_class_acc", "n_train"})."""
    from bdjax.train import evaluate, fit

    keep = np.asarray(keep, bool)
    if keep.shape != (len(x_uint8),):
        raise ConfigError(f"keep mask has shape {keep.shape}, expected ({len(x_uint8)},)")
    if keep.sum() < train_cfg.batch_size:
        raise ConfigError(f"only {int(keep.sum())} samples are left after filtering, fewer than "
                          f"train.batch_size={train_cfg.batch_size}")
    state = fit(model, train_cfg, np.asarray(x_uint8)[keep], np.asarray(y)[keep], seed=seed, run=run, desc=desc)
    result = evaluate(model, state.variables, x_test, y_test, num_classes, x_asr, y_asr, train_cfg.eval_batch_size)
    result.setdefault("asr", None)
    result["n_train"] = int(keep.sum())
    return state, result
