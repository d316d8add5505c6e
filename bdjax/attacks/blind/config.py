"""BlindConfig: the blind backdoor's settings, frozen, with one-line validation."""
from __future__ import annotations

import dataclasses
import math

from bdjax.attacks.blind.labels import LABELS
from bdjax.attacks.blind.mgda import NORMALIZATIONS
from bdjax.attacks.blind.synthesizers import SYNTHESIZERS
from bdjax.config import raise_failed

BALANCING = ("mgda", "fixed")
EVASIONS = ("none", "neural_cleanse")


@dataclasses.dataclass(frozen=True)
class BlindConfig:
    synthesizer: str = "pixel_pattern"  # pixel_pattern | single_pixel | physical
    label: str = "constant"  # constant | sum | product (the last two: the MNIST calculator)
    target: int = 8  # the constant label (8 = ship on CIFAR-10, as the reference's CIFAR config)
    balancing: str = "mgda"  # mgda | fixed
    normalization: str = "loss+"  # loss+ | loss | l2 | none (MGDA only)
    scales: tuple[float, ...] = (0.5, 0.5)  # fixed scales of (main, backdoor[, evasion]); balancing=fixed only
    # T: the attack is on at a step when the running mean of the main loss before it is below T; None/inf = always
    threshold: float | None = None
    loss_decay: float = 0.99  # the running mean is an exponential one (bias-corrected), ~1 / (1 - decay) steps
    clip: float = 1e-3  # 2-task closed form: the main weight is kept in [clip, 1 - clip] (the reference's 0.001)
    solver_steps: int = 200  # projected-gradient iterations of the 3+ task min-norm solver
    evasion: str = "none"  # none | neural_cleanse (keep true labels on the trigger Neural Cleanse reverses)
    evasion_steps_per_check: int = 10  # the inner Neural Cleanse's cost-schedule period (Adam steps)
    evasion_init_cost: float = 1e-3
    # gradient shaping (the defender's DP-SGD-style trainer): per-example clip norm S (0 = off), noise sigma * S
    shaping_clip: float = 0.0
    shaping_noise: float = 0.0
    # share of the backdoor batch that is synthesised (the rest keeps its clean inputs and labels): the reference's
    # poisoning_proportion, 1.0 in its CIFAR and MNIST configs, 0.5 for ImageNet. Below 1 the backdoor batch's
    # BatchNorm statistics no longer tell it apart from a clean batch, a shortcut that does not exist at test time
    poison_fraction: float = 1.0

    @property
    def n_tasks(self) -> int:
        return 3 if self.evasion != "none" else 2

    @property
    def always_on(self) -> bool:
        return self.threshold is None or math.isinf(self.threshold)

    def checks(self, prefix: str = "blind.") -> list[tuple]:
        t = self.threshold
        return [
            (self.synthesizer in SYNTHESIZERS, prefix + "synthesizer", " | ".join(SYNTHESIZERS), self.synthesizer),
            (self.label in LABELS, prefix + "label", " | ".join(LABELS), self.label),
            (self.balancing in BALANCING, prefix + "balancing", "mgda or fixed", self.balancing),
            (self.normalization in NORMALIZATIONS, prefix + "normalization", " | ".join(NORMALIZATIONS),
             self.normalization),
            (t is None or (not math.isnan(t) and t >= 0), prefix + "threshold", ">= 0 (or inf / none: always on)", t),
            (0 <= self.loss_decay < 1, prefix + "loss_decay", "in [0, 1)", self.loss_decay),
            (0 <= self.clip < 0.5, prefix + "clip", "in [0, 0.5)", self.clip),
            (self.solver_steps >= 1, prefix + "solver_steps", ">= 1", self.solver_steps),
            (self.evasion in EVASIONS, prefix + "evasion", "none or neural_cleanse", self.evasion),
            (self.evasion == "none" or self.label == "constant", prefix + "evasion",
             "none unless blind.label=constant (Neural Cleanse reverses one target label)", self.evasion),
            (self.evasion_steps_per_check >= 1, prefix + "evasion_steps_per_check", ">= 1", self.evasion_steps_per_check),
            (self.evasion_init_cost > 0, prefix + "evasion_init_cost", "> 0", self.evasion_init_cost),
            (self.balancing != "fixed" or (len(self.scales) == self.n_tasks and min(self.scales) >= 0),
             prefix + "scales", f"{self.n_tasks} non-negative numbers (main, backdoor"
             f"{', evasion' if self.n_tasks == 3 else ''})", self.scales),
            (self.shaping_clip >= 0, prefix + "shaping_clip", ">= 0 (0 = off)", self.shaping_clip),
            (self.shaping_noise >= 0, prefix + "shaping_noise", ">= 0", self.shaping_noise),
            (0 < self.poison_fraction <= 1, prefix + "poison_fraction", "in (0, 1]", self.poison_fraction),
        ]

    def validate(self) -> "BlindConfig":
        raise_failed(self.checks())
        return self
