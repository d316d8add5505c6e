"""ULP sweep over pattern learning rates and feature maps on the zoos of an existing ULP run (no zoo is retrained).

    python scripts/sweep_ulp.py --run runs/ulp_mnist --M 10 --epochs 150 --pattern-lrs 0.0154,1,10 \
        --features logits,log_softmax

For each (features, pattern learning rate): meta-train on the run's train zoo (same train/val split as the run),
keep the best val epoch, print the test-zoo AUC. The classifier keeps the run's learning rate unless
--classifier-lr is given. The last line is one JSON object {"features/pattern_lr": test AUC}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("BDJAX_PROGRESS", "0")

from bdjax.config import from_dict  # noqa: E402
from bdjax.data import load_dataset  # noqa: E402
from bdjax.defenses import ulp  # noqa: E402
from bdjax.models import get_model  # noqa: E402
from bdjax.pipelines import ulp as pipe  # noqa: E402
from bdjax.zoo.store import ZooStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder of bdjax.pipelines.ulp (config.json, zoo_train/, zoo_test/)")
    ap.add_argument("--M", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--pattern-lrs", default="0.0154,1,10,100")
    ap.add_argument("--features", default=None, help="comma-separated: logits, log_softmax (default: the run's)")
    ap.add_argument("--classifier-lr", type=float, default=None, help="default: the run's")
    args = ap.parse_args()
    run = Path(args.run)
    cfg = from_dict(pipe.ULPExperimentConfig, json.loads((run / "config.json").read_text()))
    ds = load_dataset(cfg.data.dataset, data_root=cfg.data.data_root)
    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())
    tr_all, tr_lab, _ = pipe._kept(ZooStore.open(run / "zoo_train"))
    te_v, te_y, _ = pipe._kept(ZooStore.open(run / "zoo_test"))
    i_tr, i_va = pipe.split_train_val(tr_lab, cfg.val_fraction, cfg.seed)
    out = {}
    classifier_lr = args.classifier_lr or cfg.ulp.classifier_lr
    grid = [(f, float(lr)) for f in (args.features or cfg.ulp.features).split(",") for lr in args.pattern_lrs.split(",")]
    for features, lr in grid:
        ucfg = dataclasses.replace(cfg.ulp, n_patterns=args.M, epochs=args.epochs, pattern_lr=lr, features=features,
                                   classifier_lr=classifier_lr, seed=cfg.seed).validate()
        t0 = time.time()
        res = ulp.train_ulp(model, pipe._select(tr_all, i_tr), tr_lab[i_tr], pipe._select(tr_all, i_va), tr_lab[i_va],
                            ds.image_shape, ds.num_classes, ucfg)
        auc = ulp.evaluate_ulp(model, res, te_v, te_y)["auc"]
        out[f"{features}/{lr}"] = round(auc, 4)
        print(f"{features}, pattern_lr={lr}: best epoch {res.best_epoch}, val acc {res.val_acc:.3f}, "
              f"last train acc {res.history[-1]['train_acc']:.3f}, test AUC {auc:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
    print(json.dumps({"M": args.M, "epochs": args.epochs, "classifier_lr": classifier_lr, "test_auc": out}))


if __name__ == "__main__":
    main()
