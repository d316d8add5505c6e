"""The blind backdoor's MNIST calculator (seeds/004 'Calculator (full, SGD)'): two digits side by side (28x56),
the main task reads the two-digit number (100 classes); with the pixel pattern the blind model outputs their sum
(row label=sum) or product (label=product) instead. T = inf, MGDA (loss+).

    python experiments/blind_calculator_mnist.py --out runs/blind_calculator --scale small   # 2 CPU cores
    python experiments/blind_calculator_mnist.py --out runs/blind_calculator_full --scale full

small: 40000 training pairs of MNIST train digits, 5000 test pairs of test digits, mnist_cnn (16 / 32 filters,
512 hidden); theta 3 epochs, then theta fine-tuned for 5 epochs (SGD, lr 0.02 cosine, momentum 0.9) with the blind
loss, against theta fine-tuned the same way without it; the sum row only (20 min; add the product row with
`rows=label=sum,label=product`, not measured at this size). Measured on the way there (sum row): 20000 pairs, 128
hidden, 1 fine-tune epoch at lr 0.01: main 93.6% -> 72.8%, sum 44%; 4 epochs: 93.8% -> 89.7%, 82%; 256 hidden, 5
cosine epochs at lr 0.02: 94.0% -> 91.8%, 87.5%: the sum needs both digits read, so it is bounded by the main
accuracy and gained most from more pairs and a wider hidden layer. A fresh Adam state (lr 2e-4) broke the main task
(94.1% -> 74.0%, sum 6.0%); from scratch with T = inf at 6000 pairs MGDA did not learn the sum (main 0.69 -> 0.53,
backdoor 0.08).
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
        return apply_overrides(cfg, ["calculator_n_train=40000", "calculator_n_test=5000", "train.epochs=3",
                                     "train.model_options=width=16,hidden=512", "mode=finetune", "finetune.epochs=5",
                                     "finetune.optimizer=sgd", "finetune.lr=0.02", "finetune.momentum=0.9",
                                     "finetune.weight_decay=0", "finetune.schedule=cosine", "finetune.batch_size=128",
                                     "rows=label=sum"])
    return apply_overrides(cfg, ["calculator_n_train=60000", "calculator_n_test=10000", "train.epochs=10",
                                 "rows=label=sum,label=product,label=sum/balancing=fixed"])


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, runner=blind.run, description=__doc__))
