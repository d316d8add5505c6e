"""Universal Litmus Patterns (Kolouri, Saha, Pirsiavash, Hoffmann, CVPR 2020; UMBCvision/Universal-Litmus-Patterns).

Learn M input patterns z_1..z_M and a linear classifier h such that h(g(f(z_1), ..., f(z_M))) tells a poisoned
model f from a clean one, over a zoo of labelled models:

    argmin_{z, h}  sum_n CE(h(g({f_n(z_m)}_m)), c_n) + lambda * sum_m TV(z_m)

g concatenates the M logit vectors ("concat", the CIFAR-10 / MNIST / GTSRB code) or averages them ("avg", the
Tiny-ImageNet variant). As the reference: patterns start uniform over the input range and follow plain SGD
with a very large learning rate, one step per batch of models on the mean gradient; h follows Adam (1e-3) with
one step per model (the reference loops over models one at a time), each model's loss taken with h before its
own step; patterns are clipped to the input range after each step; the epoch with the best validation
accuracy is kept. `classifier_steps="per_batch"` makes h take one step per batch instead.

Units: bdjax models take inputs in [0, 1], the reference feeds 0..255. SGD on z/255 with lr' = lr / 255**2 is the
same trajectory as SGD on z with lr, so `pattern_lr` defaults to 1e3 / 255**2. TV is the anisotropic L1 total
variation; TV(z) = 255 TV(z/255), so `tv_weight` defaults to 1e-6 * 255.

All models of a batch go through one compiled step (bdjax.zoo.population.over_models, vmap by default, see
`ulp_mode`): the forward pass of the batch's models runs at once, with the model axis sharded over the devices,
the per-model classifier steps run as a scan over the (small) logit features, and one backward pass through
all models gives the pattern gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from bdjax import triggers
from bdjax.defenses.metrics import roc_auc
from bdjax.errors import ConfigError
from bdjax.zoo import population as pop
from bdjax.zoo.plan import CORNERS
from bdjax.plots import save_patterns, save_roc  # noqa: F401  (re-exported: the figures live with the others)

POOLINGS = ("concat", "avg")
FEATURES = ("logits", "log_softmax")
CLASSIFIER_STEPS = ("per_model", "per_batch")
INITS = ("uniform", "stamped")


@dataclasses.dataclass(frozen=True)
class ULPConfig:
    n_patterns: int = 10  # M, the number of litmus patterns
    pooling: str = "concat"  # concat | avg
    features: str = "logits"  # logits (the reference) | log_softmax (each pattern's logits minus their logsumexp)
    epochs: int = 1000  # passes over the train zoo; the epoch with the best validation accuracy is kept
    batch_models: int = 50  # models per step
    pattern_lr: float = 1e3 / 255**2  # SGD on the patterns (the reference's 1e3 on 0..255 inputs)
    classifier_lr: float = 1e-3  # Adam on the linear classifier h
    classifier_steps: str = "per_model"  # per_model (the reference: one Adam step per model) | per_batch
    tv_weight: float = 1e-6 * 255  # weight of the patterns' total variation (the reference's 1e-6 on 0..255)
    mode: str = "auto"  # auto | vmap | map
    # uniform (the reference) | stamped: clean images, one per class in turn, with the train pool's triggers in all 4
    # corners (bdjax.pipelines.ulp builds them); on the CIFAR-10 small zoo uniform starts overfit the 10 seen masks
    init: str = "uniform"
    seed: int = 0  # initial patterns, classifier and model order

    def validate(self) -> "ULPConfig":
        checks = [(self.n_patterns >= 1, "n_patterns", ">= 1"), (self.pooling in POOLINGS, "pooling", "concat or avg"),
                  (self.features in FEATURES, "features", "logits or log_softmax"),
                  (self.epochs >= 1, "epochs", ">= 1"), (self.batch_models >= 1, "batch_models", ">= 1"),
                  (self.pattern_lr > 0, "pattern_lr", "> 0"), (self.classifier_lr > 0, "classifier_lr", "> 0"),
                  (self.classifier_steps in CLASSIFIER_STEPS, "classifier_steps", "per_model or per_batch"),
                  (self.tv_weight >= 0, "tv_weight", ">= 0"), (self.mode in ("auto",) + pop.MODES, "mode", "auto, vmap or map"),
                  (self.init in INITS, "init", "uniform or stamped")]
        for ok, field, expected in checks:
            if not ok:
                raise ConfigError(f"ulp {field} must be {expected}, got {getattr(self, field)!r}")
        return self


def stamped_images(images: np.ndarray, labels: np.ndarray, num_classes: int, trigger_list: list, n: int) -> np.ndarray:
    """n clean images with a trigger in all 4 corners, in [0, 1] (the starts of ulp.init=stamped): image m is the
    (m // K)-th uint8 image of class m % K (K classes), stamped with trigger_list[(m % K + m // K) % len]."""
    out = []
    for m in range(n):
        c, k = m % num_classes, m // num_classes
        x = jnp.asarray(images[np.flatnonzero(labels == c)[k]], jnp.float32) / 255.0
        trigger = trigger_list[(c + k) % len(trigger_list)]
        for corner in CORNERS:
            x = triggers.apply(x, trigger, *triggers.corner_position(x.shape, trigger, corner))
        out.append(np.asarray(x))
    return np.stack(out)


def total_variation(z: jax.Array) -> jax.Array:
    """Anisotropic L1 total variation of (M, H, W, C) patterns, summed."""
    return jnp.abs(jnp.diff(z, axis=1)).sum() + jnp.abs(jnp.diff(z, axis=2)).sum()


def pool_logits(logits: jax.Array, pooling: str, features: str = "logits") -> jax.Array:
    """(models, M, K) -> (models, M*K) for concat, (models, K) for avg.

    features="log_softmax" first subtracts each pattern's logsumexp. Independently trained models put their
    logits at arbitrary offsets that carry no class information (softmax ignores them), and a linear h over so
    few models cannot learn to ignore them: on the small MNIST zoo, fixed litmus images (digits with triggers in the
    corners) + logistic regression give test AUC 0.65 on raw logits and 1.00 on log-softmax
    (scripts/ulp_feature_probe.py)."""
    if features == "log_softmax":
        logits = jax.nn.log_softmax(logits, axis=-1)
    return logits.reshape(logits.shape[0], -1) if pooling == "concat" else logits.mean(axis=1)


@dataclasses.dataclass
class ULPResult:
    patterns: np.ndarray  # (M, H, W, C) in [0, 1]
    classifier: dict  # {"kernel": (D, 2), "bias": (2,)}
    best_epoch: int
    val_acc: float
    history: list  # per epoch: train loss, train acc, val acc
    config: ULPConfig
    wall_s: float

    def summary(self) -> dict:
        return {"M": self.config.n_patterns, "pooling": self.config.pooling, "features": self.config.features,
                "init": self.config.init,
                "best_epoch": self.best_epoch,
                "val_acc": self.val_acc, "epochs": self.config.epochs, "ulp_wall_s": self.wall_s}


def _check_zoo(name, variables, labels) -> np.ndarray:
    labels = np.asarray(labels)
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(variables)}
    if sizes != {len(labels)}:
        raise ConfigError(f"ulp {name} zoo: {len(labels)} labels for models stacked {sorted(sizes)}")
    if not np.isin(labels, (0, 1)).all():
        raise ConfigError(f"ulp {name} zoo labels must be 0 (clean) or 1 (poisoned)")
    return labels.astype(np.int32)


