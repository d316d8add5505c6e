"""Blind backdoors against defences (seeds/004 'Evading known defenses'): per evaded defence, the main accuracy
drop, the backdoor accuracy and the defence's own verdict, plus what all four of bdjax's defences say.

    python experiments/blind_evasion.py --out runs/blind_evasion --scale small   # MNIST, 2 CPU cores
    python experiments/blind_evasion.py --out runs/blind_evasion_full --scale full

Rows: none (the blind model, no evasion), neural_cleanse (the NC evasion task: an inner Neural Cleanse step on
the backdoor label each training step, then true labels on the reversed trigger), gradient_shaping (the defender
trains with per-example clipping S = 1 and noise sigma = 0.1; the clean reference is trained the same way).
Pixel pattern, constant label 8, MGDA (loss+), T = inf. mnist_cnn has no BatchNorm, so per-example gradients
(gradient shaping) are defined.

As the seed's evasion rows (an ImageNet model fine-tuned), theta is trained clean and every row fine-tunes it
(SGD, lr 0.01, momentum 0.9; a fresh Adam state at lr 2e-4 cost 6 points of main accuracy without evasion and 30
with it); each row's clean reference is theta fine-tuned the same way without the attack (for gradient
shaping: with gradient shaping). From scratch with T = inf the evasion task fights the main one: an untrained model
is fooled by any large reversed mask, and MGDA then drops the main task (main accuracy 25% on the digits).

small: MNIST, 20000 training images, mnist_cnn 16 / 32 filters, 128 hidden, theta 3 epochs, rows 3 epochs (with 1,
Neural Cleanse still flagged the evaded model: anomaly index 3.31, the reversed mask only 4.7x larger); Neural
Cleanse with batch 16, 10 steps per check-point, at most 30 check-points on 500 test images (each NC step sends
10 labels x 16 images through the model; 100 check-points of batch 32 took over 20 minutes per row on the shared
cores). full: all 60000
images, the full-width mnist_cnn, 10 epochs, rows 2 epochs, Neural Cleanse with the official budget.
"""
import sys

from bdjax.cli import experiment_main
from bdjax.config import apply_overrides
from bdjax.pipelines import blind_evasion


def get_config(scale: str) -> blind_evasion.EvasionExperimentConfig:
    cfg = apply_overrides(blind_evasion.EvasionExperimentConfig(), [
        "data.dataset=mnist", "blind.synthesizer=pixel_pattern", "blind.target=8", "blind.normalization=loss+",
        "train.model=mnist_cnn", "train.batch_size=128", "train.optimizer=sgd", "train.lr=0.05",
        "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine",
    ])
    if scale == "small":
        return apply_overrides(cfg, ["data.n_train=20000", "train.epochs=3", "train.model_options=width=16,hidden=128",
                                     "finetune.epochs=3", "finetune.batch_size=128", "finetune.optimizer=sgd",
                                     "finetune.lr=0.01", "finetune.momentum=0.9", "defense.nc.batch_size=16",
                                     "defense.nc.max_checks=30", "defense.nc_images=500"])
    return apply_overrides(cfg, ["train.epochs=10", "finetune.epochs=2", "finetune.batch_size=128",
                                 "defense.nc.steps_per_check=31", "defense.nc.max_checks=1000"])


if __name__ == "__main__":
    sys.exit(experiment_main(get_config, runner=blind_evasion.run, description=__doc__))
