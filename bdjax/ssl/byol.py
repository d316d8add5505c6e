"""BYOL on the training core: the online network (encoder + projector + predictor) is trained; the target
network (an EMA of the online parameters, predictor unused) is `TrainState.extra`:

    extra = {"target_params", "target_stats"}

The EMA rate follows the cosine ramp tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, reaching 1 at the last
step K; the loss is the symmetrised 2 - 2 cos(p_online(v1), z_target(v2)) + (v1 <-> v2). BatchNorm: by default
(bn_groups=1) over the whole batch of both views, BYOL's synchronised BN across devices (under a data mesh each BN
layer then all-reduces its statistics); bn_groups=0 keeps the statistics per device (each device's images, both
views: PyTorch DDP without SyncBN), and G > 1 simulates G devices on one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.errors import ConfigError
from bdjax.ssl.augment import AugmentConfig, two_views
from bdjax.ssl.encoder import Encoder, apply_grouped, ema, l2_normalize


@dataclasses.dataclass(frozen=True)
class ByolConfig:
    dim: int = 128
    hidden: int = 1024
    predictor_hidden: int = 1024
    tau_base: float = 0.99
    bn_groups: int = 1  # BatchNorm groups: 1 = the whole batch (synchronised BN), 0 = one per data-mesh device
    augment: AugmentConfig = AugmentConfig()

    def validate(self, batch_size: int | None = None) -> "ByolConfig":
        if not 0 <= self.tau_base <= 1:
            raise ConfigError(f"byol.tau_base must be in [0, 1], got {self.tau_base}")
        if min(self.dim, self.hidden, self.predictor_hidden) < 1:
            raise ConfigError("byol.dim, byol.hidden and byol.predictor_hidden must be positive")
        if self.bn_groups < 0 or (batch_size is not None and self.bn_groups and batch_size % self.bn_groups):
            raise ConfigError(f"byol.bn_groups={self.bn_groups} must be 0 (one per device) or divide the batch size "
                              f"{batch_size}")
        self.augment.validate()
        return self


def encoder(backbone, cfg: ByolConfig) -> Encoder:
    return Encoder(backbone, cfg.hidden, cfg.dim, head_bn=True, predictor_hidden=cfg.predictor_hidden)


def regression_loss(p, z):
    """Per-sample 2 - 2 cos(p, z)."""
    return 2.0 - 2.0 * jnp.sum(l2_normalize(p) * l2_normalize(z), axis=-1)


def tau_schedule(step, total_steps: int, tau_base: float):
    return 1.0 - (1.0 - tau_base) * (jnp.cos(jnp.pi * step / max(total_steps, 1)) + 1.0) / 2.0


def init_extra(variables) -> dict:
    return {"target_params": variables["params"], "target_stats": variables.get("batch_stats", {})}


def _by_group(v1, v2, groups: int):
    """Both views of each group's images side by side, so that a BN group (a device's shard) holds its own
    images' two views: (B, ...) x 2 -> (2B, ...) ordered [g0 v1, g0 v2, g1 v1, g1 v2, ...]."""
    g = lambda v: v.reshape(groups, v.shape[0] // groups, *v.shape[1:])
    return jnp.concatenate([g(v1), g(v2)], axis=1).reshape(-1, *v1.shape[1:])


def _views_of(out, groups: int):
    """The inverse of _by_group on an output (2B, D): (view-1 rows, view-2 rows), each (B, D) in image order."""
    o = out.reshape(groups, -1, *out.shape[1:])
    half = o.shape[1] // 2
    flat = lambda a: a.reshape(-1, *out.shape[1:])
    return flat(o[:, :half]), flat(o[:, half:])


def loss_fn(model: Encoder, cfg: ByolConfig, groups: int = 1):
    def loss(params, state, batch, rng):
        v1, v2 = two_views(rng, batch["x"], cfg.augment)
        x = _by_group(v1, v2, groups)  # one pass: BN statistics over both views, as the reference
        (_, _, p), stats = apply_grouped(model, params, state.batch_stats, x, groups, predict=True)
        (_, z_t, _), t_stats = apply_grouped(model, state.extra["target_params"], state.extra["target_stats"], x,
                                             groups)
        (p1, p2), (z1, z2) = _views_of(p, groups), _views_of(jax.lax.stop_gradient(z_t), groups)
        value = regression_loss(p1, z2).mean() + regression_loss(p2, z1).mean()
        extra = {**state.extra, "target_stats": t_stats}
        return value, {"batch_stats": stats, "extra": extra, "metrics": {"loss": value}}
    return loss


def after_update(cfg: ByolConfig, total_steps: int):
    def move_target(state):
        tau = tau_schedule(state.step - 1, total_steps, cfg.tau_base)  # the rate of the step just taken
        return state.replace(extra={**state.extra, "target_params": ema(state.extra["target_params"],
                                                                        state.params, tau)})
    return move_target