def ulp_mode(mode: str) -> str:
    """auto -> vmap on every backend. Unlike zoo training (bdjax.zoo.population picks an unrolled map on CPU),
    a litmus step pushes only M images through each model; there the vmapped program was faster on CPU too
    (50 MNIST nets, M = 10: 0.63 vs 2.15 s per epoch) and compiles in seconds instead of a minute."""
    return "vmap" if mode == "auto" else pop.check_mode(mode)


def _zoo_logits(model, mode: str, mesh):
    """(stacked models, images) -> (models, images, classes) logits; with a mesh, each device runs its slice of
    the model batch and the logits come back whole."""
    logits_of = pop.over_models(lambda v, z: model.apply(v, z, train=False), ulp_mode(mode), 1)
    if mesh is None:
        return logits_of
    return jax.shard_map(logits_of, mesh=mesh, in_specs=(P(pop.AXIS), P()), out_specs=P(pop.AXIS))


def _head(h, f):
    return f @ h["kernel"] + h["bias"]


class ULPState(NamedTuple):
    patterns: jax.Array  # (M, H, W, C) in [0, 1]
    classifier: dict  # h: {"kernel", "bias"}
    opt_patterns: Any  # SGD state
    opt_classifier: Any  # Adam state


class ULPOptimizer(NamedTuple):
    """init(key, image_shape, num_classes, init_patterns=None) -> ULPState; update(state, variables, y, valid) ->
    (state, metrics) for one batch of stacked models (pure: jit it, scan it, or drive it from the host);
    scores(patterns, classifier, variables) -> P(poisoned) per model."""
    init: Any
    update: Any
    scores: Any


