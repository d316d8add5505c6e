"""Linear evaluation of a frozen SSL backbone, the backdoor metrics (top-1 and the target category's false
positives on clean and on patched images) and the kNN monitor used during pretraining.

Features are the backbone's "penultimate" activations (eval-mode BN), L2-normalised, then standardised with the
labelled training subset's mean and standard deviation; one linear layer is trained on them with the training
core (SGD, cosine)."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.config import TrainConfig
from bdjax.errors import ConfigError
from bdjax.train.loop import fit


@dataclasses.dataclass(frozen=True)
class LinearEvalConfig:
    fraction: float = 0.01  # labelled fraction of the training set, per class
    epochs: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 256
    weight_decay: float = 0.0

    def validate(self) -> "LinearEvalConfig":
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"linear_eval.fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("linear_eval.epochs, batch_size and lr must be positive")
        return self


def labelled_subset(seed: int, y: np.ndarray, fraction: float, num_classes: int) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) random images of every class c; a class left empty is an error."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        k = int(round(fraction * len(idx)))
        if k < 1:
            raise ConfigError(f"linear_eval.fraction={fraction} leaves class {c} empty ({len(idx)} images; needs "
                              f"at least {1 / max(len(idx), 1):.3g})")
        out.append(rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(out))


def extract_features(model: nn.Module, variables: dict, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Frozen-backbone features (model.features) of images (uint8 or float in [0, 1]), in batches."""
    f = jax.jit(lambda v, xb: model.apply(v, xb, method="features"))
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    parts = [np.asarray(f(variables, jnp.asarray(x[i:i + batch_size], jnp.float32) / scale))
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


def normalise_features(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """L2-normalise every set, then standardise all with the training set's mean and std."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    train = unit(train)
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(unit(f) - mean) / std if i else (train - mean) / std for i, f in enumerate((train, *others))]


class LinearHead(nn.Module):
    """One linear layer, with the bdjax model call signature so the training core drives it."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        logits = nn.Dense(self.num_classes, name="linear")(x)
        return (logits, {"penultimate": x, "logits": logits}) if features else logits


def train_linear(features: np.ndarray, labels: np.ndarray, num_classes: int, cfg: LinearEvalConfig,
                 seed: int = 0) -> tuple[LinearHead, dict]:
    head = LinearHead(num_classes)
    tcfg = TrainConfig(model="linear", epochs=cfg.epochs, batch_size=min(cfg.batch_size, len(features)),
                       optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       schedule="cosine", checkpoint_every=0)
    # (N, D) features as 1x1 "images" would break no rule, but the core takes any array: feed them as they are
    state = fit(head, tcfg, features.astype(np.float32), labels, seed=seed, desc="linear")
    return head, state.variables


def predict_linear(head: LinearHead, variables: dict, features: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.argmax(jax.jit(head.apply)(variables, jnp.asarray(features, jnp.float32)), -1))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def false_positives(conf: np.ndarray, target: int) -> int:
    """Images of other classes predicted as the target: column sum minus diagonal."""
    return int(conf[:, target].sum() - conf[target, target])


def backdoor_metrics(y_clean, pred_clean, y_patched, pred_patched, target: int, num_classes: int) -> dict:
    c, p = confusion_matrix(y_clean, pred_clean, num_classes), confusion_matrix(y_patched, pred_patched, num_classes)
    return {"clean_acc": float(np.trace(c) / c.sum()), "clean_fp": false_positives(c, target),
            "patched_acc": float(np.trace(p) / p.sum()), "patched_fp": false_positives(p, target)}


def evaluate_linear(f_train, y_train, f_val, y_val, f_patched, y_patched, *, fraction: float, target: int,
                    num_classes: int, cfg: LinearEvalConfig, seed: int = 0, draws: int = 1) -> dict:
    """backdoor_metrics of a linear head on `fraction` of the labels, over `draws` labelled subsets (seeds seed,
    seed + 1, ...; each head trained with its draw's seed). One draw: its metrics as they are. Several: each
    metric's mean, its standard deviation as `<metric>_std`, and `label_draws`. With 1% of CIFAR-10's labels a
    single draw's target false positives can move 2x between seeds, so the ratio of two models needs several."""
    runs = []
    for d in range(draws):
        lab = labelled_subset(seed + d, y_train, fraction, num_classes)
        ft, fv, fp = normalise_features(f_train[lab], f_val, f_patched)
        head, hv = train_linear(ft, y_train[lab], num_classes, cfg, seed=seed + d)
        runs.append(backdoor_metrics(y_val, predict_linear(head, hv, fv), y_patched, predict_linear(head, hv, fp),
                                     target, num_classes))
    if draws == 1:
        return runs[0]
    out = {"label_draws": draws}
    for k in runs[0]:
        values = np.array([r[k] for r in runs], np.float64)
        out[k], out[f"{k}_std"] = float(values.mean()), float(values.std())
    return out


def knn_predict(train_f, train_y, test_f, num_classes: int, k: int = 200, temperature: float = 0.1):
    """Weighted kNN on cosine similarity (weights exp(sim / T), as the instance-discrimination monitor)."""
    unit = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = unit(jnp.asarray(test_f)) @ unit(jnp.asarray(train_f)).T
    k = min(k, sim.shape[1])
    top, idx = jax.lax.top_k(sim, k)
    votes = jax.nn.one_hot(jnp.asarray(train_y)[idx], num_classes) * jnp.exp(top / temperature)[..., None]
    return np.asarray(jnp.argmax(votes.sum(1), -1))


def knn_monitor(model, x_bank, y_bank, x_test, y_test, num_classes: int, k: int = 200, *,
                x_patched=None, target: int | None = None):
    """eval_fn for the pretraining loop: {"knn_acc"} of test images against a labelled bank (monitoring only);
    with x_patched (non-target images carrying the trigger) and target also {"knn_patched_target"}, the share of
    them the kNN assigns to the target: the attack's progress during pretraining, no linear head needed."""
    def eval_fn(state):
        variables = state.variables
        fb, ft = extract_features(model, variables, x_bank), extract_features(model, variables, x_test)
        record = {"knn_acc": float(np.mean(knn_predict(fb, y_bank, ft, num_classes, k) == y_test))}
        if x_patched is not None:
            fp = extract_features(model, variables, x_patched)
            record["knn_patched_target"] = float(np.mean(knn_predict(fb, y_bank, fp, num_classes, k) == target))
        return record
    return eval_fn
