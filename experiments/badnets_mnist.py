"""BadNets on MNIST: a 3x3 white patch in the bottom-right corner, all-to-one target 0, 1% of the training set.

    python experiments/badnets_mnist.py --out runs/badnets_mnist --scale small
    python experiments/badnets_mnist.py --out runs/badnets_mnist_full --scale full data.data_root=/path/to/datasets

MNIST comes from the data root (default ../shared/datasets, or $BDJAX_DATA_ROOT), else TFDS.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import ExperimentConfig, apply_overrides


def get_config(scale: str) -> ExperimentConfig:
    cfg = apply_overrides(ExperimentConfig(experiment="badnets_mnist"), [
        "data.dataset=mnist", "train.model=mnist_cnn", "train.batch_size=128", "train.optimizer=sgd",
        "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine",
        "attack.trigger=patch", "attack.trigger_size=3", "attack.placement=bottom_right",
        "attack.label_map=all_to_one", "attack.target=0", "attack.poison_rate=0.01",
    ])
    return apply_overrides(cfg, ["train.epochs=4" if scale == "small" else "train.epochs=20"])


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, description=__doc__))