def ulp_optimizer(model, cfg: ULPConfig, mesh=None) -> ULPOptimizer:
    """ULP's (init, update) pair for one model architecture and config (the model axis sharded over `mesh`)."""
    logits_of = _zoo_logits(model, cfg.mode, mesh)
    tx_z = optax.sgd(cfg.pattern_lr)
    tx_h = optax.adam(cfg.classifier_lr)

    def features(variables, z):
        return pool_logits(logits_of(variables, z), cfg.pooling, cfg.features)

    def model_loss(h, f, y):
        out = _head(h, f)
        return optax.softmax_cross_entropy_with_integer_labels(out, y), jnp.argmax(out, -1) == y

    def classifier_per_model(h, opt_h, f, y, valid):
        """The reference's classifier schedule: one Adam step per model, in batch order, each model's loss
        taken with h before its own step. Returns the updated h and every model's d loss / d features."""
        def one(carry, inputs):
            h, opt_h = carry
            f_n, y_n, valid_n = inputs
            (loss, correct), (g_h, g_f) = jax.value_and_grad(model_loss, argnums=(0, 1), has_aux=True)(h, f_n, y_n)
            u, new_opt = tx_h.update(g_h, opt_h, h)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(valid_n, a, b), new, old)
            carry = keep((optax.apply_updates(h, u), new_opt), (h, opt_h))
            return carry, (jnp.where(valid_n, loss, 0.0), jnp.where(valid_n, g_f, 0.0), correct & valid_n)
        (h, opt_h), (losses, g_f, correct) = jax.lax.scan(one, (h, opt_h), (f, y, valid))
        return h, opt_h, losses, g_f, correct

    def classifier_per_batch(h, opt_h, f, y, valid):
        """One Adam step on the batch mean: fewer, smoother classifier steps."""
        def total(h, f):
            losses, correct = jax.vmap(model_loss, (None, 0, 0))(h, f, y)
            losses = jnp.where(valid, losses, 0.0)
            return losses.sum(), (losses, correct & valid)

        (_, (losses, correct)), (g_h, g_f) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(h, f)
        n = jnp.maximum(valid.sum(), 1)
        u, opt_h = tx_h.update(jax.tree.map(lambda g: g / n, g_h), opt_h, h)
        return optax.apply_updates(h, u), opt_h, losses, g_f, correct

    update_classifier = classifier_per_model if cfg.classifier_steps == "per_model" else classifier_per_batch

    def init(key, image_shape, num_classes: int, init_patterns=None) -> ULPState:
        """Patterns uniform in [0, 1] (or init_patterns), h with PyTorch nn.Linear's default init (the reference's)."""
        key_z, key_h = jax.random.split(key)
        z = jax.random.uniform(key_z, (cfg.n_patterns, *image_shape)) if init_patterns is None else init_patterns
        d = cfg.n_patterns * num_classes if cfg.pooling == "concat" else num_classes
        lim = 1.0 / np.sqrt(d)
        kh, kb = jax.random.split(key_h)
        h = {"kernel": jax.random.uniform(kh, (d, 2), minval=-lim, maxval=lim),
             "bias": jax.random.uniform(kb, (2,), minval=-lim, maxval=lim)}
        return ULPState(z, h, tx_z.init(z), tx_h.init(h))

    def update(st: ULPState, variables, y, valid) -> tuple[ULPState, dict]:
        """One batch of models: the classifier's steps, then one pattern step on the batch's mean gradient."""
        n = jnp.maximum(valid.sum(), 1)
        f, pull_back = jax.vjp(lambda z: features(variables, z), st.patterns)
        h, opt_h, losses, g_f, correct = update_classifier(st.classifier, st.opt_classifier, f, y, valid)
        # patterns: the mean over the batch's models of d loss_n / d z, plus the TV regulariser
        (g_z,) = pull_back(g_f / n)
        g_z = g_z + cfg.tv_weight * jax.grad(total_variation)(st.patterns)
        uz, oz = tx_z.update(g_z, st.opt_patterns, st.patterns)
        z = jnp.clip(optax.apply_updates(st.patterns, uz), 0.0, 1.0)
        return ULPState(z, h, oz, opt_h), {"loss": losses.sum() / n, "correct": correct.sum()}

    def scores(patterns, classifier, variables):
        return jax.nn.softmax(_head(classifier, features(variables, patterns)), -1)[:, 1]

    return ULPOptimizer(init, update, scores)


