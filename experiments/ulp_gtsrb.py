"""Universal Litmus Patterns on GTSRB (43 classes): the GTSRB row of the ULP table (seeds/000), AUC for
M = 1, 5, 10 against noise inputs and Neural Cleanse, on a test zoo poisoned with triggers the detector never saw.

    python experiments/ulp_gtsrb.py --out runs/ulp_gtsrb --scale small      # 2 CPU cores (see small below)
    python experiments/ulp_gtsrb.py --out runs/ulp_gtsrb_full --scale full   # the paper's setting, a GPU

Data: GTSRB 32x32 from the data root. Zoos as in ulp_cifar10.py (5x5 ULP masks at a corner on every image of
one source class, relabelled to a target; masks 00-09 train/val, 1-10 test). Pipeline: bdjax.pipelines.ulp.

Scales:
- small: a 2-conv CNN (mnist_cnn with 8/16 filters, 32 hidden units), Adam 5e-3, one epoch over 20000 training
  images per model (a 10-model try: clean accuracy 0.77, ASR 0.76 on average; a backdoor on a rare source class
  is often not learned, and the keep-filters drop those models, as the reference does); zoo 60 clean + 60
  poisoned (80 % meta-train, 20 % meta-val), test zoo 20 + 20; keep-filters clean accuracy >= 0.5 and ASR >= 0.9;
  ULP 150 epochs on log-softmax features, as experiments/ulp_mnist.py (why there), patterns started as in
  experiments/ulp_cifar10.py (ulp.init=stamped, pattern lr 1; on the zoos of a uniform-noise run: M = 10 AUC
  0.786 against 0.598 with the reference's start and rates, scripts/sweep_ulp.py); Neural Cleanse (43 labels
  per model) on 6 + 6 test models with a cut budget.
- full: the ULP CIFAR network (ulp_cnn), Adam 1e-2, batch 64, 30 epochs on all training images; keep-filters
  0.9 / 0.9; zoo 500 + 500, test zoo 100 + 100; ULP 1000 epochs; Neural Cleanse with the official budget.
"""
from bdjax.cli import experiment_main
from bdjax.config import apply_overrides
from bdjax.pipelines.ulp import ULPExperimentConfig, run_ulp_experiment

COMMON = ["data.dataset=gtsrb", "train.optimizer=adam", "train.batch_size=64", "train.schedule=constant",
          "train.weight_decay=0.0", "zoo.min_asr=0.9",
          "zoo.val_fraction=0.1"]  # the keep-filters read 10% of each class's training images, held out
SCALES = {
    "small": ["train.model=mnist_cnn", "train.model_options=width=8,hidden=32", "train.lr=0.005",
              "data.n_train=20000", "data.n_test=2000", "train.epochs=1", "zoo.n_clean=60", "zoo.n_poisoned=60",
              "zoo.chunk_size=20", "zoo.min_clean_acc=0.5", "test_zoo.n_clean=20", "test_zoo.n_poisoned=20",
              "ulp.epochs=150", "ulp.features=log_softmax", "ulp.init=stamped", "ulp.pattern_lr=1",
              "baselines.nc_models=12", "baselines.nc.batch_size=16",
              "baselines.nc.steps_per_check=5", "baselines.nc.max_checks=40", "baselines.nc_images=1000"],
    "full": ["train.model=ulp_cnn", "train.lr=0.01", "train.epochs=30", "zoo.n_clean=500", "zoo.n_poisoned=500",
             "zoo.chunk_size=50", "zoo.min_clean_acc=0.9", "test_zoo.n_clean=100", "test_zoo.n_poisoned=100",
             "ulp.epochs=1000"],
}


def get_config(scale: str) -> ULPExperimentConfig:
    return apply_overrides(ULPExperimentConfig(experiment="ulp_gtsrb", scale=scale), COMMON + SCALES[scale])


if __name__ == "__main__":
    raise SystemExit(experiment_main(get_config, run_ulp_experiment, description=__doc__))
