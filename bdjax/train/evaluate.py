"""Batched, compiled evaluation: predictions, clean accuracy, per-class accuracy, attack success rate."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.train.sharding import batch_sharded, data_mesh, replicated
from bdjax.train.core import to_float


@functools.lru_cache(maxsize=32)
def _predict_fn(model, mesh):
    def predict(variables, xb):
        if mesh is not None:
            xb = jax.lax.with_sharding_constraint(xb, batch_sharded(mesh))
        return jnp.argmax(model.apply(variables, to_float(xb), train=False), -1)
    return jax.jit(predict)


def predict(model, variables, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted labels for uint8 images; the last batch is padded so only one shape is ever compiled."""
    if len(x) == 0:
        return np.zeros((0,), np.int32)
    batch_size = min(batch_size, len(x))
    mesh = data_mesh(batch_size)
    if mesh.size > 1:  # variables may live on one device (e.g. after a defense); put them on the eval mesh
        variables = jax.device_put(variables, replicated(mesh))
    fn = _predict_fn(model, mesh if mesh.size > 1 else None)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        pad = batch_size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        out.append(np.asarray(fn(variables, xb))[: batch_size - pad])
    return np.concatenate(out)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y)) if len(y) else float("nan")


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> list[float]:
    correct = np.bincount(y, weights=(pred == y), minlength=num_classes)
    total = np.bincount(y, minlength=num_classes)
    return [float(c / t) if t else float("nan") for c, t in zip(correct, total)]


def evaluate(model, variables, x_test, y_test, num_classes: int, x_asr=None, y_asr=None, batch_size: int = 1000) -> dict:
    """clean_acc and per_class_acc on the clean test set; asr on triggered non-target test images."""
    pred = predict(model, variables, x_test, batch_size)
    out = {"clean_acc": accuracy(pred, y_test), "per_class_acc": per_class_accuracy(pred, y_test, num_classes)}
    if x_asr is not None:
        out["asr"] = accuracy(predict(model, variables, x_asr, batch_size), y_asr)
    return out
