"""Label maps of backdoor attacks: which samples may be poisoned and what label they get."""
from __future__ import annotations

import dataclasses

import numpy as np

from bdjax.errors import ConfigError

LABEL_MAPS = ("all_to_one", "all_to_all", "source_specific")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    kind: str = "all_to_one"
    target: int = 0
    sources: tuple[int, ...] = ()  # only for source_specific

    def validate(self, num_classes: int) -> None:
        if self.kind not in LABEL_MAPS:
            raise ConfigError(f"unknown label map {self.kind!r}; expected one of {', '.join(LABEL_MAPS)}")
        if self.kind != "all_to_all" and not 0 <= self.target < num_classes:
            raise ConfigError(f"target label {self.target} is outside the {num_classes} classes (0..{num_classes - 1})")
        if self.kind == "source_specific":
            if not self.sources:
                raise ConfigError("source_specific label map needs at least one source class (attack.sources)")
            bad = [s for s in self.sources if not 0 <= s < num_classes or s == self.target]
            if bad:
                raise ConfigError(f"source classes {bad} must be in 0..{num_classes - 1} and differ from the target {self.target}")

    def eligible(self, y: np.ndarray) -> np.ndarray:
        """Samples whose trigger should flip the label: the ones an attacker poisons and ASR is measured on."""
        if self.kind == "all_to_one":
            return y != self.target
        if self.kind == "source_specific":
            return np.isin(y, self.sources)
        return np.ones_like(y, dtype=bool)

    def relabel(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        if self.kind == "all_to_all":
            return ((y + 1) % num_classes).astype(y.dtype)
        return np.full_like(y, self.target)