@functools.lru_cache(maxsize=8)
def _compiled(model, cfg: ULPConfig, mesh):
    """(init, update, scores) jitted; update donates the state."""
    opt = ulp_optimizer(model, cfg, mesh)
    return jax.jit(opt.init, static_argnums=(1, 2)), jax.jit(opt.update, donate_argnums=(0,)), jax.jit(opt.scores)


def _batches(n: int, batch: int, rng=None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch):
        idx = order[i:i + batch]
        yield idx, batch - len(idx)


def _take(variables, idx, pad):
    """Stacked models idx (padded by repeating the first) as a batch of fixed size."""
    sel = np.r_[idx, np.full(pad, idx[0])] if pad else idx
    return jax.tree.map(lambda a: a[sel], variables)


def ulp_scores(model, result: "ULPResult", variables, *, batch_models: int | None = None) -> np.ndarray:
    """P(poisoned) for every model of a stacked zoo."""
    cfg = result.config
    B = batch_models or cfg.batch_models
    mesh = pop.model_mesh(B)
    _, _, scores = _compiled(model, cfg, mesh)
    patterns, classifier = jnp.asarray(result.patterns), jax.tree.map(jnp.asarray, result.classifier)
    return _over_zoo(lambda v: scores(patterns, classifier, v), variables, B, mesh)


