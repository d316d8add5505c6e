"""The ULP experiment of seeds/000 end to end: train a zoo, meta-train litmus patterns, compare with baselines.

    cfg = apply_overrides(ULPExperimentConfig(), ["data.dataset=mnist", ...])
    summary = run_ulp_experiment(cfg, "runs/ulp_mnist")     # rerun the same call to resume

1. Two zoos of clean and poisoned models (bdjax.zoo.train_zoo): OUT/zoo_train with the train trigger pool, split
   into meta-train and meta-validation models, and OUT/zoo_test with the disjoint test pool (unseen triggers).
   Only models that passed the keep-filters (zoo.min_clean_acc, zoo.min_asr) are used, as in the reference.
2. For every M in `patterns`: ULP (bdjax.defenses.ulp) meta-trained on the train zoo, best epoch on the val zoo,
   ROC AUC on the test zoo; and the noise baseline (M uniform-noise inputs + logistic regression) with the same M.
3. Neural Cleanse's model score (largest anomaly index below the median) on the test zoo models, as an AUC.

Every finished step is written under OUT/ulp/ (patterns as .npz, rows as JSON, each row with the settings that
produced it) so a killed run resumes without redoing it. A rerun with changed settings recomputes the rows those
settings change and reuses the others (the zoos themselves refuse other settings: bdjax.zoo.store). summary.json has `rows` (method, M, auc, acc, scale) and the shared fields (clean_acc and asr are
the test zoo's mean clean accuracy and mean poisoned-model ASR).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from bdjax import runtime
from bdjax.config import DataConfig, TrainConfig, from_dict, matches_saved, raise_failed, saved_form, to_dict
from bdjax.defenses import neural_cleanse as nc
from bdjax.defenses.neural_cleanse import NCConfig
from bdjax.defenses import ulp
from bdjax.defenses.metrics import roc_auc
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.pipelines import nc_fields  # noqa: F401  (NCConfig's field docs)
from bdjax.results import RunDir, write_json
from bdjax.train.loop import progress_enabled
from bdjax.zoo.train import ZooConfig, ZooSection, load_zoo_data, train_zoo, trigger_pool


@dataclasses.dataclass(frozen=True)
class TestZooSection:
    n_clean: int = 8  # clean models of the test zoo (its other settings are zoo.*'s)
    n_poisoned: int = 8  # poisoned models of the test zoo, with the unseen test pool's triggers


@dataclasses.dataclass(frozen=True)
class BaselineSection:
    noise: bool = True  # the noise-input baseline: M uniform-noise images + logistic regression
    neural_cleanse: bool = True  # Neural Cleanse's model score (largest anomaly index below the median)
    nc_models: int = 0  # test zoo models scanned by Neural Cleanse, half clean half poisoned (0: all)
    nc_images: int = 1000  # clean test images NC optimises on
    nc: NCConfig = dataclasses.field(default_factory=NCConfig)  # Neural Cleanse's settings

    RENAMED = {"nc_batch": "nc.batch_size", "nc_steps_per_check": "nc.steps_per_check", "nc_max_checks": "nc.max_checks"}


@dataclasses.dataclass(frozen=True)
class ULPExperimentConfig:
    experiment: str = "ulp"  # the run's name (its zoos are <experiment>_zoo_train and _zoo_test)
    scale: str = "custom"  # recorded in every row: which preset produced the number
    seed: int = 0  # zoos, meta-train/val split, ULP, noise inputs and Neural Cleanse all derive from it
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: ZooConfig().train)
    zoo: ZooSection = dataclasses.field(default_factory=ZooSection)  # the train/val zoo (train trigger pool)
    test_zoo: TestZooSection = dataclasses.field(default_factory=TestZooSection)  # unseen triggers
    val_fraction: float = 0.2  # of the train zoo, held out for ULP's best-epoch selection
    patterns: tuple[int, ...] = (1, 5, 10)  # the M values
    ulp: ulp.ULPConfig = dataclasses.field(default_factory=ulp.ULPConfig)
    baselines: BaselineSection = dataclasses.field(default_factory=BaselineSection)

    # set by the pipeline: ULP runs once per M of `patterns`, with the run's seed (as NC: baselines.nc.seed)
    DERIVED = {"ulp.n_patterns": "patterns", "ulp.seed": "seed", "baselines.nc.seed": "seed"}

    def validate(self) -> "ULPExperimentConfig":
        b = self.baselines
        raise_failed([
            (self.test_zoo.n_clean >= 1 and self.test_zoo.n_poisoned >= 1, "test_zoo.n_clean/n_poisoned",
             ">= 1 each (an AUC needs both kinds)", (self.test_zoo.n_clean, self.test_zoo.n_poisoned)),
            (self.zoo.n_clean >= 2 and self.zoo.n_poisoned >= 2, "zoo.n_clean/n_poisoned",
             ">= 2 each (train and val need both kinds)", (self.zoo.n_clean, self.zoo.n_poisoned)),
            (self.zoo.pool == "train", "zoo.pool", "train (the test zoo uses the test pool)", self.zoo.pool),
            (0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction),
            (len(self.patterns) >= 1 and all(m >= 1 for m in self.patterns), "patterns", "M values >= 1", self.patterns),
            (b.nc_models >= 0, "baselines.nc_models", ">= 0", b.nc_models),
            (b.nc_images >= b.nc.batch_size, "baselines.nc_images", f">= baselines.nc.batch_size ({b.nc.batch_size})",
             b.nc_images),
        ])
        b.nc.validate()
        self.ulp.validate()
        self.zoo_config("train").validate()
        return self

    def zoo_config(self, which: str) -> ZooConfig:
        z = self.zoo if which == "train" else dataclasses.replace(
            self.zoo, pool="test", n_clean=self.test_zoo.n_clean, n_poisoned=self.test_zoo.n_poisoned)
        return ZooConfig(experiment=f"{self.experiment}_zoo_{which}", seed=self.seed, data=self.data, zoo=z,
                         train=self.train)


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of zoo indices: the same share of clean and poisoned models in val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for kind in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == kind))
        n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _kept(store) -> tuple[dict, np.ndarray]:
    variables, records = store.load()
    keep = np.array([bool(r.kept) for r in records])
    labels = np.array([r.poisoned for r in records], np.int32)
    if keep.sum() == 0 or len(set(labels[keep])) < 2:
        raise ConfigError(f"zoo {store.root}: the keep-filters left {int(keep.sum())} models without both kinds; "
                          "lower zoo.min_clean_acc / zoo.min_asr or train longer")
    idx = np.flatnonzero(keep)
    return _select(variables, idx), labels[idx]


def meta_zoos(cfg: ULPExperimentConfig, train_store, test_store):
    """((vars, labels) of meta-train, meta-val, test): the kept models, train zoo split stratified by cfg."""
    tr_all, tr_lab = _kept(train_store)
    i_tr, i_va = split_train_val(tr_lab, cfg.val_fraction, cfg.seed)
    return (_select(tr_all, i_tr), tr_lab[i_tr]), (_select(tr_all, i_va), tr_lab[i_va]), _kept(test_store)


def _select(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


class _Steps:
    """Finished steps of a run, one JSON file each under OUT/ulp/ with the settings that produced it
    ({"producer": config, "value": ...}): a rerun reuses a step only when its producer matches the current one
    (bdjax.config.matches_saved), and recomputes it otherwise. Recomputing is safe here: a step is derived from
    the zoos, which refuse other settings themselves."""

    def __init__(self, root: Path, previous: dict | None = None):
        self.root = root
        # The run's config.json before this run replaced it: vouches for step files written without a producer
        # by an older bdjax (they were written by the run that config describes).
        self.previous = previous
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, producer):
        p = self.root / f"{name}.json"
        if not p.exists():
            return None
        saved = json.loads(p.read_text())
        if isinstance(saved, dict) and set(saved) == {"producer", "value"}:
            if matches_saved(saved["producer"], producer):
                return saved["value"]
        elif self._vouched(name, producer):
            return saved
        print(f"bdjax: {p} was computed with other settings; recomputing it", file=sys.stderr)
        return None

    def _vouched(self, name: str, producer) -> bool:
        try:
            return self.previous is not None and matches_saved(
                saved_form(step_producer(from_dict(type(producer), self.previous), name)), producer)
        except (ConfigError, TypeError):
            return False

    def put(self, name: str, value, producer) -> None:
        write_json(self.root / f"{name}.json", {"producer": saved_form(producer), "value": value})


def step_producer(cfg: ULPExperimentConfig, name: str) -> ULPExperimentConfig:
    """The settings a step's result depends on: cfg with what the step does not read reset to its defaults, so
    e.g. adding an M or changing the NC budget leaves the ULP rows valid."""
    d = ULPExperimentConfig()
    base = dataclasses.replace(cfg, patterns=d.patterns, baselines=d.baselines)
    kind, _, m = name.partition("_M")
    if kind == "ulp":
        return dataclasses.replace(base, patterns=(int(m),))
    if kind == "noise":  # reads the zoos and three of ULP's settings
        u = cfg.ulp
        return dataclasses.replace(base, patterns=(int(m),), ulp=dataclasses.replace(
            d.ulp, mode=u.mode, batch_models=u.batch_models, features=u.features))
    if name.startswith("neural_cleanse"):
        return dataclasses.replace(base, ulp=d.ulp, baselines=dataclasses.replace(cfg.baselines, noise=True))
    raise ValueError(f"unknown ULP step {name!r}")


def initial_patterns(cfg: ULPExperimentConfig, ds, m: int):
    """ulp.init=stamped: m clean training images with the train pool's triggers in all 4 corners (None: uniform)."""
    if cfg.ulp.init == "uniform":
        return None
    pool = trigger_pool(cfg.zoo_config("train"), ds.image_shape[-1])
    return ulp.stamped_images(ds.x_train, ds.y_train, ds.num_classes, pool.triggers(), m)


