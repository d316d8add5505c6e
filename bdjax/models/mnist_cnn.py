"""Small BadNets-style CNN for MNIST-sized (and smaller, e.g. 8x8 sklearn digits) inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bdjax.errors import ConfigError
from bdjax.models.common import flatten, max_pool, model_output, normalize, torch_conv, torch_dense


class MnistCNN(nn.Module):
    """conv3x3(32)-ReLU, conv3x3(64)-ReLU, maxpool 2, dense(128)-ReLU, dense(num_classes).

    Convs are VALID (the classic Keras MNIST CNN): 28x28 -> 26 -> 24 -> pool 12; 8x8 -> 6 -> 4
    -> pool 2. The pool is skipped when the map is below 4x4 so inputs down to 5x5 work.
    Features: conv1, conv2, penultimate (the 128-d hidden layer), logits.
    """

    num_classes: int = 10
    width: int = 32  # conv1 filters; conv2 has 2 * width
    hidden: int = 128
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "xla"  # xla | gemm | gemm_dw (see common.gemm_conv, common.gemm_dw_conv)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        if min(x.shape[1], x.shape[2]) < 5:
            raise ConfigError(f"mnist_cnn needs inputs of at least 5x5, got {x.shape[1]}x{x.shape[2]}")
        feats: dict = {}
        x = normalize(x, self.mean, self.std)
        x = nn.relu(torch_conv(x, self.width, 3, dtype=self.dtype, impl=self.conv_impl, name="conv1"))
        feats["conv1"] = x
        x = nn.relu(torch_conv(x, 2 * self.width, 3, dtype=self.dtype, impl=self.conv_impl, name="conv2"))
        feats["conv2"] = x
        if min(x.shape[1], x.shape[2]) >= 4:
            x = max_pool(x, 2)
        x = nn.relu(torch_dense(flatten(x), self.hidden, dtype=self.dtype, name="fc1"))
        feats["penultimate"] = x
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="fc2")
        return model_output(logits, feats, features)
