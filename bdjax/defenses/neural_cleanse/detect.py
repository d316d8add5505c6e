"""Detection: reversed-trigger norms per label, the MAD anomaly index, flagged labels, a per-model score."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from bdjax.defenses.metrics import flag_small_outliers, mad_anomaly_index
from bdjax.defenses.neural_cleanse.config import MODES, NCConfig
from bdjax.defenses.neural_cleanse.optimize import reverse_engineer
from bdjax.errors import ConfigError


@dataclasses.dataclass
class NCResult:
    labels: np.ndarray  # (L,) the labels analysed
    norms: np.ndarray  # (L,) L1 norm of each label's kept mask
    anomaly_index: np.ndarray  # (L,) MAD anomaly index of the norms (over the labels analysed)
    flagged_labels: list  # labels below the median norm with anomaly index > threshold
    masks: np.ndarray  # (L, H, W) in [0, 1]
    patterns: np.ndarray  # (L, H, W, C) in [0, 1]
    reached: np.ndarray  # (L,) whether a mask reached the success threshold (else the last mask is kept)
    cost: np.ndarray  # (L,) final cost
    n_checks: np.ndarray  # (L,) check-points run per label
    early_stopped: np.ndarray  # (L,)
    steps: int  # optimisation steps run (the longest label)
    mode: str
    wall_s: float
    config: NCConfig

    def trigger(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask (H, W, 1), pattern (H, W, C)) reversed for `label`."""
        i = int(np.flatnonzero(self.labels == label)[0])
        return self.masks[i][..., None], self.patterns[i]

    def summary(self) -> dict:
        return {
            "labels": self.labels.tolist(), "norms": self.norms.tolist(),
            "anomaly_index": self.anomaly_index.tolist(), "flagged_labels": list(self.flagged_labels),
            "reached": self.reached.tolist(), "n_checks": self.n_checks.tolist(), "steps": self.steps,
            "mode": self.mode, "nc_wall_s": self.wall_s, "nc_config": dataclasses.asdict(self.config),
        }


def _check_labels(labels, num_classes: int) -> np.ndarray:
    if labels is None:
        return np.arange(num_classes, dtype=np.int32)
    arr = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).reshape(-1)
    if arr.size == 0 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= num_classes:
        raise ConfigError(f"neural cleanse labels must be a non-empty list of class indices in [0, {num_classes}), "
                          f"got {labels!r}")
    if len(set(arr.tolist())) != arr.size:
        raise ConfigError(f"neural cleanse labels must not repeat, got {arr.tolist()}")
    return arr.astype(np.int32)


def neural_cleanse(model, variables, x_clean, num_classes: int, *, labels=None, config: NCConfig = NCConfig(),
                   mode: str = "batched", progress: bool = False) -> NCResult:
    """Reverse-engineer a trigger for every label (or `labels`) and flag low-norm outliers.

    mode="batched": all labels advance together (one optimisation over a label axis); mode="sequential": the
    same code run on one label at a time (as the original scans labels), for comparison."""
    if mode not in MODES:
        raise ConfigError(f"neural cleanse mode must be one of {', '.join(MODES)}, got {mode!r}")
    labels = _check_labels(labels, num_classes)
    t0 = time.time()
    if mode == "batched":
        out = reverse_engineer(model, variables, x_clean, labels, config, progress=progress)
    else:
        parts = [reverse_engineer(model, variables, x_clean, [int(l)], config, progress=progress) for l in labels]
        out = {k: (max(p[k] for p in parts) if k == "steps" else np.concatenate([p[k] for p in parts]))
               for k in parts[0]}
    norms = out["norms"].astype(np.float64)
    flagged = [int(labels[i]) for i in flag_small_outliers(norms, config.anomaly_threshold)]
    return NCResult(labels=labels, norms=norms, anomaly_index=mad_anomaly_index(norms), flagged_labels=flagged,
                    masks=out["masks"], patterns=out["patterns"], reached=out["reached"], cost=out["cost"],
                    n_checks=out["n_checks"], early_stopped=out["early_stopped"], steps=out["steps"], mode=mode,
                    wall_s=time.time() - t0, config=config)


def model_score(result: NCResult) -> float:
    """One anomaly score per model, for model-level detection (e.g. an AUC over a zoo of models): the largest
    anomaly index among the labels whose mask norm is below the median (a backdoor makes its target's
    trigger unusually SMALL; large norms are not suspicious), 0.0 if no label is below the median."""
    norms = np.asarray(result.norms, np.float64)
    below = norms < np.median(norms)
    return float(np.max(np.asarray(result.anomaly_index)[below])) if below.any() else 0.0
