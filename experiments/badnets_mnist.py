"""BadNets on MNIST: a 3x3 white patch in the bottom-right corner, all-to-one target 0, 1% of the training set.

    python experiments/badnets_mnist.py --out runs/badnets_mnist --scale small
    python experiments/badnets_mnist.py --out runs/badnets_mnist_full --scale full data.data_root=/path/to/datasets

MNIST comes from the data root (default ../shared/datasets, or $BDJAX_DATA_ROOT), else TFDS.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import ExperimentConfig
from bdjax import recipes


def get_config(scale: str) -> ExperimentConfig:
    return recipes.badnets_mnist(scale)


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, description=__doc__))
