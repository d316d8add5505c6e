"""One HTBA pair end to end, resumable: pretrain a feature net on the other classes, craft poisons, save them as
PNGs, read them back, finetune a clean and a poisoned model, evaluate both.

Run folder of a pair (OUT/pairs/<source>_<target>/): pretrain/ (fit's checkpoints: a rerun reuses the weights),
poisons/ (the PNGs) + craft.json, clean/ and poisoned/ (finetuning checkpoints), pair.json (the finished rows).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import triggers as T
from bdjax.config import TrainConfig, changed_fields, saved_form
from bdjax.errors import ConfigError

TRIGGER_DIR = Path("/work/shared/triggers/htba")


@dataclasses.dataclass(frozen=True)
class HTBASetting:
    """Everything one pair run reads. Defaults: seeds/001's CIFAR-10 setting (8x8 trigger, 800 poisons with 3000
    clean images, eps 16/255) on a narrow AlexNet, sized for CPUs."""
    model: str = "cifar_cnn"
    model_options: tuple[str, ...] = ("widths=[16,32,64]",)
    feature_layer: str = "penultimate"  # f of the objective; the head below reads it (AlexNet: fc7 -> fc8)
    head: str = "fc"  # the last layer: replaced by a fresh one for the finetuning task, the only one trained
    pretrain: TrainConfig = TrainConfig(model="cifar_cnn", epochs=10, batch_size=128, lr=0.05, augment="flip")
    pretrain_per_class: int | None = 1000  # None: every training image of the kept classes
    # None: pretrain per pair on every class but the pair's. A tuple of classes: pretrain ONCE on the classes
    # outside it (OUT/pretrain) and draw the pairs inside it, so every pair is still unseen by the feature net
    holdout: tuple[int, ...] | None = None
    weights: str | None = None  # a user AlexNet file (load_alexnet) instead of pretraining
    trigger_size: int = 8
    n_poisons: int = 800  # num_batches x poisons_per_batch of htba below
    n_clean_per_class: int = 1500  # 3000 clean images for a pair
    eps: float = 16 / 255
    poisons_per_batch: int = 100
    # small: measured on the small net (one batch): lr 0.01 takes the mean distance 5.0 -> 3.2 in 25 iterations,
    # 3.1 in 100; lr 0.1 and 1.0 oscillate (5.4, 12.1 after 100)
    max_iters: int = 150
    craft_lr: float = 0.01
    craft_optimizer: str = "sgd"  # the official plain step; "adam" for users who want it (HTBAConfig.optimizer)
    lr_decay_every: int = 1000
    # the official stop test (max squared distance < 10) is on 4096-d ImageNet fc7 features; the small net's 64-d
    # features live on another scale, so small runs a fixed number of iterations (0 = never stop early)
    stop_distance: float = 0.0
    matching: str = "hungarian"
    # small: lr 0.01 for 20 epochs left the poisoned set underfit (train acc 0.86 vs 0.96 clean; first pair:
    # val_patched_source 0.535); the head is linear on 64-d features, so a larger step is safe
    finetune: TrainConfig = TrainConfig(model="cifar_cnn", epochs=30, batch_size=128, lr=0.05, weight_decay=0.0,
                                        trainable=("fc",))
    trigger_dir: str = str(TRIGGER_DIR)

    def htba_config(self, n_poisons: int | None = None):
        from bdjax.attacks.htba import HTBAConfig

        n = self.n_poisons if n_poisons is None else n_poisons
        k = min(self.poisons_per_batch, n)
        if n % k:
            raise ConfigError(f"htba n_poisons {n} must be a multiple of poisons_per_batch {k}")
        return HTBAConfig(poisons_per_batch=k, num_batches=n // k, eps=self.eps, lr=self.craft_lr,
                          optimizer=self.craft_optimizer, lr_decay_every=self.lr_decay_every, max_iters=self.max_iters,
                          stop_distance=self.stop_distance, matching=self.matching,
                          feature_layer=self.feature_layer).validate()

    def model_kwargs(self) -> dict:
        return dataclasses.replace(self.pretrain, model_options=self.model_options).model_kwargs()


def trigger_for(setting: HTBASetting, index: int, channels: int = 3) -> T.Trigger:
    """The pair's trigger: trigger_1<index % 10>.png, resized to trigger_size (one trigger per pair, as the paper)."""
    path = Path(setting.trigger_dir) / f"trigger_{10 + index % 10}.png"
    return T.from_image(path, size=setting.trigger_size, channels=channels)


