"""When does MGDA train a blind backdoor, and when does it fail? (backdoors101 issue 17: MGDA from scratch gave
CIFAR-10 main accuracy 18%, GTSRB 5.7%; the answer there was fixed loss scales.)

Every row trains from scratch with the same recipe as the clean model, pixel pattern, constant label 8; the rows
vary the balancing: MGDA with each normalisation (loss+, loss, l2, none), fixed scales 0.5 / 0.5, and MGDA (loss+ and
none) with the threshold switch T = 1 (the attack waits until the running mean of the main loss is below 1).

    python experiments/blind_mgda_ablation.py --out runs/blind_mgda_ablation --scale small   # MNIST subset, CPU
    python experiments/blind_mgda_ablation.py --out runs/blind_mgda_ablation_c10 --scale full  # CIFAR-10, ResNet-18

small: 10000 MNIST training images, mnist_cnn (8 / 16 filters, 64 hidden), 2 epochs, SGD lr 0.05. full: CIFAR-10,
ResNet-18, 30 epochs (the regime of the issue's report).
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import apply_overrides
from bdjax.pipelines import blind

ROWS = ("normalization=loss+", "normalization=loss", "normalization=l2", "normalization=none", "balancing=fixed",
        "normalization=loss+/threshold=1.0", "normalization=none/threshold=1.0")


def get_config(scale: str) -> blind.BlindExperimentConfig:
    cfg = apply_overrides(blind.BlindExperimentConfig(experiment="blind_mgda_ablation"), [
        "mode=scratch", "blind.synthesizer=pixel_pattern", "blind.target=8", "train.batch_size=128",
        "train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine",
        "rows=" + ",".join(ROWS),
    ])
    if scale == "small":
        return apply_overrides(cfg, ["data.dataset=mnist", "data.n_train=10000", "train.model=mnist_cnn",
                                     "train.model_options=width=8,hidden=64", "train.epochs=2", "train.lr=0.05"])
    return apply_overrides(cfg, ["data.dataset=cifar10", "train.model=resnet18", "train.epochs=30", "train.lr=0.1",
                                 "train.augment=crop_flip", "train.weight_decay=2e-4"])


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, runner=blind.run, description=__doc__))
