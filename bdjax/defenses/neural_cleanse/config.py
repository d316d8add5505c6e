"""Neural Cleanse settings (the official code's defaults)."""
from __future__ import annotations

import dataclasses

from bdjax.errors import ConfigError

MODES = ("batched", "sequential")


@dataclasses.dataclass(frozen=True)
class NCConfig:
    batch_size: int = 32  # clean images per step (shared by all labels)
    steps_per_check: int = 31  # Adam steps per check-point (official MINI_BATCH = 1000 // 32)
    max_checks: int = 1000  # official STEPS
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0  # up: x multiplier; down: / multiplier ** 1.5
    reset_cost_to_zero: bool = True  # start at cost 0 (official default); False: start at init_cost
    early_stop: bool = True
    early_stop_patience: int = 25  # check-points without improvement of the best norm (5 * patience)
    early_stop_threshold: float = 1.0  # "no improvement" = best >= threshold * previous best
    anomaly_threshold: float = 2.0
    checks_per_sync: int = 10  # check-points dispatched between the host's checks for early stop
    driver: str = "auto"  # host (one jitted update per step) | loop (lax.fori_loop on device) | auto (host on CPU)
    seed: int = 0

    def validate(self) -> "NCConfig":
        checks = [
            (self.batch_size >= 1, "batch_size", ">= 1"), (self.steps_per_check >= 1, "steps_per_check", ">= 1"),
            (self.max_checks >= 1, "max_checks", ">= 1"), (self.lr > 0, "lr", "> 0"),
            (0 <= self.beta1 < 1, "beta1", "in [0, 1)"), (0 <= self.beta2 < 1, "beta2", "in [0, 1)"),
            (self.init_cost > 0, "init_cost", "> 0"), (0 < self.success_threshold <= 1, "success_threshold", "in (0, 1]"),
            (self.patience >= 1, "patience", ">= 1"), (self.cost_multiplier > 1, "cost_multiplier", "> 1"),
            (self.early_stop_patience >= 1, "early_stop_patience", ">= 1"),
            (self.early_stop_threshold > 0, "early_stop_threshold", "> 0"),
            (self.anomaly_threshold > 0, "anomaly_threshold", "> 0"), (self.checks_per_sync >= 1, "checks_per_sync", ">= 1"),
            (self.driver in ("auto", "host", "loop"), "driver", "auto, host or loop"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ConfigError(f"neural cleanse {field} must be {expected}, got {getattr(self, field)!r}")
        return self