def train_ulp(model, train_vars, train_labels, val_vars, val_labels, image_shape, num_classes: int,
              cfg: ULPConfig = ULPConfig(), *, init_patterns=None, progress: bool = False) -> ULPResult:
    """Meta-train litmus patterns and the classifier on a train zoo; keep the best epoch on the val zoo.
    init_patterns: (M, H, W, C) starting patterns in [0, 1]; default uniform noise, as the reference."""
    cfg.validate()
    y_tr = _check_zoo("train", train_vars, train_labels)
    y_val = _check_zoo("val", val_vars, val_labels)
    B = min(cfg.batch_models, len(y_tr))
    cfg = dataclasses.replace(cfg, batch_models=B)
    mesh = pop.model_mesh(B)
    init, update, scores = _compiled(model, cfg, mesh)
    if init_patterns is not None:
        init_patterns = np.asarray(init_patterns, np.float32)
        shape = (cfg.n_patterns, *image_shape)
        if init_patterns.shape != shape or init_patterns.min() < 0 or init_patterns.max() > 1:
            raise ConfigError(f"ulp init_patterns must be {shape} with values in [0, 1], got {init_patterns.shape} "
                              f"in [{init_patterns.min():.3g}, {init_patterns.max():.3g}]")
    state = init(jax.random.key(cfg.seed), tuple(image_shape), num_classes, init_patterns)
    rng = np.random.default_rng(cfg.seed)
    snapshot = lambda st: (np.asarray(st.patterns), jax.device_get(st.classifier))
    best = (-1.0, 0, snapshot(state))
    history = []
    t0 = time.time()
    bar = None
    if progress:
        from bdjax.train.loop import progress_enabled

        if progress_enabled():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc=f"ULP M={cfg.n_patterns}", unit="epoch", mininterval=2.0)
    for epoch in range(cfg.epochs):
        losses, correct = [], 0
        for idx, pad in _batches(len(y_tr), B, rng):
            v = pop.place(_take(train_vars, idx, pad), mesh, per_model=True)
            y = np.r_[y_tr[idx], np.zeros(pad, np.int32)]
            valid = np.r_[np.ones(len(idx), bool), np.zeros(pad, bool)]
            state, m = update(state, v, *pop.place((y, valid), mesh, per_model=True))
            losses.append(float(m["loss"]))
            correct += int(m["correct"])
        p_val = _over_zoo(lambda v: scores(state.patterns, state.classifier, v), val_vars, B, mesh)
        val_acc = float(np.mean((p_val > 0.5) == y_val))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_acc": correct / len(y_tr),
                        "val_acc": val_acc})
        if val_acc > best[0]:
            best = (val_acc, epoch + 1, snapshot(state))
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", val=f"{val_acc:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    z_best, h_best = best[2]
    return ULPResult(np.asarray(z_best), jax.tree.map(np.asarray, h_best), best[1], best[0], history, cfg,
                     time.time() - t0)


def _over_zoo(fn, variables, B, mesh, *args) -> np.ndarray:
    """fn(batch of B stacked models, *args) over a whole stacked zoo, padded batches, rows concatenated."""
    n = jax.tree.leaves(variables)[0].shape[0]
    out = []
    for idx, pad in _batches(n, B):
        v = pop.place(_take(variables, idx, pad), mesh, per_model=True)
        out.append(np.asarray(fn(v, *args))[:len(idx)])
    return np.concatenate(out)


def evaluate_ulp(model, result: ULPResult, test_vars, test_labels) -> dict:
    """ROC AUC (and accuracy at 0.5) of the ULP detector on a test zoo."""
    y = _check_zoo("test", test_vars, test_labels)
    s = ulp_scores(model, result, test_vars)
    return {"auc": roc_auc(s, y.astype(bool)), "acc": float(np.mean((s > 0.5) == y)), "scores": s}


def noise_baseline(model, train_vars, train_labels, test_vars, test_labels, image_shape, *, n_patterns: int,
                   seed: int = 0, mode: str = "auto", batch_models: int = 50, features: str = "logits") -> dict:
    """The reference's baseline: M uniform-noise images through every model, logistic regression (C=10) on the
    concatenated logits (or log-softmax, as ULP's `features`); AUC on the test zoo."""
    from sklearn.linear_model import LogisticRegression

    y_tr = _check_zoo("train", train_vars, train_labels)
    y_te = _check_zoo("test", test_vars, test_labels)
    z = jax.random.uniform(jax.random.key(seed), (n_patterns, *image_shape))
    mesh = pop.model_mesh(batch_models)
    fn = jax.jit(_zoo_logits(model, mode, mesh))
    feats = lambda variables: _over_zoo(lambda v: pool_logits(fn(v, z), "concat", features), variables,
                                        batch_models, mesh)

    clf = LogisticRegression(C=10.0, max_iter=5000).fit(feats(train_vars), y_tr)
    s = clf.predict_proba(feats(test_vars))[:, 1]
    return {"auc": roc_auc(s, y_te.astype(bool)), "acc": float(np.mean((s > 0.5) == y_te)), "scores": s}
