"""ULP sweep over any `ulp.*` fields on the zoos of an existing ULP run (no zoo is retrained).

    python scripts/sweep_ulp.py --run runs/ulp_mnist ulp.n_patterns=10 ulp.pattern_lr=0.0154,1,10 \
        ulp.features=logits,log_softmax

Each argument is `ulp.field=v1,v2,...`; every combination is meta-trained on the run's train zoo (same
train/val split as the run, best val epoch kept) and its test-zoo AUC printed. Fields not named keep the run's
values (M defaults to 10). The last line is one JSON object with a row per combination.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("BDJAX_PROGRESS", "0")

from bdjax.config import apply_overrides, from_dict  # noqa: E402
from bdjax.data import load_dataset  # noqa: E402
from bdjax.defenses import ulp  # noqa: E402
from bdjax.errors import ConfigError  # noqa: E402
from bdjax.models import get_model  # noqa: E402
from bdjax.pipelines import ulp as pipe  # noqa: E402
from bdjax.zoo.store import ZooStore  # noqa: E402


def grid(items: list[str]) -> list[list[str]]:
    """['ulp.a=1,2', 'ulp.b=x'] -> [['ulp.a=1', 'ulp.b=x'], ['ulp.a=2', 'ulp.b=x']]."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.startswith("ulp."):
            raise ConfigError(f"sweep argument {item!r} must look like ulp.field=v1,v2")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder of bdjax.pipelines.ulp (config.json, zoo_train/, zoo_test/)")
    ap.add_argument("fields", nargs="*", help="ulp.field=v1,v2,... (e.g. ulp.pattern_lr=1,10)")
    args = ap.parse_args()
    run = Path(args.run)
    base = from_dict(pipe.ULPExperimentConfig, json.loads((run / "config.json").read_text()))
    base = dataclasses.replace(base, ulp=dataclasses.replace(base.ulp, n_patterns=10))
    sets = grid(args.fields)
    # on the ulp section itself: the run config offers no ulp.n_patterns (its patterns list sets it per row)
    combos = [dataclasses.replace(base, ulp=apply_overrides(base.ulp, [o.removeprefix("ulp.") for o in c])).validate()
              for c in sets]  # every typo before any training

    ds = load_dataset(base.data.dataset, data_root=base.data.data_root)
    model = get_model(base.train.model, ds.num_classes, **base.train.model_kwargs())
    (tr_v, tr_y), (va_v, va_y), (te_v, te_y) = pipe.meta_zoos(base, ZooStore.open(run / "zoo_train"),
                                                              ZooStore.open(run / "zoo_test"))
    rows = []
    for c, cfg in zip(sets, combos):
        t0 = time.time()
        res = ulp.train_ulp(model, tr_v, tr_y, va_v, va_y, ds.image_shape, ds.num_classes, cfg.ulp,
                            init_patterns=pipe.initial_patterns(cfg, ds, cfg.ulp.n_patterns))
        auc = ulp.evaluate_ulp(model, res, te_v, te_y)["auc"]
        rows.append({"set": c, "best_epoch": res.best_epoch, "val_acc": round(res.val_acc, 4), "test_auc": round(auc, 4)})
        print(f"{' '.join(c) or '(run config)'}: best epoch {res.best_epoch}, val acc {res.val_acc:.3f}, "
              f"test AUC {auc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps({"run": str(run), "M": base.ulp.n_patterns, "rows": rows}))


if __name__ == "__main__":
    main()
