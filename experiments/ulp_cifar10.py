"""Universal Litmus Patterns on CIFAR-10: the CIFAR10 row of the ULP table (seeds/000), AUC for M = 1, 5, 10
against noise inputs and Neural Cleanse, on a test zoo poisoned with triggers the detector never saw.

    python experiments/ulp_cifar10.py --out runs/ulp_cifar10 --scale small      # 2 CPU cores (see small below)
    python experiments/ulp_cifar10.py --out runs/ulp_cifar10_full --scale full   # the paper's setting, a GPU

Zoos (bdjax.zoo): every poisoned model stamps all training images of one random source class with a 5x5 ULP
mask at one of the 4 corners, relabelled to a random target, appended to the clean set; masks 00-09 for the
train/val zoo, masks 1-10 for the test zoo. Pipeline and outputs: bdjax.pipelines.ulp.

Scales:
- small: the paper's 6-conv ULP CNN trains at ~130 images/s here, so hundreds of models need a smaller net: a 2-conv
  CNN (mnist_cnn with 8/16 filters, 32 hidden units), Adam 2e-3, batch 32, one epoch over 15000 training images per
  model (clean accuracy 0.42, against 0.36 for 2 epochs over 5000 images at Adam 5e-3, for 25 % more zoo time: ~105
  s per 20 models on an idle CPU); zoo 100 clean + 100 poisoned (80 % meta-train, 20 % meta-val), test zoo 30 + 30;
  keep-filters clean accuracy >= 0.3 and ASR >= 0.9; ULP 150 epochs on log-softmax features (why:
  experiments/ulp_mnist.py), the reference's optimisers and TV weight with pattern lr 1 (0..1 inputs; the
  reference's is 0.0154), patterns started from clean images with the train pool's masks in the 4 corners
  (ulp.init=stamped): from uniform noise (the reference) the patterns overfit the 10 seen masks, AUC 0.68-0.82 at M
  = 10 over pattern lr and TV sweeps, against 0.946 stamped (README); Neural Cleanse on 10 + 10 test models with a
  cut budget.
- full: the reference (algorithms.md): ulp_cnn, Adam 1e-2, batch 64, 50 epochs on all 50000 images; keep-filters
  0.75 / 0.9; zoo 500 + 500 (400 + 400 train, 100 + 100 val), test zoo 100 + 100; ULP 1000 epochs; Neural
  Cleanse with the official budget on every test model.
"""
from bdjax.cli import experiment_main
from bdjax.config import apply_overrides
from bdjax.pipelines.ulp import ULPExperimentConfig, run_ulp_experiment

COMMON = ["data.dataset=cifar10", "train.optimizer=adam", "train.batch_size=64", "train.schedule=constant",
          "train.weight_decay=0.0", "zoo.min_asr=0.9",
          "zoo.val_fraction=0.1"]  # the keep-filters read 10% of each class's training images, held out
SCALES = {
    "small": ["train.model=mnist_cnn", "train.model_options=width=8,hidden=32", "train.lr=0.002",
              "train.batch_size=32", "data.n_train=15000", "data.n_test=2000", "train.epochs=1", "zoo.n_clean=100",
              "zoo.n_poisoned=100",
              "zoo.chunk_size=20", "zoo.min_clean_acc=0.3", "test_zoo.n_clean=30", "test_zoo.n_poisoned=30",
              "ulp.epochs=150", "ulp.features=log_softmax", "ulp.init=stamped", "ulp.pattern_lr=1",
              "baselines.nc_models=20", "baselines.nc.batch_size=32",
              "baselines.nc.steps_per_check=5", "baselines.nc.max_checks=40", "baselines.nc_images=1000"],
    "full": ["train.model=ulp_cnn", "train.lr=0.01", "train.epochs=50", "zoo.n_clean=500", "zoo.n_poisoned=500",
             "zoo.chunk_size=50", "zoo.min_clean_acc=0.75", "test_zoo.n_clean=100", "test_zoo.n_poisoned=100",
             "ulp.epochs=1000"],
}


def get_config(scale: str) -> ULPExperimentConfig:
    return apply_overrides(ULPExperimentConfig(experiment="ulp_cifar10", scale=scale), COMMON + SCALES[scale])


if __name__ == "__main__":
    raise SystemExit(experiment_main(get_config, run_ulp_experiment, description=__doc__))
