"""The BadNets training recipes shared by experiment scripts (attacks and the defenses evaluated on them).

Each returns the fully specified config for `scale` ("small": 2 CPU cores; "full": the paper's setting, a GPU);
experiments derive from them with `apply_overrides` instead of restating every field.
"""
from __future__ import annotations

from bdjax.config import ExperimentConfig, apply_overrides


def badnets_mnist(scale: str) -> ExperimentConfig:
    """MNIST, mnist_cnn, 3x3 white patch bottom-right, all-to-one target 0, 1% poisoned."""
    cfg = apply_overrides(ExperimentConfig(experiment="badnets_mnist"), [
        "data.dataset=mnist", "train.model=mnist_cnn", "train.batch_size=128", "train.optimizer=sgd",
        "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine",
        "attack.trigger=patch", "attack.trigger_size=3", "attack.placement=bottom_right",
        "attack.label_map=all_to_one", "attack.target=0", "attack.poison_rate=0.01",
    ])
    return apply_overrides(cfg, ["train.epochs=4" if scale == "small" else "train.epochs=20"])


def badnets_cifar10(scale: str) -> ExperimentConfig:
    """CIFAR-10, 3x3 white patch bottom-right, all-to-one target 0, 5% poisoned; small: cifar_cnn 10 epochs;
    full: seeds/003's ResNet-18 recipe (SGD 0.9, wd 2e-4, lr 0.1 stepped at 50/75, batch 128, crop+flip)."""
    cfg = apply_overrides(ExperimentConfig(experiment="badnets_cifar10"), [
        "data.dataset=cifar10", "train.batch_size=128", "train.optimizer=sgd", "train.momentum=0.9",
        "train.augment=crop_flip", "attack.trigger=patch", "attack.trigger_size=3",
        "attack.placement=bottom_right", "attack.label_map=all_to_one", "attack.target=0",
        "attack.poison_rate=0.05",
    ])
    if scale == "small":
        return apply_overrides(cfg, ["train.model=cifar_cnn", "train.epochs=10", "train.lr=0.05",
                                     "train.weight_decay=5e-4", "train.schedule=cosine"])
    return apply_overrides(cfg, ["train.model=resnet18", "train.epochs=100", "train.lr=0.1", "train.weight_decay=2e-4",
                                 "train.schedule=step", "train.lr_milestones=50,75", "train.lr_gamma=0.1"])
