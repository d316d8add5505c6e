"""What MoCo v2 and BYOL share: a backbone + MLP projection head (+ BYOL's predictor), applied in train mode
with BatchNorm over groups of the batch (Shuffle-BN's per-device statistics), and the EMA of a parameter tree."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax.models.common import batch_norm


class MLPHead(nn.Module):
    """Linear -> [BN] -> ReLU -> Linear (MoCo v2's head has no BN; BYOL's projector and predictor do)."""
    hidden: int
    dim: int
    bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.hidden, name="fc1")(x)
        if self.bn:
            x = batch_norm(train, name="bn")(x)
        return nn.Dense(self.dim, name="fc2")(nn.relu(x))


class Encoder(nn.Module):
    """backbone (a bdjax model; its "penultimate" feature) -> projector [-> predictor when predictor_hidden > 0].
    Returns (features h, projection z, prediction p or None). The backbone's own classifier layer is unused."""
    backbone: nn.Module
    hidden: int
    dim: int
    head_bn: bool = False
    predictor_hidden: int = 0

    def setup(self):
        self.projector = MLPHead(self.hidden, self.dim, self.head_bn)
        if self.predictor_hidden:
            self.predictor = MLPHead(self.predictor_hidden, self.dim, True)

    def __call__(self, x, train: bool = False, predict: bool = False):
        _, feats = self.backbone(x, train=train, features=True)
        h = feats["penultimate"]
        z = self.projector(h, train)
        p = self.predictor(z, train) if (predict and self.predictor_hidden) else None
        return h, z, p

    def features(self, x):
        """The frozen backbone's features for linear evaluation and the kNN monitor (eval-mode BN)."""
        _, feats = self.backbone(x, train=False, features=True)
        return feats["penultimate"]


def apply_grouped(model: nn.Module, params, batch_stats, x, groups: int, **kwargs):
    """Train-mode forward with BatchNorm statistics computed within each of `groups` contiguous slices of the
    batch (what per-GPU BN does in PyTorch DDP). Under a data mesh with groups = devices, each group is one
    device's shard, so the statistics need no communication. Returns (outputs, new batch_stats: the mean of the
    groups' running-statistics updates)."""
    variables = {"params": params, "batch_stats": batch_stats}
    run = lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"], **kwargs)
    if groups == 1:
        out, upd = run(x)
        return out, upd["batch_stats"]
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    out, upd = jax.vmap(run)(xg)
    out = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)
    return out, jax.tree.map(lambda a: a.mean(0), upd["batch_stats"])


def ema(target, online, decay):
    """target <- decay * target + (1 - decay) * online, leaf by leaf."""
    return jax.tree.map(lambda t, o: decay * t + (1 - decay) * o, target, online)


def l2_normalize(x, axis=-1, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
