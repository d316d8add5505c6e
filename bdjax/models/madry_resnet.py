"""The TF ResNet of MadryLab's cifar10_challenge / backdoor_data_poisoning (Spectral Signatures,
Tran et al. 2018), ported to flax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError
from bdjax.models.common import batch_norm, model_output

# TF original: conv DW ~ N(0, sqrt(2 / (k*k*out))), FC ~ uniform_unit_scaling(1.0), bias 0.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_fc_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def per_image_standardization(x):
    """``tf.image.per_image_standardization`` on a batch (NHWC)."""
    n = np.prod(x.shape[1:])
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(n))


class MadryUnit(nn.Module):
    """Pre-activation residual unit: BN-act-conv3x3(stride)-BN-act-conv3x3 + shortcut.

    As in the TF code, the first unit of the network (``activate_before_residual``) feeds the
    *activated* input to the shortcut, the others the raw input. When the shape changes the
    shortcut is avg-pool(stride) plus zero channel padding (parameter-free).
    """

    out_filters: int
    stride: int = 1
    activate_before_residual: bool = False
    leakiness: float = 0.1
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    def _act(self, x):
        return nn.leaky_relu(x, self.leakiness) if self.leakiness else nn.relu(x)

    def _conv(self, x, stride, name):
        return nn.Conv(
            self.out_filters, (3, 3), strides=(stride, stride), padding="SAME", use_bias=False,
            kernel_init=_conv_init, dtype=self.dtype, name=name,
        )(x)

    @nn.compact
    def __call__(self, x, train: bool):
        in_filters = x.shape[-1]
        pre = self._act(batch_norm(train, dtype=self.dtype, epsilon=self.bn_epsilon, name="init_bn")(x))
        orig = pre if self.activate_before_residual else x
        out = self._conv(pre, self.stride, "conv1")
        out = self._act(batch_norm(train, dtype=self.dtype, epsilon=self.bn_epsilon, name="bn2")(out))
        out = self._conv(out, 1, "conv2")
        if in_filters != self.out_filters or self.stride != 1:
            if self.stride != 1:
                # 'SAME' + exclude padding equals TF's VALID pool on even maps and keeps the
                # shape equal to the strided SAME conv on odd ones.
                orig = nn.avg_pool(orig, (self.stride,) * 2, strides=(self.stride,) * 2,
                                   padding="SAME", count_include_pad=False)
            d = self.out_filters - in_filters
            orig = jnp.pad(orig, ((0, 0), (0, 0), (0, 0), (d // 2, d - d // 2)))
        return out + orig


class MadryResNet(nn.Module):
    """init conv3x3(filters[0]) -> 3 stages x ``num_units`` pre-activation units
    (widths filters[1:], strides 1/2/2) -> BN-act -> global avg pool -> linear.

    Defaults reproduce the Spectral Signatures model (filters [16, 16, 32, 64], 5 units per
    stage, leaky ReLU 0.1 as in the TF code). Their representation is the output of
    ``stage3_unit2`` (8x8x64 = 4096-d on 32x32). The TF model did random crop/flip inside the
    graph; augmentation belongs to the data pipeline here. ``per_image_std`` applies
    ``tf.image.per_image_standardization`` (off in the Spectral Signatures config).
    Features: stem, stage{s}_unit{u}, penultimate (filters[-1]-d), logits.
    """

    num_classes: int = 10
    filters: Sequence[int] = (16, 16, 32, 64)
    num_units: int = 5
    strides: Sequence[int] = (1, 2, 2)
    leakiness: float = 0.1
    bn_epsilon: float = 1e-5  # TF contrib's default was 1e-3
    per_image_std: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        if len(self.filters) != len(self.strides) + 1 or self.num_units < 1:
            raise ConfigError(
                f"madry_resnet needs len(filters) == len(strides) + 1 and num_units >= 1, got "
                f"filters={tuple(self.filters)}, strides={tuple(self.strides)}, num_units={self.num_units}"
            )
        if any(b < a for a, b in zip(self.filters, self.filters[1:])):
            raise ConfigError(f"madry_resnet filters must be non-decreasing, got {tuple(self.filters)}")
        feats: dict = {}
        if self.per_image_std:
            x = per_image_standardization(x)
        x = nn.Conv(self.filters[0], (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="init_conv")(x)
        feats["stem"] = x
        for s, (width, stride) in enumerate(zip(self.filters[1:], self.strides), start=1):
            for u in range(self.num_units):
                x = MadryUnit(
                    width, stride if u == 0 else 1, activate_before_residual=(s == 1 and u == 0),
                    leakiness=self.leakiness, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                    name=f"unit_{s}_{u}",
                )(x, train)
                feats[f"stage{s}_unit{u}"] = x
        x = batch_norm(train, dtype=self.dtype, epsilon=self.bn_epsilon, name="final_bn")(x)
        x = nn.leaky_relu(x, self.leakiness) if self.leakiness else nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        feats["penultimate"] = x
        logits = nn.Dense(self.num_classes, kernel_init=_fc_init, dtype=self.dtype, name="logit")(x)
        return model_output(logits, feats, features)
