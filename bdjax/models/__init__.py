"""Model zoo: flax.linen classifiers with named intermediate features.

Every model: NHWC float32 input in [0, 1]; ``model.apply(variables, x, train=False,
features=False)`` returns logits (B, num_classes), or ``(logits, feats)`` with
``features=True`` (feats: dict of named activations incl. "penultimate" and "logits").
BatchNorm statistics live in the ``batch_stats`` collection; dropout uses the ``dropout`` rng.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError
from bdjax.models.alexnet import AlexNetFeatures
from bdjax.models.cifar_cnn import CifarCNN
from bdjax.models.common import adaptive_avg_pool, count_params, flatten, select_feature
from bdjax.models.madry_resnet import MadryResNet
from bdjax.models.mnist_cnn import MnistCNN
from bdjax.models.resnet import PreActResNet18, ResNet18
from bdjax.models.ulp_cnn import UlpCNN

_REGISTRY: dict[str, type[nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "ulp_cnn": UlpCNN,
    "resnet18": ResNet18,
    "preact_resnet18": PreActResNet18,
    "madry_resnet": MadryResNet,
    "alexnet": AlexNetFeatures,
    "cifar_cnn": CifarCNN,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _options(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model; ``kwargs`` set its fields (widths, dropout_rate, dtype, ...)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    cls = _REGISTRY.get(key)
    if cls is None:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    options = _options(cls)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for model {key!r}; valid options: "
            f"{', '.join(o for o in options if o != 'num_classes')}"
        )
    # Lists from JSON/YAML configs become tuples so the module stays hashable (jit-friendly).
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(num_classes=num_classes, **kwargs)


def _batch_of_one(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (H, W, C) with positive sizes, got {tuple(input_shape)}")
    return (1, *shape)


def _as_key(key):
    return jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key


@functools.lru_cache(maxsize=32)
def _jitted_init(model: nn.Module):
    # One compiled init per (model config, input shape, key type): re-initialising with new
    # seeds (e.g. training many ULP models) costs no recompilation.
    return jax.jit(model.init)


def init_model(model: nn.Module, key, input_shape: Sequence[int]) -> dict:
    """Jitted init on one zero image; returns ``{'params': ..., ['batch_stats': ...]}``.

    ``key`` is a ``jax.random.key`` (an int seed is accepted too). Most of the compile time
    is the threefry RNG; a ``jax.random.key(seed, impl="rbg")`` key compiles ~2x faster.
    """
    try:
        init = _jitted_init(model)
    except TypeError:  # unhashable field values (e.g. lists passed to the class directly)
        init = jax.jit(model.init)
    return init(_as_key(key), jnp.zeros(_batch_of_one(input_shape), jnp.float32))


def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Per-example shape (no batch dim) of every named feature, via ``jax.eval_shape``.

    Nothing is computed; keys are in forward order (conv maps are (H, W, C)).
    """
    x = jax.ShapeDtypeStruct(_batch_of_one(input_shape), jnp.float32)
    order: list[str] = []

    def run(x):
        variables = model.init(jax.random.key(0), x)
        _, feats = model.apply(variables, x, features=True)
        order.extend(feats)  # pytrees sort dict keys; remember the forward order
        return feats

    shapes = jax.eval_shape(run, x)
    return {k: tuple(shapes[k].shape[1:]) for k in order}


__all__ = [
    "MODEL_NAMES",
    "AlexNetFeatures",
    "CifarCNN",
    "MadryResNet",
    "MnistCNN",
    "PreActResNet18",
    "ResNet18",
    "UlpCNN",
    "adaptive_avg_pool",
    "count_params",
    "feature_shapes",
    "flatten",
    "get_model",
    "init_model",
    "select_feature",
]
