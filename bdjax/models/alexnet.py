"""AlexNet in the torchvision layout, as used by Hidden Trigger Backdoor Attacks (Saha et al.
2020), which read fc7 features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bdjax.errors import ConfigError
from bdjax.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    adaptive_avg_pool,
    flatten,
    max_pool_if_fits,
    model_output,
    normalize,
    torch_conv,
    torch_dense,
)

# (kernel, stride, padding, max-pool after) for conv1..conv5, torchvision.models.alexnet.
_CONV_SPECS = ((11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True))


class AlexNetFeatures(nn.Module):
    """conv11/4(64)-pool-conv5(192)-pool-conv3(384)-conv3(256)-conv3(256)-pool,
    adaptive avg-pool to 6x6, dropout-fc6-ReLU, dropout-fc7-ReLU, fc8 (logits).

    At 224x224 this is exactly torchvision's AlexNet (61.1M params with 1000 classes).
    Small inputs also work: 3x3/2 max-pools whose window does not fit are skipped, and the
    exact PyTorch adaptive average pool upsamples by replication (32x32: conv1 7x7, pool
    3x3, conv2 3x3, pool 1x1, last pool skipped, replicated to 6x6), so the parameter
    shapes are the same at every input size. Inputs are [0, 1]; ImageNet mean/std
    normalisation happens inside (set mean/std to None to disable). pool5 is flattened HWC
    (torchvision flattens CHW: permute fc6 rows when porting weights).
    Features: conv1..conv5 (post-ReLU), pool5, fc6, fc7 (= penultimate, post-ReLU), logits.
    """

    num_classes: int = 10
    conv_widths: Sequence[int] = (64, 192, 384, 256, 256)
    fc_widths: Sequence[int] = (4096, 4096)
    pool_output: Sequence[int] = (6, 6)
    dropout_rate: float = 0.5
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        if len(self.conv_widths) != 5 or len(self.fc_widths) != 2:
            raise ConfigError(
                f"alexnet needs 5 conv_widths and 2 fc_widths, got {tuple(self.conv_widths)} "
                f"and {tuple(self.fc_widths)}"
            )
        feats: dict = {}
        x = normalize(x, self.mean, self.std)
        for i, (width, (k, s, p, pool)) in enumerate(zip(self.conv_widths, _CONV_SPECS), start=1):
            x = nn.relu(torch_conv(x, width, k, stride=s, padding=p, dtype=self.dtype, name=f"conv{i}"))
            feats[f"conv{i}"] = x
            if pool:
                x = max_pool_if_fits(x, 3, 2)
        x = adaptive_avg_pool(x, tuple(self.pool_output))
        feats["pool5"] = x
        x = flatten(x)
        for j, width in enumerate(self.fc_widths, start=6):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = nn.relu(torch_dense(x, width, dtype=self.dtype, name=f"fc{j}"))
            feats[f"fc{j}"] = x
        feats["penultimate"] = x
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="fc8")
        return model_output(logits, feats, features)
