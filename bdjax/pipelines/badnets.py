"""The BadNets experiment end to end: data -> poison -> train -> evaluate -> run folder.

`run(cfg, out)` is what `bdjax badnets`, `bdjax demo` and `experiments/badnets_*.py` call; it returns the
trained model and the poisoned data as well, so defenses can be run on the same objects.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from bdjax import runtime
from bdjax.attacks import LabelMap, PoisonedSet, make_trigger, poison_test_set, poison_training_set
from bdjax.config import ExperimentConfig, matches_saved, to_dict
from bdjax.data import Dataset
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax import plots
from bdjax.results import RunDir
from bdjax.train import TrainState, evaluate, fit

EPOCH_EVAL_SIZE = 2000  # per-epoch curves use a test subset; the final numbers use the whole test set


@dataclasses.dataclass
class BadNetsResult:
    summary: dict
    model: object
    state: TrainState
    data: Dataset
    poisoned: PoisonedSet
    x_asr: np.ndarray | None
    y_asr: np.ndarray | None


def load_data(cfg: ExperimentConfig) -> Dataset:
    return cfg.data.load(seed=cfg.seed)


def poison(cfg: ExperimentConfig, ds: Dataset):
    """The poisoned training set (or the clean one for attack.kind=none) and the ASR test set."""
    a = cfg.attack
    if a.kind == "none":
        clean = PoisonedSet(ds.x_train, ds.y_train.astype(np.int32), np.zeros(len(ds.y_train), bool), ds.y_train.astype(np.int32))
        return None, clean, None, None
    trigger = make_trigger(a.trigger, ds.image_shape, size=a.trigger_size, color=a.trigger_color,
                           alpha=a.blend_alpha, image_path=a.trigger_image, seed=cfg.seed)
    label_map = LabelMap(a.label_map, a.target, tuple(a.sources))
    common = dict(placement=a.placement, margin=a.margin)
    poisoned = poison_training_set(ds.x_train, ds.y_train, trigger, label_map, ds.num_classes, rate=a.poison_rate,
                                   count=a.poison_count, clean_label=a.clean_label, seed=cfg.seed, **common)
    x_asr, y_asr = poison_test_set(ds.x_test, ds.y_test, trigger, label_map, ds.num_classes, seed=cfg.seed + 1, **common)
    return trigger, poisoned, x_asr, y_asr


def _check_resumable(run: RunDir, cfg: ExperimentConfig) -> None:
    previous = run.read_config()
    if previous is not None and run.checkpoints.exists() and not matches_saved(previous, cfg):
        raise ConfigError(f"{run.path} already holds a run with a different config; use another --out to start a "
                          "new run, or the same settings to resume it")


def run(cfg: ExperimentConfig, out) -> BadNetsResult:
    t0 = time.time()
    cfg.validate()
    run_dir = RunDir(out)
    _check_resumable(run_dir, cfg)
    run_dir.write_config(to_dict(cfg))

    ds = load_data(cfg)
    trigger, poisoned, x_asr, y_asr = poison(cfg, ds)
    if trigger is not None:
        plots.save_trigger(run_dir.figure("trigger.png"), np.asarray(trigger.pattern), np.asarray(trigger.mask))
        idx = poisoned.indices[:8]
        plots.save_examples(run_dir.figure("examples.png"), ds.x_train[idx], poisoned.x[idx], ds.y_train[idx],
                            poisoned.y[idx], ds.class_names)

    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())
    # Per-epoch curves use a seeded random test subset: folder datasets are sorted by class, so the first
    # images would cover only one or two classes.
    rng = np.random.default_rng(cfg.seed)
    i_eval = rng.permutation(len(ds.x_test))[:EPOCH_EVAL_SIZE]
    i_asr = rng.permutation(len(x_asr))[:EPOCH_EVAL_SIZE] if x_asr is not None else None

    def epoch_eval(state):
        r = evaluate(model, state.variables, ds.x_test[i_eval], ds.y_test[i_eval], ds.num_classes,
                     x_asr[i_asr] if x_asr is not None else None, y_asr[i_asr] if y_asr is not None else None,
                     cfg.train.eval_batch_size)
        return {k: v for k, v in r.items() if k != "per_class_acc"}

    t_train = time.time()
    state = fit(model, cfg.train, poisoned.x, poisoned.y, seed=cfg.seed, run=run_dir, eval_fn=epoch_eval,
                desc=f"{cfg.experiment} {ds.name}")
    train_s = time.time() - t_train
    final = evaluate(model, state.variables, ds.x_test, ds.y_test, ds.num_classes, x_asr, y_asr, cfg.train.eval_batch_size)
    plots.save_curves(run_dir.figure("curves.png"), run_dir.metrics())

    summary = {
        "experiment": cfg.experiment,
        "dataset": ds.name,
        "seed": cfg.seed,
        "model": cfg.train.model,
        "attack": cfg.attack.kind,
        "trigger": cfg.attack.trigger if trigger is not None else None,
        "target": cfg.attack.target if trigger is not None else None,
        "label_map": cfg.attack.label_map if trigger is not None else None,
        "clean_acc": final["clean_acc"],
        "asr": final.get("asr"),
        "per_class_acc": final["per_class_acc"],
        "poison_rate": float(poisoned.mask.mean()),
        "n_poison": int(poisoned.mask.sum()),
        "n_train": int(len(ds.x_train)),
        "n_test": int(len(ds.x_test)),
        "train_steps": int(state.step),
        "train_s": train_s,
        "wall_s": time.time() - t0,
        "device": runtime.device_summary(),
    }
    summary = run_dir.write_summary(summary)
    return BadNetsResult(summary, model, state, ds, poisoned, x_asr, y_asr)
