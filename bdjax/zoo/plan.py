"""What a zoo holds: one record per model (clean or poisoned, trigger, source, target, corner, seed), and the
trigger pools the poisoned models draw from.

ULP's zoos (Kolouri et al. 2020): a poisoned model has all training images of one source class stamped with a 5x5
trigger at one of the 4 corners, relabelled to the target and appended to the clean set. Train/val zoos use
one pool of triggers and the test zoo a disjoint pool, so the detector is tested on triggers it never saw.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from bdjax import triggers as T
from bdjax.errors import ConfigError

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
ULP_TRIGGER_DIR = "ulp_cifar10"
# The 20 ULP CIFAR-10 masks in ../shared/triggers/ulp_cifar10 are named mask00..mask09 and mask1..mask10:
# the first ten are the training pool, the other ten the unseen test pool.
ULP_TRAIN_POOL = tuple(f"mask{i:02d}.bmp" for i in range(10))
ULP_TEST_POOL = tuple(f"mask{i}.bmp" for i in range(1, 11))


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """One model of a zoo: how it was made and (once trained) how it scored. A manifest row."""

    index: int
    poisoned: bool
    seed: int
    trigger: str | None = None  # trigger file name in the pool
    trigger_id: int | None = None  # index of the trigger in the pool
    source: int | None = None
    target: int | None = None
    corner: str | None = None
    clean_acc: float | None = None  # clean TEST accuracy
    asr: float | None = None  # accuracy on triggered source-class test images labelled target (poisoned models)
    val_acc: float | None = None  # the same two on the held-out validation images (zoo.val_fraction > 0) ...
    val_asr: float | None = None
    kept: bool | None = None  # ... which the keep-filters read: test data never chooses models

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ModelRecord))
ADDED_FIELDS = ("val_acc", "val_asr")  # absent from manifests written before they existed: read as null


def record_from_dict(d: dict, where: str) -> ModelRecord:
    """Validate one manifest row (exact fields, types) and build the record."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object with fields {', '.join(RECORD_FIELDS)}, got {type(d).__name__}")
    d = {**{k: None for k in ADDED_FIELDS}, **d}
    missing, unknown = set(RECORD_FIELDS) - set(d), set(d) - set(RECORD_FIELDS)
    if missing or unknown:
        raise ConfigError(f"{where}: fields {sorted(missing)} missing, {sorted(unknown)} unknown; expected exactly "
                          f"{', '.join(RECORD_FIELDS)}")
    types = {"index": int, "poisoned": bool, "seed": int, "trigger": str, "trigger_id": int, "source": int,
             "target": int, "corner": str, "clean_acc": float, "asr": float, "val_acc": float, "val_asr": float,
             "kept": bool}
    for name, typ in types.items():
        v = d[name]
        ok = v is None and name not in ("index", "poisoned", "seed")
        ok = ok or (isinstance(v, typ) and not (typ is int and isinstance(v, bool))) or (typ is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ConfigError(f"{where}: field {name!r} should be {typ.__name__}{'' if name in ('index', 'poisoned', 'seed') else ' or null'}, got {v!r}")
    if d["poisoned"] and any(d[k] is None for k in ("trigger", "trigger_id", "source", "target", "corner")):
        raise ConfigError(f"{where}: a poisoned model needs trigger, trigger_id, source, target and corner")
    if d["corner"] is not None and d["corner"] not in CORNERS:
        raise ConfigError(f"{where}: corner {d['corner']!r} is not one of {', '.join(CORNERS)}")
    return ModelRecord(**d)


@dataclasses.dataclass(frozen=True)
class TriggerPool:
    """Equal-sized opaque patches stacked: pattern (T, h, w, C) and mask (T, h, w, 1), float32 in [0, 1]."""

    names: tuple[str, ...]
    pattern: np.ndarray
    mask: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.pattern.shape[1], self.pattern.shape[2]

    def trigger(self, i: int) -> T.Trigger:
        return T.Trigger(self.pattern[i], self.mask[i])

    def triggers(self) -> list[T.Trigger]:
        return [self.trigger(i) for i in range(len(self.names))]


def load_trigger_pool(directory: str | Path, names, channels: int = 3, size: int | None = None) -> TriggerPool:
    """Read trigger images (BMP/PNG) from `directory` as opaque patches, resized to size x size when given;
    all must have the same size."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"trigger folder not found: {directory}")
    if not names:
        raise ConfigError(f"a trigger pool needs at least one trigger image from {directory}")
    trig = [T.from_image(directory / n, size=size, channels=channels) for n in names]
    shapes = {tuple(t.pattern.shape[:2]) for t in trig}
    if len(shapes) != 1:
        raise ConfigError(f"triggers in a pool must share one size, got {sorted(shapes)} in {directory}")
    pattern = np.stack([np.broadcast_to(np.asarray(t.pattern), (*t.pattern.shape[:2], channels)) for t in trig])
    mask = np.stack([np.asarray(t.mask) for t in trig])
    return TriggerPool(tuple(names), pattern.astype(np.float32), mask.astype(np.float32))


def random_trigger_pool(n: int, size: int, channels: int, seed: int) -> TriggerPool:
    """n opaque size x size patches of random black/white (per channel) pixels: a trigger pool that needs no
    files (the offline demo). Pools from different seeds serve as the train and the unseen test triggers."""
    if n < 1 or size < 1:
        raise ConfigError(f"a random trigger pool needs n >= 1 and size >= 1, got {n}, {size}")
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 2, (n, size, size, channels)).astype(np.float32)
    names = tuple(f"random{seed}_{i}" for i in range(n))
    return TriggerPool(names, pattern, np.ones((n, size, size, 1), np.float32))


def plan_zoo(n_clean: int, n_poisoned: int, pool: TriggerPool, num_classes: int, seed: int,
             first_index: int = 0) -> list[ModelRecord]:
    """Records for a zoo, clean and poisoned interleaved (every chunk holds both kinds). A poisoned model draws
    its trigger from the pool, a source class, a different target class and a corner, all from `seed`."""
    if n_clean < 0 or n_poisoned < 0 or n_clean + n_poisoned == 0:
        raise ConfigError(f"a zoo needs n_clean >= 0, n_poisoned >= 0 and at least one model, got {n_clean}, {n_poisoned}")
    if num_classes < 2:
        raise ConfigError(f"poisoned models need at least 2 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    kinds = np.r_[np.zeros(n_clean, bool), np.ones(n_poisoned, bool)]
    kinds = kinds[np.argsort(np.r_[np.arange(n_clean) / max(n_clean, 1), np.arange(n_poisoned) / max(n_poisoned, 1)],
                             kind="stable")]
    records = []
    for i, poisoned in enumerate(kinds):
        model_seed = int(rng.integers(0, 2**31 - 1))
        if not poisoned:
            records.append(ModelRecord(index=first_index + i, poisoned=False, seed=model_seed))
            continue
        t = int(rng.integers(len(pool.names)))
        source = int(rng.integers(num_classes))
        target = int((source + 1 + rng.integers(num_classes - 1)) % num_classes)
        records.append(ModelRecord(index=first_index + i, poisoned=True, seed=model_seed, trigger=pool.names[t],
                                   trigger_id=t, source=source, target=target,
                                   corner=CORNERS[int(rng.integers(len(CORNERS)))]))
    return records