def _ulp_row(model, cfg: ULPExperimentConfig, m: int, zoos, ds, run: RunDir, steps: _Steps):
    name = f"ulp_M{m}"
    producer = step_producer(cfg, name)
    done = steps.get(name, producer)
    if done is not None:
        return done
    (tr_v, tr_y), (va_v, va_y), (te_v, te_y) = zoos
    ucfg = dataclasses.replace(cfg.ulp, n_patterns=m, seed=cfg.seed)
    res = ulp.train_ulp(model, tr_v, tr_y, va_v, va_y, ds.image_shape, ds.num_classes, ucfg,
                        init_patterns=initial_patterns(cfg, ds, m), progress=True)
    ev = ulp.evaluate_ulp(model, res, te_v, te_y)
    np.savez(steps.root / f"ulp_M{m}.npz", patterns=res.patterns, kernel=res.classifier["kernel"],
             bias=res.classifier["bias"], test_scores=ev["scores"])
    ulp.save_patterns(run.figure(f"ulp_patterns_M{m}.png"), res)
    row = {"method": "ULP", "M": m, "auc": ev["auc"], "acc": ev["acc"], "scale": cfg.scale, **res.summary(),
           "test_scores": ev["scores"]}
    steps.put(name, row, producer)
    return steps.get(name, producer)  # read back: a fresh and a resumed run report the same JSON values


