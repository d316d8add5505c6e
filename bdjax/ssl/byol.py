"""BYOL on the training core: the online network (encoder + projector + predictor) is trained; the target
network (an EMA of the online parameters, predictor unused) is `TrainState.extra`:

    extra = {"target_params", "target_stats"}

The EMA rate follows the cosine ramp tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, reaching 1 at the last
step K; the loss is the symmetrised 2 - 2 cos(p_online(v1), z_target(v2)) + (v1 <-> v2). BatchNorm uses the
statistics of the whole batch (BYOL uses synchronised BN across devices, which a jitted global batch is).
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
    augment: AugmentConfig = AugmentConfig()

    def validate(self) -> "ByolConfig":
        if not 0 <= self.tau_base <= 1:
            raise ConfigError(f"byol.tau_base must be in [0, 1], got {self.tau_base}")
        if min(self.dim, self.hidden, self.predictor_hidden) < 1:
            raise ConfigError("byol.dim, byol.hidden and byol.predictor_hidden must be positive")
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


def loss_fn(model: Encoder, cfg: ByolConfig):
    def loss(params, state, batch, rng):
        v1, v2 = two_views(rng, batch["x"], cfg.augment)
        x = jnp.concatenate([v1, v2])  # one pass: BN statistics over both views, as the reference
        (_, _, p), stats = apply_grouped(model, params, state.batch_stats, x, 1, predict=True)
        (_, z_t, _), t_stats = apply_grouped(model, state.extra["target_params"], state.extra["target_stats"], x, 1)
        z_t = jax.lax.stop_gradient(z_t)
        B = v1.shape[0]
        value = regression_loss(p[:B], z_t[B:]).mean() + regression_loss(p[B:], z_t[:B]).mean()
        extra = {**state.extra, "target_stats": t_stats}
        return value, {"batch_stats": stats, "extra": extra, "metrics": {"loss": value}}
    return loss


def after_update(cfg: ByolConfig, total_steps: int):
    def move_target(state):
        tau = tau_schedule(state.step - 1, total_steps, cfg.tau_base)  # the rate of the step just taken
        return state.replace(extra={**state.extra, "target_params": ema(state.extra["target_params"],
                                                                        state.params, tau)})
    return move_target
