"""`bdjax demo`'s config: the BadNets run on the embedded digits, the four defenses on it, and the digits zoo with
Universal Litmus Patterns, as one config whose every field is a `section.field=value` override."""
from __future__ import annotations

import dataclasses

from bdjax.pipelines.defend import DefendConfig
from bdjax.pipelines.ulp import ULPExperimentConfig, demo_ulp_config


@dataclasses.dataclass(frozen=True)
class DemoConfig(DefendConfig):
    experiment: str = "demo"  # the run's name, recorded in summary.json
    zoo_ulp: ULPExperimentConfig = dataclasses.field(default_factory=demo_ulp_config)  # zoo + ULP half (--no-zoo skips)

    DERIVED = {"defend.seed": "seed", "zoo_ulp.seed": "seed"}  # one seed for the whole demo

    def validate(self) -> "DemoConfig":
        super().validate()
        self.ulp_config().validate()
        return self

    def ulp_config(self) -> ULPExperimentConfig:
        return dataclasses.replace(self.zoo_ulp, seed=self.seed)
