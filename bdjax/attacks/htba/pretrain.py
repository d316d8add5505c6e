"""A feature network for HTBA when no pretrained weights can be downloaded: train it with bdjax on classes disjoint
from the attacked ones, so neither the source nor the target was seen before finetuning (as with ImageNet AlexNet
and the paper's held-out pairs)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bdjax.attacks.htba.victim import class_index, select_classes
from bdjax.errors import ConfigError


def other_classes(num_classes: int, exclude: Sequence[int]) -> list[int]:
    """Every class but `exclude` (the pair, or the target), ascending: the pretraining classifier's outputs."""
    exclude = {int(c) for c in exclude}
    if not exclude <= set(range(num_classes)):
        raise ConfigError(f"htba excluded classes {sorted(exclude)} are not classes 0..{num_classes - 1}")
    kept = [c for c in range(num_classes) if c not in exclude]
    if len(kept) < 2:
        raise ConfigError(f"htba pretraining needs at least 2 classes besides {sorted(exclude)}")
    return kept


def pretrain_features(model, cfg, x, y, *, exclude: Sequence[int], num_classes: int, per_class: int | None = None,
                      seed: int = 0, run=None, desc: str = "pretrain"):
    """Train `model` (num_classes = number of kept classes) on the images of every class but `exclude`; returns
    (TrainState, kept classes). With `run`, the weights are checkpointed there and a rerun resumes / reuses them."""
    from bdjax.train.loop import fit

    kept = other_classes(num_classes, exclude)
    if getattr(model, "num_classes", len(kept)) != len(kept):
        raise ConfigError(f"htba pretraining model has {model.num_classes} outputs, expected {len(kept)} classes")
    xs, ys = select_classes(x, np.asarray(y), kept, per_class, seed)
    return fit(model, cfg, xs, class_index(ys, kept), seed=seed, run=run, desc=desc), kept