def check_rerun(run_dir, config: dict, free: tuple[str, ...] = ()) -> None:
    """Refuse an output folder whose finished pairs, poisons or feature net other settings made: they are reused
    as they are, so the rows would carry the old settings under the new config.json. The `free` top-level fields
    may change (e.g. htba_vs_badnets' counts: one folder per count), and the pair list may grow or shrink (pairs
    are one seeded sequence: a prefix keeps its pairs, indices and seeds)."""
    previous = run_dir.read_config()
    made = [d for d in ("pairs", "pretrain") if any((run_dir.path / d).glob("*"))]
    if previous is None or not made:
        return
    old_pairs, new_pairs = saved_form(previous.get("pairs", [])), saved_form(config["pairs"])
    n = min(len(old_pairs), len(new_pairs))
    changed = changed_fields(previous, config, ignore=("pairs", *free))
    if old_pairs[:n] != new_pairs[:n]:
        changed.insert(0, "pairs")
    if changed:
        raise ConfigError(f"{run_dir.path} holds {' and '.join(made)} made with other settings "
                          f"({', '.join(changed[:6])}); use another --out, or delete that folder to run again")


def random_pairs(num_classes: int, n: int, seed: int, among=None) -> list[tuple[int, int]]:
    """n distinct (source, target) pairs of distinct classes (of `among`, default all), a seeded draw."""
    among = list(range(num_classes)) if among is None else [int(c) for c in among]
    if n > len(among) * (len(among) - 1):
        raise ConfigError(f"htba cannot draw {n} distinct pairs from the {len(among)} classes {among}")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        s, t = (int(v) for v in rng.choice(among, 2, replace=False))
        if (s, t) not in pairs:
            pairs.append((s, t))
    return pairs


def feature_variables(setting: HTBASetting, ds, exclude, folder: Path, seed: int):
    """(model with the pretraining head, its variables): the user's AlexNet file, or pretrained here (cached)."""
    from bdjax.attacks import htba
    from bdjax.models import get_model
    from bdjax.results import RunDir

    kept = htba.other_classes(ds.num_classes, exclude)
    if setting.weights is not None:
        variables = htba.load_alexnet(setting.weights)
        n_out = int(np.shape(variables["params"][setting.head]["bias"])[0])
        return get_model(setting.model, n_out, **setting.model_kwargs()), variables
    model = get_model(setting.model, len(kept), **setting.model_kwargs())
    state, _ = htba.pretrain_features(model, setting.pretrain, ds.x_train, ds.y_train, exclude=exclude,
                                      num_classes=ds.num_classes, per_class=setting.pretrain_per_class, seed=seed,
                                      run=RunDir(folder), desc="pretrain")
    return model, jax.device_get(state.variables)


def split_pair_data(ds, classes, target: int, n_clean_per_class: int, n_poisons: int, seed: int):
    """Disjoint training images: n_clean_per_class clean images of each class, and the target images the poisons
    start from (never also in the clean set). Returns (x_clean, y_clean, poison_targets)."""
    rng = np.random.default_rng(seed)
    clean_idx, start_idx = [], None
    for c in classes:
        idx = rng.permutation(np.flatnonzero(ds.y_train == c))
        need = n_clean_per_class + (n_poisons if c == target else 0)
        if idx.size < need:
            raise ConfigError(f"htba class {c} has {idx.size} training images, the run needs {need}")
        clean_idx.append(idx[:n_clean_per_class])
        if c == target:
            start_idx = idx[n_clean_per_class:n_clean_per_class + n_poisons]
    clean_idx = np.sort(np.concatenate(clean_idx))
    return ds.x_train[clean_idx], ds.y_train[clean_idx], ds.x_train[start_idx]


def craft_or_load(setting: HTBASetting, model, variables, starts, sources, trigger, folder: Path, seed: int,
                  n_poisons: int | None = None):
    """The pair's poisons as the victim gets them (uint8 PNGs read back); crafted once, then read from folder."""
    from bdjax import plots
    from bdjax.attacks import htba
    from bdjax.results import write_json

    poisons_dir, info_path = folder / "poisons", folder / "craft.json"
    if info_path.exists():
        return htba.load_poisons(poisons_dir), json.loads(info_path.read_text())
    cfg = setting.htba_config(n_poisons)
    t0 = time.time()
    res = htba.craft_poisons(model, variables, starts, sources, trigger, cfg, key=seed, desc=f"craft {folder.name}")
    htba.save_poisons(poisons_dir, res.poisons)
    htba.save_poison_grid(folder / "poisons.png", res.targets, res.poisons, eps=cfg.eps)
    plots.save_craft_trace(folder / "craft_trace.png", res.trace)
    info = {"n_poisons": int(len(res.poisons)), "iterations": res.iterations.tolist(),
            "converged": res.converged.tolist(), "mean_distance": float(np.mean(res.distance)),
            "max_distance": float(np.max(res.distance)), "craft_s": time.time() - t0,
            "first_mean_distance": [float(t[0]) for t in res.trace]}
    write_json(info_path, info)
    return htba.load_poisons(poisons_dir), info


