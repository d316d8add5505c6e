"""Typed experiment configs: nested dataclasses, overridable field by field from the command line.

`apply_overrides(cfg, ["train.lr=0.05", "attack.target=3"])` returns a new config; a misspelled field raises a
ConfigError that lists the valid names (and the closest match), a value that does not parse names its type.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from bdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | a name under the data root (mnist, cifar10, gtsrb) | a path | a TFDS name
    data_root: str | None = None  # default: $BDJAX_DATA_ROOT, else ../shared/datasets
    tfds_dir: str | None = None  # where TFDS downloads datasets not found locally (default ~/tensorflow_datasets)
    n_train: int | None = None  # random subset sizes (None = all)
    n_test: int | None = None


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    kind: str = "badnets"  # badnets | none (a clean model)
    trigger: str = "patch"  # patch | checkerboard | pixel | pattern | blend | image
    trigger_size: int = 3
    trigger_color: float = 1.0
    trigger_image: str | None = None
    blend_alpha: float = 0.2
    placement: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left | random
    margin: int = 0
    label_map: str = "all_to_one"  # all_to_one | all_to_all | source_specific
    target: int = 0
    sources: tuple[int, ...] = ()
    poison_rate: float = 0.01
    poison_count: int | None = None  # overrides poison_rate when set
    clean_label: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "mnist_cnn"
    # fields of the model class as "name=value" (e.g. "width=8", "hidden=32"): narrower nets for CPU-sized zoos
    model_options: tuple[str, ...] = ()
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # constant | step | cosine
    lr_milestones: tuple[int, ...] = ()  # epochs at which the step schedule multiplies the lr by lr_gamma
    lr_gamma: float = 0.1
    augment: str = "none"  # none | flip | crop | crop_flip
    crop_padding: int = 4
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # epochs between checkpoints (0 = only at the end)
    # top-level parameter names to train (e.g. "fc8": finetune the last layer); the others stay frozen. () = all
    trainable: tuple[str, ...] = ()

    def model_kwargs(self) -> dict[str, Any]:
        """model_options parsed: JSON values (numbers, lists, booleans), anything else kept as a string."""
        out = {}
        for item in self.model_options:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"train.model_options entries must look like name=value, got {item!r}")
            try:
                out[name.strip()] = json.loads(value)
            except json.JSONDecodeError:
                out[name.strip()] = value.strip()
        return out

    def checks(self, prefix: str = "train.") -> list[tuple]:
        """(ok, field, expected, got) rows, shared by every config that holds a train section."""
        return [
            (self.epochs >= 1, prefix + "epochs", ">= 1", self.epochs),
            (self.batch_size >= 1, prefix + "batch_size", ">= 1", self.batch_size),
            (self.lr > 0, prefix + "lr", "> 0", self.lr),
            (self.weight_decay >= 0, prefix + "weight_decay", ">= 0", self.weight_decay),
            (self.optimizer in ("sgd", "adam"), prefix + "optimizer", "sgd or adam", self.optimizer),
            (self.schedule in ("constant", "step", "cosine"), prefix + "schedule", "constant, step or cosine", self.schedule),
            (self.augment in ("none", "flip", "crop", "crop_flip"), prefix + "augment", "none, flip, crop or crop_flip",
             self.augment),
            (self.eval_batch_size >= 1, prefix + "eval_batch_size", ">= 1", self.eval_batch_size),
            (self.checkpoint_every >= 0, prefix + "checkpoint_every", ">= 0", self.checkpoint_every),
        ]


def raise_failed(checks) -> None:
    """ConfigError for the first failed (ok, field, expected, got) row."""
    for ok, field, expected, got in checks:
        if not ok:
            raise ConfigError(f"{field} must be {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    experiment: str = "badnets"
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "ExperimentConfig":
        """Checks that need no data; data-dependent ones (target < classes, trigger fits) run after loading."""
        a, t = self.attack, self.train
        checks = [
            (a.kind in ("badnets", "none"), "attack.kind", "badnets or none", a.kind),
            (a.poison_count is not None or 0 < a.poison_rate <= 1, "attack.poison_rate", "a fraction in (0, 1]", a.poison_rate),
            (a.poison_count is None or a.poison_count >= 1, "attack.poison_count", ">= 1", a.poison_count),
            (a.trigger_size >= 1, "attack.trigger_size", ">= 1", a.trigger_size),
            (0 <= a.trigger_color <= 1, "attack.trigger_color", "a value in [0, 1]", a.trigger_color),
            (0 < a.blend_alpha <= 1, "attack.blend_alpha", "a value in (0, 1]", a.blend_alpha),
            (a.margin >= 0, "attack.margin", ">= 0", a.margin),
            *t.checks(),
        ]
        raise_failed(checks)
        return self


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def saved_form(cfg) -> dict:
    """A config (dataclass or plain dict) as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg))


def matches_saved(saved: dict, cfg) -> bool:
    """Whether a config saved as JSON describes `cfg`. Fields added to bdjax since it was saved count as their
    defaults, so a run or zoo written by an older bdjax still resumes when nothing it used has changed."""
    current = saved_form(cfg)
    if saved == current or not dataclasses.is_dataclass(cfg):
        return saved == current
    try:
        return saved_form(from_dict(type(cfg), saved)) == current
    except (ConfigError, TypeError):
        return False


def from_dict(cls, d: dict[str, Any]):
    """Rebuild a config from its dict (e.g. a saved config.json), rejecting unknown fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} for {cls.__name__}; valid: {', '.join(fields)}")
    kw = {}
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kw[name] = from_dict(hint, value)
        elif isinstance(value, list):
            kw[name] = tuple(value)
        else:
            kw[name] = value
    return cls(**kw)


def _parse(text: str, hint, field: str):
    """Parse one command-line value according to the field's type annotation."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(text, inner, field)
    if origin is tuple:
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        return tuple(_parse(s.strip(), args[0], field) for s in items)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
    except ValueError:
        pass
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{field}={text!r}: expected a value of type {name}")


def field_names(cfg, prefix: str = "") -> list[str]:
    """Every overridable dotted field name of a config, e.g. ['seed', 'train.lr', ...]."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += field_names(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _set(cfg, path: list[str], text: str, full: str):
    head = path[0]
    value = getattr(cfg, head)
    if len(path) > 1:
        return dataclasses.replace(cfg, **{head: _set(value, path[1:], text, full)})
    hint = typing.get_type_hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _parse(text, hint, full)})


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.field=value` strings to a (frozen) config and return the new one."""
    valid = field_names(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form field=value (e.g. train.lr=0.05)")
        key, text = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {key!r}.{hint} Valid fields: {', '.join(valid)}")
        cfg = _set(cfg, key.split("."), text.strip(), key)
    return cfg
