"""BadNets on CIFAR-10: a 3x3 white patch in the bottom-right corner, all-to-one target 0, 5% of the training set.

    python experiments/badnets_cifar10.py --out runs/badnets_cifar10 --scale small   # compact CNN, 2 CPU cores
    python experiments/badnets_cifar10.py --out runs/badnets_cifar10_full --scale full  # ResNet-18, a GPU

full follows seeds/003: ResNet-18, SGD momentum 0.9, weight decay 2e-4, lr 0.1 stepped down, batch 128,
pad-crop + flip augmentation. The CIFAR-10 copy in ../shared is JPEG-compressed (quality 75), which costs
about 1-2 points of clean accuracy against published numbers.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import ExperimentConfig, apply_overrides


def get_config(scale: str) -> ExperimentConfig:
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


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, description=__doc__))
