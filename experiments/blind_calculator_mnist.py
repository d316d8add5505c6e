"""The blind backdoor's MNIST calculator (seeds/004 'Calculator (full, SGD)'): two digits side by side (28x56),
the main task reads the two-digit number (100 classes); with the pixel pattern the blind model outputs their sum
(row label=sum) or product (label=product) instead. T = inf, MGDA (loss+).

    python experiments/blind_calculator_mnist.py --out runs/blind_calculator --scale small   # 2 CPU cores
    python experiments/blind_calculator_mnist.py --out runs/blind_calculator_full --scale full

small: 20000 training pairs of MNIST train digits, 5000 test pairs of test digits, mnist_cnn (16 / 32 filters,
128 hidden); theta 3 epochs, then each row fine-tunes theta for 1 epoch (SGD, lr 0.01, momentum 0.9) with the blind
loss, against theta fine-tuned the same way without it (with Adam, lr 2e-4: main 94.1% -> 74.0%, sum 6.0%). From scratch with T = inf at this size MGDA did not learn the sum
(6000 pairs, 3 epochs, 8 filters: main 0.69 -> 0.53, backdoor 0.08; the backdoor needs the digits read first).
full: the seed's row, from scratch (SGD, T = inf): 60000 pairs, the full-width mnist_cnn, 10 epochs, plus a
fixed-scale row.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import apply_overrides
from bdjax.pipelines import blind


def get_config(scale: str) -> blind.BlindExperimentConfig:
    cfg = apply_overrides(blind.BlindExperimentConfig(experiment="blind_calculator_mnist"), [
        "data.dataset=mnist", "task=calculator", "mode=scratch", "blind.synthesizer=pixel_pattern",
        "blind.normalization=loss+", "train.model=mnist_cnn", "train.batch_size=128", "train.optimizer=sgd",
        "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine",
        "rows=label=sum,label=product",
    ])
    if scale == "small":
        return apply_overrides(cfg, ["calculator_n_train=20000", "calculator_n_test=5000", "train.epochs=3",
                                     "train.model_options=width=16,hidden=128", "mode=finetune", "finetune.epochs=1",
                                     "finetune.optimizer=sgd", "finetune.lr=0.01", "finetune.momentum=0.9", "finetune.weight_decay=0",
                                     "finetune.schedule=constant", "finetune.batch_size=128"])
    return apply_overrides(cfg, ["calculator_n_train=60000", "calculator_n_test=10000", "train.epochs=10",
                                 "rows=label=sum,label=product,label=sum/balancing=fixed"])


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, runner=blind.run, description=__doc__))
