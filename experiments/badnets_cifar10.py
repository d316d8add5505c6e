"""BadNets on CIFAR-10: a 3x3 white patch in the bottom-right corner, all-to-one target 0, 5% of the training set.

    python experiments/badnets_cifar10.py --out runs/badnets_cifar10 --scale small   # compact CNN, 2 CPU cores
    python experiments/badnets_cifar10.py --out runs/badnets_cifar10_full --scale full  # ResNet-18, a GPU

full follows seeds/003: ResNet-18, SGD momentum 0.9, weight decay 2e-4, lr 0.1 stepped down, batch 128,
pad-crop + flip augmentation. The CIFAR-10 copy in ../shared is JPEG-compressed (quality 75), which costs
about 1-2 points of clean accuracy against published numbers.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import ExperimentConfig
from bdjax import recipes


def get_config(scale: str) -> ExperimentConfig:
    return recipes.badnets_cifar10(scale)


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, description=__doc__))
