"""MoCo v2 on the training core: the query encoder is trained, the key encoder (an EMA of it) and the queue of
negatives are `TrainState.extra`, carried through the step.

    extra = {"key_params", "key_stats", "queue" (K, dim) unit rows, "ptr" int32}

Order within a step (as the reference code): the key encoder is the EMA towards the query parameters *before*
this step's gradient update. bdjax applies the EMA in `after_update` (towards the new parameters) so the next
step's key encoder is exactly that.

Shuffle-BN: BatchNorm statistics are computed per group of `bn_groups` (per device when the batch is sharded over
a data mesh with one group per device), and the key encoder sees the batch in a random order, so a query and its
positive key are normalised with statistics of different images. The default (bn_groups=0) is one group per
device of the data mesh: per-device statistics with no communication, and the key shuffle moves keys across
devices. On one device that is plain whole-batch BN (the shuffle then changes nothing); bn_groups=G > 1 simulates
G devices on one (slices of the batch), e.g. 8 as in the single-GPU MoCo CIFAR demos.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.errors import ConfigError
from bdjax.ssl.augment import AugmentConfig, two_views
from bdjax.ssl.encoder import Encoder, apply_grouped, ema, l2_normalize


@dataclasses.dataclass(frozen=True)
class MocoConfig:
    dim: int = 128
    hidden: int = 2048
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    bn_groups: int = 0  # BatchNorm groups (Shuffle-BN); 0 = one per device of the data mesh
    augment: AugmentConfig = AugmentConfig()

    def validate(self, batch_size: int) -> "MocoConfig":
        if self.queue_size < 1 or self.queue_size % batch_size:
            raise ConfigError(f"moco.queue_size={self.queue_size} must be a positive multiple of the batch size "
                              f"{batch_size} (the queue is filled one whole batch at a time)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"moco.momentum must be in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            raise ConfigError(f"moco.temperature must be positive, got {self.temperature}")
        if self.bn_groups < 0 or (self.bn_groups and batch_size % self.bn_groups):
            raise ConfigError(f"moco.bn_groups={self.bn_groups} must divide the batch size {batch_size}")
        self.augment.validate()
        return self


def encoder(backbone, cfg: MocoConfig) -> Encoder:
    return Encoder(backbone, cfg.hidden, cfg.dim)


def infonce(q, k, queue, temperature):
    """Mean InfoNCE of unit queries q (B, D) with their positive keys k (B, D) against the queue (K, D):
    cross-entropy of [q.k, q.queue] / T with the positive at index 0. Returns (loss, accuracy of the positive)."""
    l_pos = jnp.sum(q * k, axis=1, keepdims=True)
    l_neg = q @ queue.T
    logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(len(q), jnp.int32)).mean()
    return loss, jnp.mean(jnp.argmax(logits, 1) == 0)


def enqueue(queue, ptr, keys):
    """Replace the oldest B rows (from ptr) with the new keys; returns (queue, next ptr). K % B == 0."""
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
    return queue, (ptr + keys.shape[0]) % queue.shape[0]


def init_extra(key, variables, cfg: MocoConfig) -> dict:
    """Key encoder = a copy of the query encoder; a queue of random unit vectors (as the reference code)."""
    queue = l2_normalize(jax.random.normal(key, (cfg.queue_size, cfg.dim)))
    return {"key_params": variables["params"], "key_stats": variables.get("batch_stats", {}), "queue": queue,
            "ptr": jnp.zeros((), jnp.int32)}


def loss_fn(model: Encoder, cfg: MocoConfig, groups: int = 1):
    """The core loss: batch["x"] float images in [0, 1]; no labels."""
    def loss(params, state, batch, rng):
        k_aug, k_shuffle = jax.random.split(rng)
        x_q, x_k = two_views(k_aug, batch["x"], cfg.augment)
        (_, z_q, _), stats = apply_grouped(model, params, state.batch_stats, x_q, groups)
        q = l2_normalize(z_q)
        # Shuffle-BN: the keys go through the key encoder in a random order, then back
        perm = jax.random.permutation(k_shuffle, x_k.shape[0])
        (_, z_k, _), key_stats = apply_grouped(model, state.extra["key_params"], state.extra["key_stats"],
                                               x_k[perm], groups)
        k = jax.lax.stop_gradient(l2_normalize(z_k)[jnp.argsort(perm)])
        value, acc = infonce(q, k, state.extra["queue"], cfg.temperature)
        queue, ptr = enqueue(state.extra["queue"], state.extra["ptr"], k)
        extra = {**state.extra, "key_stats": key_stats, "queue": queue, "ptr": ptr}
        return value, {"batch_stats": stats, "extra": extra, "metrics": {"loss": value, "acc": acc}}
    return loss


def after_update(cfg: MocoConfig):
    def move_key_encoder(state):
        key_params = ema(state.extra["key_params"], state.params, cfg.momentum)
        return state.replace(extra={**state.extra, "key_params": key_params})
    return move_key_encoder
