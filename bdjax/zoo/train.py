"""Train a zoo of clean and poisoned models, a chunk of models at a time, resumable after a kill.

    cfg = ZooConfig(...)                       # or apply_overrides(ZooConfig(), ["zoo.n_clean=50", ...])
    store = train_zoo(cfg, "runs/zoo_train")   # rerun the same call to resume

Each chunk is one population (bdjax.zoo.population): its models train together, their model axis sharded over
the devices; the population state is checkpointed every `train.checkpoint_every` epochs, so a kill loses at most
that much work of the current chunk; completed chunks are never retrained. After training, every model is
evaluated (clean test accuracy, poisoned-input accuracy on its triggered source-class test images) and the
keep-filters of ULP are recorded per model (`kept`): val_acc >= zoo.min_clean_acc, and for a poisoned model
val_asr >= zoo.min_asr, both measured on `zoo.val_fraction` of each class's training images, held out (seeded)
before training, as the reference keeps models on validation accuracy: test data never chooses models. Models
that fail are kept in the zoo (and flagged), so nothing is silently retrained.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import distributed
from bdjax.config import DataConfig, TrainConfig, raise_failed, seed_check
from bdjax.data import Dataset
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.train.loop import needs_step_sync, train_loop
from bdjax.train.optim import make_optimizer
from bdjax.zoo import population as pop
from bdjax.zoo.plan import (ULP_TEST_POOL, ULP_TRAIN_POOL, ULP_TRIGGER_DIR, TriggerPool, load_trigger_pool, plan_zoo,
                            random_trigger_pool)
from bdjax.zoo.store import ZooStore


RANDOM_TRIGGERS = "random"


@dataclasses.dataclass(frozen=True)
class ZooSection:
    n_clean: int = 8  # clean models
    n_poisoned: int = 8  # poisoned models, each with its own trigger, source, target and corner
    pool: str = "train"  # train | test: which half of the trigger images the poisoned models use
    # default: <data root>/../triggers/ulp_cifar10; "random": 10 seeded random black/white patches per pool
    # (no files needed: the offline demo), of size trigger_size (default 3)
    trigger_dir: str | None = None
    trigger_size: int | None = None  # resize the pool's images (None: as stored, 5x5 for the ULP masks)
    chunk_size: int = 16  # models trained together (and stored together)
    mode: str = "auto"  # auto | vmap | map (see bdjax.zoo.population)
    min_clean_acc: float = 0.0  # keep-filter on the validation accuracy (ULP CIFAR-10: 0.75)
    min_asr: float = 0.0  # keep-filter on a poisoned model's validation ASR (ULP CIFAR-10: 0.90)
    # of each class's training images, held out (seeded) to evaluate the keep-filters on; the models never
    # train on them (0: none, only allowed without keep-filters)
    val_fraction: float = 0.0
    eval_batch_size: int = 500  # images per evaluation call


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    experiment: str = "zoo"  # the zoo's name
    seed: int = 0  # the zoo's plan (models, triggers, sources, targets), subsets and validation split
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    zoo: ZooSection = dataclasses.field(default_factory=ZooSection)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        model="mnist_cnn", epochs=5, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
        schedule="constant", checkpoint_every=1))

    def validate(self) -> "ZooConfig":
        z, t = self.zoo, self.train
        checks = [
            seed_check(self.seed),
            *self.data.checks(),
            (z.n_clean >= 0 and z.n_poisoned >= 0 and z.n_clean + z.n_poisoned > 0, "zoo.n_clean/n_poisoned",
             ">= 0 with at least one model", (z.n_clean, z.n_poisoned)),
            (z.pool in ("train", "test"), "zoo.pool", "train or test", z.pool),
            (z.chunk_size >= 1, "zoo.chunk_size", ">= 1", z.chunk_size),
            (z.trigger_size is None or z.trigger_size >= 1, "zoo.trigger_size", ">= 1 or none", z.trigger_size),
            (z.mode in ("auto",) + pop.MODES, "zoo.mode", "auto, vmap or map", z.mode),
            (0 <= z.min_clean_acc <= 1, "zoo.min_clean_acc", "in [0, 1]", z.min_clean_acc),
            (0 <= z.min_asr <= 1, "zoo.min_asr", "in [0, 1]", z.min_asr),
            (0 <= z.val_fraction < 1, "zoo.val_fraction", "in [0, 1)", z.val_fraction),
            (z.val_fraction > 0 or (z.min_clean_acc == 0 and z.min_asr == 0), "zoo.val_fraction",
             "> 0 when a keep-filter (zoo.min_clean_acc, zoo.min_asr) is set, so that the filters read held-out "
             "training images, not the test set", z.val_fraction),
            (z.eval_batch_size >= 1, "zoo.eval_batch_size", ">= 1", z.eval_batch_size),
            *t.checks(),
        ]
        raise_failed(checks)
        return self


def trigger_pool(cfg: ZooConfig, channels: int) -> TriggerPool:
    from bdjax.data import default_data_root

    directory = cfg.zoo.trigger_dir
    if directory == RANDOM_TRIGGERS:  # train and test pools from different seeds: the test triggers are unseen
        return random_trigger_pool(10, cfg.zoo.trigger_size or 3, channels, seed=1000 + (cfg.zoo.pool == "test"))
    if directory is None:
        root = default_data_root()
        if root is None:
            raise ConfigError("no trigger folder: set zoo.trigger_dir (the ULP masks live in shared/triggers/ulp_cifar10)")
        directory = Path(root).parent / "triggers" / ULP_TRIGGER_DIR
    names = ULP_TRAIN_POOL if cfg.zoo.pool == "train" else ULP_TEST_POOL
    return load_trigger_pool(directory, names, channels=channels, size=cfg.zoo.trigger_size)


def load_zoo_data(cfg: ZooConfig) -> Dataset:
    return cfg.data.load(seed=cfg.seed)


def holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """(ds without its validation images, x_val, y_val): round(fraction * n_k) of each class k's training images
    (at least one), drawn from `seed`. fraction 0: (ds, empty, empty)."""
    if fraction == 0:
        return ds, ds.x_train[:0], ds.y_train[:0]
    rng = np.random.default_rng([seed, 1])  # a stream of its own: not the subset's draw
    val = []
    for k in range(ds.num_classes):
        members = np.flatnonzero(ds.y_train == k)
        n_val = max(1, int(round(fraction * len(members))))
        if n_val >= len(members):
            raise ConfigError(f"zoo.val_fraction={fraction} would hold out all {len(members)} training images of "
                              f"class {k}; lower it or use more training data")
        val.append(rng.choice(members, n_val, replace=False))
    is_val = np.zeros(len(ds.y_train), bool)
    is_val[np.concatenate(val)] = True
    fit = dataclasses.replace(ds, x_train=ds.x_train[~is_val], y_train=ds.y_train[~is_val])
    return fit, ds.x_train[is_val], ds.y_train[is_val]


def evaluate_models(model, cfg: ZooConfig, records, variables, x, y, num_classes: int, pool: TriggerPool):
    """(clean accuracy, poisoned-input accuracy) of trained models (host variables stacked as `records`) on the
    images x, y: what train_chunk measures on the test set, here for the validation images."""
    padded = pad_for_processes(records)
    extra = len(padded) - len(records)
    if extra:
        variables = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], extra, 0)]), variables)
    mesh = pop.model_mesh(len(padded))
    tasks = pop.place(pop.tasks_from_records(padded, x.shape[1:], pool.size), mesh, per_model=True)
    data = pop.place(pop.shared_data(x, y, num_classes, pool.pattern, pool.mask), mesh, per_model=False)
    acc, asr = pop.evaluate_population(model, pop.place(variables, mesh, per_model=True), tasks, x,
                                       np.asarray(y, np.int32), data, batch_size=cfg.zoo.eval_batch_size,
                                       mode=cfg.zoo.mode, mesh=mesh)
    return acc[:len(records)], asr[:len(records)]


def plan(cfg: ZooConfig, ds: Dataset, pool: TriggerPool):
    empty = np.flatnonzero(np.bincount(ds.y_train, minlength=ds.num_classes) == 0)
    if len(empty):  # a poisoned model with such a source class would get no poisons
        raise ConfigError(f"classes {empty.tolist()} have no training images; a zoo needs every class")
    h, w = pool.size
    if h > ds.image_shape[0] or w > ds.image_shape[1]:
        raise ConfigError(f"zoo triggers of size {h}x{w} are larger than the {ds.image_shape[0]}x{ds.image_shape[1]} images")
    # Distinct zoo seeds for the train and test pools, so a test zoo never repeats a train zoo's models.
    return plan_zoo(cfg.zoo.n_clean, cfg.zoo.n_poisoned, pool, ds.num_classes, seed=cfg.seed * 2 + (cfg.zoo.pool == "test"))


@functools.lru_cache(maxsize=4)
def _programs(model, t: TrainConfig, steps_per_epoch: int, mode: str, mesh, n_len: int):
    """(optimiser, compiled step, epoch permutations) for one population shape: chunks of equal size reuse them
    instead of compiling again (the unrolled CPU step of a chunk takes tens of seconds to compile)."""
    tx = make_optimizer(t, steps_per_epoch)
    step = pop.make_population_step(model, tx, steps_per_epoch=steps_per_epoch, batch_size=t.batch_size,
                                    augment_kind=t.augment, crop_padding=t.crop_padding, mode=mode, mesh=mesh)
    return tx, step, pop.make_epoch_permutations(n_len, mesh)


def pad_for_processes(records: list) -> list:
    """records plus copies of the last, so that every process holds an equal share of the model axis (the
    copies train along and are dropped)."""
    return list(records) + [records[-1]] * (-len(records) % jax.process_count())


def train_chunk(model, cfg: ZooConfig, records, ds: Dataset, pool: TriggerPool, *, checkpoint_dir=None,
                mesh="auto", desc: str = "zoo") -> tuple[dict, np.ndarray, np.ndarray, float]:
    """Train the models of `records` together: (stacked variables as numpy, clean_acc, asr, images/s).
    With several processes every process calls this with the same arguments and gets the same results."""
    t = cfg.train
    n_models = len(records)
    n = len(ds.x_train)
    if t.batch_size > n:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {n} training images")
    steps_per_epoch = n // t.batch_size
    if mesh == "auto":
        records = pad_for_processes(records)
        mesh = pop.model_mesh(len(records))
    tx, step, perms_fn = _programs(model, t, steps_per_epoch, cfg.zoo.mode, mesh, n + int(np.bincount(ds.y_train).max()))
    tasks = pop.tasks_from_records(records, ds.image_shape, pool.size)
    train_data = pop.shared_data(ds.x_train, ds.y_train, ds.num_classes, pool.pattern, pool.mask)
    tasks_dev = pop.place(tasks, mesh, per_model=True)
    data_dev = pop.place(train_data, mesh, per_model=False)
    states = pop.init_population(model, tx, tasks, ds.image_shape, mesh)

    order = lambda epoch: perms_fn(tasks_dev, data_dev, pop.place(np.int32(epoch), mesh, per_model=False))
    mean_loss = lambda m: {"loss": float(np.mean(distributed.to_host(m["loss"])[:n_models]))}
    t0 = time.perf_counter()
    states, n_steps = train_loop(lambda st, perms: step(st, tasks_dev, perms, data_dev), states, order,
                                 steps_per_epoch=steps_per_epoch, epochs=t.epochs, checkpoint_dir=checkpoint_dir,
                                 checkpoint_every=t.checkpoint_every, scalars=mean_loss, sync=needs_step_sync(mesh),
                                 desc=f"{desc} ({n_models} models)", show_progress=distributed.is_primary())
    jax.block_until_ready(states)
    rate = n_steps * t.batch_size * n_models / max(time.perf_counter() - t0, 1e-9)
    variables = states.variables
    test_data = pop.place(pop.shared_data(ds.x_test, ds.y_test, ds.num_classes, pool.pattern, pool.mask), mesh,
                          per_model=False)
    clean_acc, asr = pop.evaluate_population(model, variables, tasks_dev, ds.x_test, ds.y_test.astype(np.int32),
                                             test_data, batch_size=cfg.zoo.eval_batch_size, mode=cfg.zoo.mode, mesh=mesh)
    variables = jax.tree.map(lambda a: a[:n_models], distributed.to_host(variables))
    return variables, clean_acc[:n_models], asr[:n_models], rate


def train_zoo(cfg: ZooConfig, out, *, data: Dataset | None = None) -> ZooStore:
    """Train (or resume) the zoo described by cfg into the folder `out`; returns its store."""
    cfg.validate()
    ds = data if data is not None else load_zoo_data(cfg)
    ds, x_val, y_val = holdout(ds, cfg.zoo.val_fraction, cfg.seed)  # before training: never trained on
    pool = trigger_pool(cfg, ds.image_shape[-1])
    records = plan(cfg, ds, pool)
    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())
    store = ZooStore.open_or_create(out, records, cfg.zoo.chunk_size, cfg)
    for c, chunk in enumerate(store.chunks):
        if store.complete(c):
            continue
        recs = records[chunk["start"]:chunk["stop"]]
        variables, clean_acc, asr, _ = train_chunk(model, cfg, recs, ds, pool, checkpoint_dir=store.train_dir(c),
                                                   desc=f"zoo chunk {c + 1}/{len(store.chunks)}")
        if len(y_val):
            val_acc, val_asr = evaluate_models(model, cfg, recs, variables, x_val, y_val, ds.num_classes, pool)
        else:
            val_acc, val_asr = [None] * len(recs), [None] * len(recs)
        done = []
        for r, acc, a, va, vasr in zip(recs, clean_acc, asr, val_acc, val_asr):
            a = float(a) if r.poisoned else None
            vasr = float(vasr) if r.poisoned and va is not None else None
            va = None if va is None else float(va)
            # Without a validation split (allowed only without filters) every model is kept.
            kept = va is None or (va >= cfg.zoo.min_clean_acc and (vasr is None or vasr >= cfg.zoo.min_asr))
            done.append(dataclasses.replace(r, clean_acc=float(acc), asr=a, val_acc=va, val_asr=vasr, kept=bool(kept)))
        store.save_chunk(c, variables, done)
    return store