def finetune_and_eval(setting: HTBASetting, pretrained, ds, classes, sources, target, x, y, trigger, folder: Path,
                      seed: int, cfg: TrainConfig | None = None) -> dict:
    """A fresh head for `classes` on the pretrained layers, finetuned on (x, y) (labels = positions in classes)."""
    from bdjax.attacks import htba
    from bdjax.models import get_model, init_model
    from bdjax.results import RunDir

    cfg = cfg or setting.finetune
    # finetune runs the net in eval mode: the frozen layers compute the features the poisons were crafted on
    model = get_model(setting.model, len(classes), **setting.model_kwargs())
    fresh = jax.device_get(init_model(model, jax.random.key(seed), ds.image_shape))
    variables = htba.with_new_head(pretrained, fresh, (setting.head,))
    state = htba.finetune(model, variables, cfg, x, y, seed=seed, run=RunDir(folder), desc=f"finetune {folder.name}")
    return htba.evaluate_attack(model, jax.device_get(state.variables), ds.x_test, ds.y_test, classes=classes,
                                sources=sources, target=target, trigger=trigger, seed=seed + 1)


@dataclasses.dataclass
class PairAssets:
    """What every experiment on one pair shares: the feature net, the finetuning data, the poisons."""
    name: str
    classes: list
    sources: list
    target: int
    trigger: T.Trigger
    model: object
    pretrained: dict
    x_clean: np.ndarray
    y_clean: np.ndarray
    spare_sources: np.ndarray  # source-class training images outside the clean set (BadNets' poisons)
    poisons: np.ndarray  # uint8, read back from the PNGs
    craft: dict


def pair_classes(num_classes: int, source: int | None, target: int, multi_source: bool = False):
    """(classes the victim learns, source classes patched at test time, classes the feature net must not see)."""
    if multi_source:
        classes = list(range(num_classes))
        return classes, [c for c in classes if c != target], [target]
    return sorted((source, target)), [source], [source, target]


def pair_assets(setting: HTBASetting, ds, source: int | None, target: int, index: int, out: Path, seed: int = 0,
                multi_source: bool = False) -> PairAssets:
    """Pretrain (or reuse) the feature net and craft (or read back) the poisons of one pair under out/."""
    name = f"all_{target}" if multi_source else f"{source}_{target}"
    folder = out / "pairs" / name
    folder.mkdir(parents=True, exist_ok=True)
    classes, sources, exclude = pair_classes(ds.num_classes, source, target, multi_source)
    trigger = trigger_for(setting, index, ds.image_shape[-1])
    if setting.holdout is not None:
        if not set(exclude) <= set(setting.holdout):
            raise ConfigError(f"htba pair classes {exclude} must lie in the holdout classes {list(setting.holdout)}")
        model, pretrained = feature_variables(setting, ds, setting.holdout, out / "pretrain", seed=0)
    else:
        model, pretrained = feature_variables(setting, ds, exclude, folder / "pretrain", seed)
    x_clean, y_clean, starts = split_pair_data(ds, classes, target, setting.n_clean_per_class, setting.n_poisons,
                                               seed)
    in_clean = set(map(bytes, x_clean.reshape(len(x_clean), -1)))  # by content: split_pair_data does not return ids
    pool = ds.x_train[np.isin(ds.y_train, sources)]
    spare = pool[[bytes(v) not in in_clean for v in pool.reshape(len(pool), -1)]]
    poisons, craft = craft_or_load(setting, model, pretrained, starts, pool, trigger, folder, seed)
    return PairAssets(name, classes, sources, target, trigger, model, pretrained, x_clean, y_clean, spare, poisons,
                      craft)


def run_pair(setting: HTBASetting, ds, source: int | None, target: int, index: int, out: Path, seed: int = 0,
             multi_source: bool = False) -> dict:
    """Rows for a clean and a poisoned model of one pair (source None + multi_source: every class to the target)."""
    from bdjax.attacks import htba
    from bdjax.results import write_json

    name = f"all_{target}" if multi_source else f"{source}_{target}"
    done = out / "pairs" / name / "pair.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    a = pair_assets(setting, ds, source, target, index, out, seed, multi_source)
    rows = []
    for kind, extra in (("clean", None), ("poisoned", a.poisons)):
        if extra is None:
            x, y = a.x_clean, htba.class_index(a.y_clean, a.classes)
        else:
            x, y = htba.finetune_set(a.x_clean, a.y_clean, extra, a.classes, target)
        m = finetune_and_eval(setting, a.pretrained, ds, a.classes, a.sources, target, x, y, a.trigger,
                              out / "pairs" / name / kind, seed)
        rows.append({"pair": [source, target], "model": kind,
                     "variant": "multi_source" if multi_source else "single_source", "n_poisons": int(len(a.poisons)),
                     "n_clean": int(len(a.x_clean)), "trigger": f"trigger_{10 + index % 10}.png", **m})
    result = {"rows": rows, "craft": a.craft, "wall_s": time.time() - t0}
    write_json(done, result)
    return result
