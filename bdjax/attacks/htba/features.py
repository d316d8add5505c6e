"""The feature map f of the HTBA objective: any named layer of a bdjax (flax) model, flattened to (B, D)."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from bdjax.attacks.htba.crafter import FeatureFn
from bdjax.errors import ConfigError
from bdjax.models import feature_shapes, select_feature


def feature_fn(model: nn.Module, layer: str) -> FeatureFn:
    """`features(variables, x) -> (B, D)`: the named layer of `model.apply(variables, x, features=True)`,
    in eval mode (dropout off, batch statistics frozen)."""

    def features(variables, x):
        _, feats = model.apply(variables, x, train=False, features=True)
        return select_feature(feats, layer)

    return features


def check_feature_layer(model: nn.Module, layer: str, image_shape: Sequence[int]) -> int:
    """The layer's flattened width; ConfigError listing the model's layers when it has no such layer.

    Uses `jax.eval_shape`, so nothing is computed: the mistake surfaces before any compilation."""
    shapes = feature_shapes(model, image_shape)
    if layer not in shapes:
        raise ConfigError(f"unknown htba feature_layer {layer!r} for this model; valid layers: {', '.join(shapes)}")
    size = 1
    for d in shapes[layer]:
        size *= d
    return size
