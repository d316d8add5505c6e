"""CIFAR ResNet-18 and PreAct ResNet-18 in the layout of kuangliu/pytorch-cifar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.common import batch_norm, model_output, normalize, torch_conv, torch_dense


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = torch_conv(x, self.planes, 3, stride=self.stride, padding=1, bias=False, dtype=self.dtype, name="conv1")
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = torch_conv(out, self.planes, 3, padding=1, bias=False, dtype=self.dtype, name="conv2")
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = torch_conv(x, self.planes, 1, stride=self.stride, bias=False, dtype=self.dtype, name="shortcut_conv")
            shortcut = batch_norm(train, dtype=self.dtype, name="shortcut_bn")(shortcut)
        return nn.relu(out + shortcut)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut; the projection (1x1 conv, no BN) reads
    the pre-activated input, as in kuangliu's PreActBlock."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = torch_conv(out, self.planes, 1, stride=self.stride, bias=False, dtype=self.dtype, name="shortcut_conv")
        out = torch_conv(out, self.planes, 3, stride=self.stride, padding=1, bias=False, dtype=self.dtype, name="conv1")
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = torch_conv(out, self.planes, 3, padding=1, bias=False, dtype=self.dtype, name="conv2")
        return out + shortcut


def _stages(module, x, block_cls, train: bool, feats: dict):
    for s, (n_blocks, width) in enumerate(zip(module.stage_sizes, module.widths)):
        for b in range(n_blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            x = block_cls(width, stride, dtype=module.dtype, name=f"layer{s + 1}_{b}")(x, train)
        feats[f"layer{s + 1}"] = x
    return x


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (stride 1, no max-pool), BasicBlocks [2,2,2,2] of widths
    64/128/256/512 with strides 1/2/2/2, global average pool (512-d penultimate), linear.

    ~11.17M parameters for 10 classes. Features: stem, layer1..layer4, penultimate, logits.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        feats: dict = {}
        x = normalize(x, self.mean, self.std)
        x = torch_conv(x, self.widths[0], 3, padding=1, bias=False, dtype=self.dtype, name="conv1")
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        feats["stem"] = x
        x = _stages(self, x, BasicBlock, train, feats)
        # Global mean == kuangliu's avg_pool2d(4) at 32x32, and still valid at other sizes.
        x = jnp.mean(x, axis=(1, 2))
        feats["penultimate"] = x
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="linear")
        return model_output(logits, feats, features)


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (PreActBlocks, same widths/strides as ResNet18), with a final
    BN-ReLU before global average pooling. ``layer4`` is the raw last-stage output; the
    penultimate (512-d) is pooled after the final BN-ReLU.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        feats: dict = {}
        x = normalize(x, self.mean, self.std)
        # No BN after the stem: the first PreActBlock starts with BN-ReLU.
        x = torch_conv(x, self.widths[0], 3, padding=1, bias=False, dtype=self.dtype, name="conv1")
        feats["stem"] = x
        x = _stages(self, x, PreActBlock, train, feats)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        feats["penultimate"] = x
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="linear")
        return model_output(logits, feats, features)
