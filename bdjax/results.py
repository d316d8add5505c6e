"""Run folders: config.json, metrics.jsonl, summary.json (one schema for every attack and defense), figures."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Every summary.json has these fields; accuracies and rates are fractions in [0, 1].
SUMMARY_FIELDS = ("experiment", "dataset", "seed", "clean_acc", "asr", "wall_s", "device")
FRACTION_FIELDS = ("clean_acc", "asr", "poison_rate")


def _jsonable(v: Any):
    if hasattr(v, "tolist"):  # numpy / jax scalars and arrays
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null means 'not measured'
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a run killed while writing leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def validate_summary(summary: dict) -> None:
    missing = [k for k in SUMMARY_FIELDS if k not in summary]
    if missing:
        raise ValueError(f"summary.json is missing required fields {missing}")
    for k in FRACTION_FIELDS:
        v = summary.get(k)
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"summary field {k} must be a fraction in [0, 1] or null, got {v!r}")


class RunDir:
    def __init__(self, out: str | Path):
        self.path = Path(out)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def figure(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config_dict: dict) -> None:
        write_json(self.path / "config.json", config_dict)

    def read_config(self) -> dict | None:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, max_step: int) -> None:
        """On resume, forget records logged after the checkpoint we restart from (they will be logged again)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= max_step]
        p = self.path / "metrics.jsonl"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, p)

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def write_summary(self, summary: dict) -> dict:
        summary = _jsonable(summary)
        validate_summary(summary)
        write_json(self.path / "summary.json", summary)
        return summary
