"""RotNet (Gidaris et al. 2018), the contrast case: predict which of 0/90/180/270 degrees an image was rotated
by. Seeds/000 reports the SSL backdoor fails on it. The backbone is a bdjax model with 4 outputs."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bdjax.errors import ConfigError
from bdjax.train.augment import augment


@dataclasses.dataclass(frozen=True)
class RotNetConfig:
    augment: str = "crop_flip"  # the light supervised augmentation (bdjax.train.augment) before rotating

    def validate(self) -> "RotNetConfig":
        if self.augment not in ("none", "flip", "crop", "crop_flip"):
            raise ConfigError(f"rotnet.augment must be none, flip, crop or crop_flip, got {self.augment!r}")
        return self


class RotNet(nn.Module):
    backbone: nn.Module  # num_classes = 4

    def __call__(self, x, train: bool = False):
        return self.backbone(x, train=train)

    def features(self, x):
        _, feats = self.backbone(x, train=False, features=True)
        return feats["penultimate"]


def rotations(x):
    """(B, H, W, C) square images -> (4B, ...) rotated by 0, 90, 180, 270 degrees, labels (4B,) = 0..3."""
    xs = jnp.concatenate([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])
    return xs, jnp.repeat(jnp.arange(4, dtype=jnp.int32), x.shape[0])


def loss_fn(model: RotNet, cfg: RotNetConfig):
    def loss(params, state, batch, rng):
        k_aug, k_drop = jax.random.split(rng)
        xs, ys = rotations(augment(k_aug, batch["x"], cfg.augment))
        logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats}, xs, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": k_drop})
        value = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == ys)
        return value, {"batch_stats": upd["batch_stats"], "metrics": {"loss": value, "acc": acc}}
    return loss
