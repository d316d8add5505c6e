"""Learned representations of a dataset: the input of every representation-based data filter.

`extract_features(model, variables, x_uint8, layer)` runs one jitted forward pass per batch with
`features=True` and returns the named layer flattened to (N, D) float32 on the host. The last batch is padded,
so exactly one batch shape is ever compiled; the layer name is checked against `feature_shapes` (an abstract
evaluation, nothing computed) before any real work starts.
"""
from __future__ import annotations

import functools
import inspect

import jax
import numpy as np

from bdjax.errors import BdjaxError, ConfigError
from bdjax.models import feature_shapes, select_feature
from bdjax.train.sharding import batch_sharded, data_mesh
from bdjax.train.core import to_float


def _model_name(model) -> str:
    return type(model).__name__


def _accepts_features(model) -> bool:
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):  # no introspectable signature: let feature_shapes decide
        return True
    return "features" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def available_layers(model, image_shape) -> dict[str, tuple[int, ...]]:
    """Named features of `model` on (H, W, C) inputs -> per-example shapes; ConfigError when it has none."""
    no_features = ConfigError(f"model {_model_name(model)} has no features output: its apply must accept "
                              "features=True and return (logits, {layer_name: activation})")
    if not _accepts_features(model):
        raise no_features
    try:
        shapes = feature_shapes(model, tuple(int(d) for d in image_shape))
    except BdjaxError:  # the model's own message (e.g. an input too small for it)
        raise
    except TypeError as e:  # an unexpected keyword argument 'features' deeper down
        if "features" in str(e):
            raise no_features from None
        raise
    except ValueError as e:  # apply(features=True) returned logits only, not a (logits, dict) pair
        if "unpack" in str(e):
            raise no_features from None
        raise
    return shapes


def check_layer(model, image_shape, layer: str) -> int:
    """The flattened dimension of `layer`; ConfigError listing the available layers when it is unknown."""
    shapes = available_layers(model, image_shape)
    if not isinstance(layer, str) or layer not in shapes:
        listing = ", ".join(f"{k} {shapes[k]}" for k in shapes)
        raise ConfigError(f"unknown feature layer {layer!r} for model {_model_name(model)}; available layers: {listing}")
    return int(np.prod(shapes[layer]))


@functools.lru_cache(maxsize=32)
def _feature_fn(model, layer: str, mesh):
    def forward(variables, xb):
        if mesh is not None:
            xb = jax.lax.with_sharding_constraint(xb, batch_sharded(mesh))
        _, feats = model.apply(variables, to_float(xb), train=False, features=True)
        return select_feature(feats, layer).astype(np.float32)

    return jax.jit(forward)


def extract_features(model, variables, x_uint8: np.ndarray, layer: str, batch_size: int = 500) -> np.ndarray:
    """Layer `layer` of `model` on uint8 NHWC images, flattened: a float32 (N, D) numpy array.

    The batch is split over the local devices when it divides evenly (as `bdjax.train.predict` does); each
    batch's result is fetched before the next is dispatched, which also keeps XLA:CPU's collectives safe.
    """
    x = np.asarray(x_uint8)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ConfigError(f"extract_features expects uint8 images (N, H, W, C), got {x.dtype} {x.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    dim = check_layer(model, x.shape[1:], layer)
    if len(x) == 0:
        return np.zeros((0, dim), np.float32)
    batch_size = int(min(batch_size, len(x)))
    mesh = data_mesh(batch_size)
    fn = _feature_fn(model, layer, mesh if mesh.size > 1 else None)
    out = np.empty((len(x), dim), np.float32)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        n = len(xb)
        if n < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
        out[i:i + n] = np.asarray(fn(variables, xb))[:n]
    return out
