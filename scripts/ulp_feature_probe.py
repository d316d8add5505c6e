"""Which features can a linear ULP classifier use? A check on a finished ULP run's zoos, with hand-made litmus images.

    python scripts/ulp_feature_probe.py --run runs/ulp_mnist [--oracle]

The litmus images are fixed, not learned: for every class, a real test image of that class with train-pool triggers
stamped in all 4 corners (2 images per class). Each zoo model's outputs on them are turned into features (raw
logits, as the reference's h sees them, or log-softmax), a logistic regression is fitted on the train zoo, and its
AUC on the test zoo (unseen triggers) is printed. A hand-made nonlinear score (the lowest true-class probability
over the images), the run's learned ULP patterns through the same logistic regression, and the oracle flip rate (the
largest share of a class that a stamped trigger flips, over triggers, corners and classes) bound what good litmus
images can show. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("BDJAX_PROGRESS", "0")

import bdjax  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bdjax import triggers as T  # noqa: E402
from bdjax.config import from_dict  # noqa: E402
from bdjax.defenses import ulp  # noqa: E402
from bdjax.defenses.metrics import roc_auc  # noqa: E402
from bdjax.models import get_model  # noqa: E402
from bdjax.pipelines.ulp import ULPExperimentConfig, _kept  # noqa: E402
from bdjax.zoo import ZooStore, plan  # noqa: E402
from bdjax.zoo.train import load_zoo_data, trigger_pool  # noqa: E402


def litmus_images(ds, pool, per_class: int = 2):
    """(classes * per_class) test images, each with a train trigger in all 4 corners; and their labels."""
    n = ds.num_classes * per_class
    z = ulp.stamped_images(ds.x_test, ds.y_test, ds.num_classes, pool.triggers(), n)
    return jnp.asarray(z), np.arange(n) % ds.num_classes


def per_model(model, variables, x, batch: int, out=lambda logits: logits) -> np.ndarray:
    """out(logits) of every zoo model on the images x, `batch` models at a time (rows: models)."""
    fn = jax.jit(jax.vmap(lambda v, x: out(model.apply(v, x, train=False)), (0, None)))
    n = jax.tree.leaves(variables)[0].shape[0]
    return np.concatenate([np.asarray(fn(jax.tree.map(lambda a: a[i:i + batch], variables), x))
                           for i in range(0, n, batch)])


def oracle_flip_rate(model, variables, ds, pool, per_class: int = 20, batch: int = 2) -> np.ndarray:
    """Per model: the largest share of one class's images that one trigger at one corner moves off their class."""
    xs = np.concatenate([ds.x_test[ds.y_test == c][:per_class] for c in range(ds.num_classes)])
    xs = jnp.asarray(xs, jnp.float32) / 255.0
    ys = np.repeat(np.arange(ds.num_classes), per_class)
    stamped = []
    for t in range(len(pool.names)):
        trig = pool.trigger(t)
        for corner in plan.CORNERS:
            r, c = T.corner_position(ds.image_shape, trig, corner)
            stamped.append(T.apply_batch(xs, trig, jnp.full(len(xs), r), jnp.full(len(xs), c)))
    preds = per_model(model, variables, jnp.concatenate(stamped), batch, out=lambda logits: jnp.argmax(logits, -1))
    flips = preds.reshape(len(preds), -1, ds.num_classes, per_class) != ys.reshape(ds.num_classes, per_class)
    return flips.mean(-1).max(axis=(1, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished bdjax ULP run (with zoo_train/ and zoo_test/)")
    ap.add_argument("--oracle", action="store_true", help="also the oracle flip rate (slower: every trigger x corner)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = from_dict(ULPExperimentConfig, json.loads((run / "config.json").read_text()))
    ds = load_zoo_data(cfg.zoo_config("train"))
    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())
    pool = trigger_pool(cfg.zoo_config("train"), ds.image_shape[-1])
    tr_v, tr_y = _kept(ZooStore.open(run / "zoo_train"))
    te_v, te_y = _kept(ZooStore.open(run / "zoo_test"))
    z, z_labels = litmus_images(ds, pool)

    from sklearn.linear_model import LogisticRegression

    out_tr, out_te = per_model(model, tr_v, z, 10), per_model(model, te_v, z, 10)
    result = {"run": str(run), "n_train_models": int(len(tr_y)), "n_test_models": int(len(te_y)),
              "n_litmus_images": int(len(z))}
    def linear_auc(out_tr, out_te, features):
        f_tr, f_te = (np.asarray(ulp.pool_logits(jnp.asarray(o), "concat", features)) for o in (out_tr, out_te))
        clf = LogisticRegression(C=10.0, max_iter=5000).fit(f_tr, tr_y)
        return roc_auc(clf.predict_proba(f_te)[:, 1], te_y.astype(bool))

    for features in ("logits", "log_softmax"):
        result[f"linear_auc_{features}"] = linear_auc(out_tr, out_te, features)
    # the run's learned ULP patterns through the same logistic regression: separates the patterns from ULP's h
    for saved in sorted((run / "ulp").glob("ulp_M*.npz")):
        zl = jnp.asarray(np.load(saved)["patterns"])
        result[f"learned_{saved.stem}_linear_auc"] = linear_auc(per_model(model, tr_v, zl, 10),
                                                               per_model(model, te_v, zl, 10), cfg.ulp.features)
    prob = np.asarray(jax.nn.softmax(jnp.asarray(out_te), -1))
    lowest_true = prob[:, np.arange(len(z)), z_labels].min(1)
    result["lowest_true_class_prob_auc"] = roc_auc(-lowest_true, te_y.astype(bool))
    if args.oracle:
        flip = oracle_flip_rate(model, te_v, ds, pool)
        result["oracle_flip_auc"] = roc_auc(flip, te_y.astype(bool))
        result["oracle_flip_mean_clean"] = float(flip[te_y == 0].mean())
        result["oracle_flip_mean_poisoned"] = float(flip[te_y == 1].mean())
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
