"""The CIFAR-10 CNN of Universal Litmus Patterns (Kolouri et al., CVPR 2020), ``CNN_classifier``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.common import batch_norm, flatten, max_pool, model_output, normalize, torch_conv, torch_dense


class UlpCNN(nn.Module):
    """6 x [conv5x5(64, pad 2)-BN-ReLU] with 2x2 max-pools after conv2/4/6, then
    FC 384-BN-ReLU-dropout, FC 192-BN-ReLU-dropout, FC num_classes.

    32x32 input gives a 4x4x64 = 1024-d flatten (flattened HWC, not PyTorch's CHW: permute
    fc1 rows when porting weights). Features: conv1..conv6 (post-ReLU, pre-pool), fc1,
    fc2 (= penultimate, 192-d), logits.
    """

    num_classes: int = 10
    width: int = 64
    fc_width: int = 384  # fc2 has fc_width // 2
    dropout_rate: float = 0.2
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Any = jnp.float32
    conv_impl: str = "xla"  # xla | gemm | gemm_dw (see common.gemm_conv, common.gemm_dw_conv)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        feats: dict = {}
        x = normalize(x, self.mean, self.std)
        for i in range(1, 7):
            x = torch_conv(x, self.width, 5, padding=2, dtype=self.dtype, impl=self.conv_impl, name=f"conv{i}")
            x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"bn{i}")(x))
            feats[f"conv{i}"] = x
            if i % 2 == 0:
                x = max_pool(x, 2)
        x = flatten(x)
        for j, width in ((1, self.fc_width), (2, self.fc_width // 2)):
            x = torch_dense(x, width, dtype=self.dtype, name=f"fc{j}")
            x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"fc{j}_bn")(x))
            feats[f"fc{j}"] = x
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        feats["penultimate"] = feats["fc2"]
        logits = torch_dense(x, self.num_classes, dtype=self.dtype, name="fc3")
        return model_output(logits, feats, features)