def _noise_row(model, cfg, m, zoos, shape, steps: _Steps):
    name = f"noise_M{m}"
    producer = step_producer(cfg, name)
    done = steps.get(name, producer)
    if done is not None:
        return done
    (tr_v, tr_y), (va_v, va_y), (te_v, te_y) = zoos
    # The baseline has no epochs to select, so it fits on train + val models together.
    fit_v = jax.tree.map(lambda a, b: np.concatenate([a, b]), tr_v, va_v)
    r = ulp.noise_baseline(model, fit_v, np.r_[tr_y, va_y], te_v, te_y, shape, n_patterns=m, seed=cfg.seed,
                           mode=cfg.ulp.mode, batch_models=cfg.ulp.batch_models, features=cfg.ulp.features)
    row = {"method": "noise", "M": m, "auc": r["auc"], "acc": r["acc"], "scale": cfg.scale, "features": cfg.ulp.features,
           "test_scores": r["scores"]}
    steps.put(name, row, producer)
    return steps.get(name, producer)


def nc_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n test models (0: all), half clean and half poisoned, in zoo order."""
    if n == 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    parts = [rng.permutation(np.flatnonzero(labels == k))[:n // 2 + (k == 1) * (n % 2)] for k in (0, 1)]
    return np.sort(np.concatenate(parts))


def _nc_row(model, cfg: ULPExperimentConfig, test_zoo, ds, steps: _Steps):
    producer = step_producer(cfg, "neural_cleanse")
    done = steps.get("neural_cleanse", producer)
    if done is not None:
        return done
    te_v, te_y = test_zoo
    b = cfg.baselines
    idx = nc_subset(te_y, b.nc_models, cfg.seed)
    nc_cfg = dataclasses.replace(b.nc, seed=cfg.seed)
    x_clean = ds.x_test[np.random.default_rng(cfg.seed).permutation(len(ds.x_test))[:b.nc_images]]
    partial = steps.get("neural_cleanse_partial", producer) or {"scores": []}
    t0 = time.time()
    for k in tqdm(range(len(partial["scores"]), len(idx)), desc="Neural Cleanse over the test zoo", unit="model",
                  disable=not progress_enabled()):
        v = jax.tree.map(lambda a: a[idx[k]], te_v)
        partial["scores"].append(nc.model_score(nc.neural_cleanse(model, v, x_clean, ds.num_classes, config=nc_cfg)))
        steps.put("neural_cleanse_partial", partial, producer)  # one model at a time: a kill loses at most one scan
    scores = np.asarray(partial["scores"], float)
    y = te_y[idx].astype(bool)
    row = {"method": "neural_cleanse", "M": None, "auc": roc_auc(scores, y),
           "acc": float(np.mean((scores > nc_cfg.anomaly_threshold) == y)),
           "scale": cfg.scale, "n_models": int(len(idx)), "test_scores": scores, "nc_s": time.time() - t0}
    steps.put("neural_cleanse", row, producer)
    return steps.get("neural_cleanse", producer)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | M | AUC | scale |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'-' if r['M'] is None else r['M']} | {r['auc']:.3f} | {r['scale']} |")
    return "\n".join(lines)


def _zoo_stats(records) -> dict:
    clean = [r.clean_acc for r in records]
    asr = [r.asr for r in records if r.poisoned]
    val = [r.val_acc for r in records if r.val_acc is not None]
    return {"n_models": len(records), "n_poisoned": int(sum(r.poisoned for r in records)),
            "mean_val_acc": float(np.mean(val)) if val else None,
            "n_kept": int(sum(bool(r.kept) for r in records)), "mean_clean_acc": float(np.mean(clean)),
            "min_clean_acc": float(np.min(clean)), "mean_asr": float(np.mean(asr)) if asr else None,
            "min_asr": float(np.min(asr)) if asr else None}


def run_ulp_experiment(cfg: ULPExperimentConfig, out) -> dict:
    cfg.validate()
    t0 = time.time()
    run = RunDir(out)
    previous = run.read_config()
    run.write_config(to_dict(cfg))
    ds = load_zoo_data(cfg.zoo_config("train"))
    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())

    stores = {w: train_zoo(cfg.zoo_config(w), run.path / f"zoo_{w}", data=ds) for w in ("train", "test")}
    zoo_wall = time.time() - t0
    zoos = meta_zoos(cfg, stores["train"], stores["test"])
    te_v, te_y = zoos[2]

    steps = _Steps(run.path / "ulp", previous)
    rows = []
    for m in cfg.patterns:
        rows.append(_ulp_row(model, cfg, m, zoos, ds, run, steps))
        if cfg.baselines.noise:
            rows.append(_noise_row(model, cfg, m, zoos, ds.image_shape, steps))
    if cfg.baselines.neural_cleanse:
        rows.append(_nc_row(model, cfg, (te_v, te_y), ds, steps))

    curves = {f"{r['method']}" + (f" M={r['M']}" if r["M"] is not None else ""): (
        np.asarray(r["test_scores"]), te_y if r["method"] != "neural_cleanse" else
        te_y[nc_subset(te_y, cfg.baselines.nc_models, cfg.seed)]) for r in rows}
    ulp.save_roc(run.figure("roc.png"), curves)
    table = markdown_table(rows)
    (run.path / "table.md").write_text(table + "\n")

    test_stats = _zoo_stats(stores["test"].records)
    best = max((r for r in rows if r["method"] == "ULP"), key=lambda r: r["M"])
    summary = {
        "experiment": cfg.experiment, "dataset": cfg.data.dataset, "seed": cfg.seed, "scale": cfg.scale,
        "clean_acc": test_stats["mean_clean_acc"], "asr": test_stats["mean_asr"],
        "auc": best["auc"], "M": best["M"],
        "rows": [{k: v for k, v in r.items() if k != "test_scores"} for r in rows],
        "zoo_train": {**_zoo_stats(stores["train"].records), "n_meta_train": int(len(zoos[0][1])),
                      "n_meta_val": int(len(zoos[1][1]))},
        "zoo_test": test_stats, "zoo_wall_s": zoo_wall, "wall_s": time.time() - t0,
        "device": runtime.device_summary(),
    }
    summary = run.write_summary(summary)
    print(table)
    print(f"results in {out}/ (summary.json, table.md, roc.png, ulp_patterns_M*.png; zoos in zoo_train/, zoo_test/)")
    return summary


def demo_ulp_config(seed: int = 0) -> ULPExperimentConfig:
    """The demo's zoo: 96 + 96 tiny CNNs on the digits 0, 1 and 2 with random 3x3 triggers (no files needed), a
    test zoo of 24 + 24 with unseen random triggers, ULP with M = 1 and 5 against noise inputs (Neural Cleanse
    already runs in the demo's defense half). Three classes: a zoo model's backdoor fires only on its source
    class, so M = 5 patterns started from stamped images cover every source (on the 10 digits half the sources go
    unseen and ULP stays near 0.6); with two classes noise inputs detect as well as ULP. Tiny nets: vmap mode
    trains them together faster than the CPU's unrolled map. Log-softmax features as the small-scale experiments
    (see experiments/ulp_mnist.py)."""
    from bdjax.config import apply_overrides

    return apply_overrides(ULPExperimentConfig(experiment="demo_ulp", scale="demo", seed=seed), [
        "data.dataset=digits", "data.classes=0,1,2", "zoo.trigger_dir=random", "zoo.trigger_size=3",
        "zoo.n_clean=96", "zoo.n_poisoned=96", "zoo.chunk_size=96", "zoo.mode=vmap", "zoo.min_asr=0.8",
        "zoo.val_fraction=0.1", "test_zoo.n_clean=24", "test_zoo.n_poisoned=24",
        "train.model_options=width=4,hidden=16", "train.epochs=8", "train.lr=0.01", "patterns=1,5", "ulp.epochs=100",
        "ulp.init=stamped", "ulp.pattern_lr=1", "ulp.classifier_lr=0.01", "ulp.features=log_softmax",
        "ulp.batch_models=48", "baselines.neural_cleanse=false"])
