"""A compact VGG-style CNN for CIFAR-size images: the `--scale small` network of the CIFAR experiments.

ResNet-18 needs ~1.7 GFLOP per training image, hours per run on a 2-core CPU; this net needs ~0.2 GFLOP and
still reaches the mid-80s of clean accuracy on CIFAR-10 in a dozen epochs, enough to show attacks and defenses.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.common import batch_norm, flatten, max_pool, model_output, torch_conv, torch_dense


class CifarCNN(nn.Module):
    """3 stages of [conv3x3-BN-ReLU] x 2 + 2x2 max-pool (widths 32, 64, 128), global average pool, FC.
    Features: conv1..conv6 (post-ReLU), penultimate (pooled, widths[-1]-d), logits."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    dtype: Any = jnp.float32
    conv_impl: str = "xla"  # xla | gemm | gemm_dw (see common.gemm_conv, common.gemm_dw_conv)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        feats: dict = {}
        i = 0
        for width in self.widths:
            for _ in range(2):
                i += 1
                x = torch_conv(x, width, 3, padding=1, dtype=self.dtype, impl=self.conv_impl, name=f"conv{i}")
                x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"bn{i}")(x))
                feats[f"conv{i}"] = x
            x = max_pool(x, 2)
        x = flatten(jnp.mean(x, axis=(1, 2)))
        feats["penultimate"] = x
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="fc")
        return model_output(logits, feats, features)
