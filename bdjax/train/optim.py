"""Optimisers and learning-rate schedules from a TrainConfig (optax)."""
from __future__ import annotations

import jax
import optax

from bdjax.config import TrainConfig
from bdjax.errors import ConfigError


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, decay_steps=max(total, 1))
    if cfg.schedule == "step":
        ms = list(cfg.lr_milestones)
        bad = [m for m in ms if not 0 < m < cfg.epochs]
        if bad or not ms:
            raise ConfigError(f"train.lr_milestones must be epochs strictly between 0 and {cfg.epochs} for the step "
                              f"schedule, got {cfg.lr_milestones}")
        if ms != sorted(set(ms)):  # optax would merge duplicates into one boundary: gamma applied once, not twice
            raise ConfigError(f"train.lr_milestones must be strictly increasing epochs, got {cfg.lr_milestones}")
        return optax.piecewise_constant_schedule(cfg.lr, {m * steps_per_epoch: cfg.lr_gamma for m in cfg.lr_milestones})
    raise ConfigError(f"unknown train.schedule {cfg.schedule!r}; expected constant, step or cosine")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum or Adam; weight decay is added to the gradient before the optimiser (L2, as in
    PyTorch's SGD/Adam `weight_decay`, which the papers' reference code uses), not decoupled AdamW.
    With train.trainable, only those top-level parameters move (the others get zero updates)."""
    lr = make_schedule(cfg, steps_per_epoch)
    decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay > 0 else []
    if cfg.optimizer == "sgd":
        tx = optax.chain(*decay, optax.sgd(lr, momentum=cfg.momentum or None))
    elif cfg.optimizer == "adam":
        tx = optax.chain(*decay, optax.adam(lr))
    else:
        raise ConfigError(f"unknown train.optimizer {cfg.optimizer!r}; expected sgd or adam")
    if not cfg.trainable:
        return tx
    trainable = set(cfg.trainable)

    def labels(params):
        unknown = sorted(trainable - set(params))
        if unknown:
            raise ConfigError(f"train.trainable names {unknown} that the model does not have; its parameters are "
                              f"{', '.join(sorted(params))}")
        return {name: jax.tree.map(lambda _: "train" if name in trainable else "frozen", sub)
                for name, sub in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
