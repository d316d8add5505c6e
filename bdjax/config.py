"""Typed experiment configs: nested dataclasses, overridable field by field from the command line.

`apply_overrides(cfg, ["train.lr=0.05", "attack.target=3"])` returns a new config; a misspelled field raises a
ConfigError that lists the valid names (and the closest match), a value that does not parse names its type.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from typing import Any

from bdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | a name under the data root (mnist, cifar10, gtsrb) | a path | a TFDS name
    data_root: str | None = None  # default: $BDJAX_DATA_ROOT, else ../shared/datasets
    tfds_dir: str | None = None  # where TFDS downloads datasets not found locally (default ~/tensorflow_datasets)
    n_train: int | None = None  # seeded random subset of the training images (None = all)
    n_test: int | None = None  # seeded random subset of the test images (None = all)
    # only these classes, relabelled 0..k-1 in this order (empty = all), e.g. 0,1,2 for the demo's zoo
    classes: tuple[int, ...] = ()

    def load(self, seed: int = 0):
        """The dataset with the class selection, then the seeded n_train / n_test subsets, applied."""
        from bdjax.data import load_dataset

        ds = load_dataset(self.dataset, data_root=self.data_root, data_dir=self.tfds_dir).select_classes(self.classes)
        if self.n_train is not None or self.n_test is not None:
            ds = ds.subset(self.n_train, self.n_test, seed=seed)
        return ds

    def checks(self, prefix: str = "data.") -> list[tuple]:
        # 0 is falsy: it used to mean "all" silently
        return [(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1), prefix + name,
                 ">= 1 or none (all)", n) for name, n in (("n_train", self.n_train), ("n_test", self.n_test))]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    kind: str = "badnets"  # badnets | none (a clean model)
    trigger: str = "patch"  # patch | checkerboard | pixel | pattern | blend | image
    trigger_size: int = 3  # side of the square trigger, pixels
    trigger_color: float = 1.0  # intensity of the patch / pattern pixels, in [0, 1]
    trigger_image: str | None = None  # image file of attack.trigger=image
    blend_alpha: float = 0.2  # opacity of attack.trigger=blend
    placement: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left | random
    margin: int = 0  # pixels between the trigger and the image border
    label_map: str = "all_to_one"  # all_to_one | all_to_all | source_specific
    target: int = 0  # the attacker's label (all_to_one, source_specific)
    sources: tuple[int, ...] = ()  # source labels of label_map=source_specific
    poison_rate: float = 0.01  # fraction of the training set poisoned
    poison_count: int | None = None  # overrides poison_rate when set
    clean_label: bool = False  # poison only target-class images, labels unchanged


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "mnist_cnn"  # mnist_cnn | ulp_cnn | cifar_cnn | resnet18 | preact_resnet18 | madry_resnet | alexnet
    # fields of the model class as "name=value" (e.g. "width=8", "hidden=32"): narrower nets for CPU-sized zoos
    model_options: tuple[str, ...] = ()
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per step (split over the devices)
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum (0: plain SGD)
    weight_decay: float = 5e-4  # L2 added to the gradient
    schedule: str = "cosine"  # constant | step | cosine
    lr_milestones: tuple[int, ...] = ()  # epochs at which the step schedule multiplies the lr by lr_gamma
    lr_gamma: float = 0.1  # factor of the step schedule at each milestone
    augment: str = "none"  # none | flip | crop | crop_flip
    crop_padding: int = 4  # zero padding of the random crop, pixels
    eval_batch_size: int = 1000  # images per evaluation call
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
        ms = tuple(self.lr_milestones)
        return [
            (self.epochs >= 1, prefix + "epochs", ">= 1", self.epochs),
            (self.batch_size >= 1, prefix + "batch_size", ">= 1", self.batch_size),
            (_finite(self.lr) and self.lr > 0, prefix + "lr", "a finite number > 0", self.lr),
            (_finite(self.momentum) and 0 <= self.momentum < 1, prefix + "momentum", "in [0, 1)", self.momentum),
            (_finite(self.weight_decay) and self.weight_decay >= 0, prefix + "weight_decay", "a finite number >= 0",
             self.weight_decay),
            (_finite(self.lr_gamma) and self.lr_gamma > 0, prefix + "lr_gamma", "a finite number > 0", self.lr_gamma),
            (list(ms) == sorted(set(ms)), prefix + "lr_milestones", "strictly increasing epochs", ms),
            (self.schedule != "step" or (ms and 0 < ms[0] and ms[-1] < self.epochs), prefix + "lr_milestones",
             f"epochs strictly between 0 and train.epochs={self.epochs} for the step schedule", ms),
            (self.crop_padding >= 0, prefix + "crop_padding", ">= 0", self.crop_padding),
            (self.optimizer in ("sgd", "adam"), prefix + "optimizer", "sgd or adam", self.optimizer),
            (self.schedule in ("constant", "step", "cosine"), prefix + "schedule", "constant, step or cosine", self.schedule),
            (self.augment in ("none", "flip", "crop", "crop_flip"), prefix + "augment", "none, flip, crop or crop_flip",
             self.augment),
            (self.eval_batch_size >= 1, prefix + "eval_batch_size", ">= 1", self.eval_batch_size),
            (self.checkpoint_every >= 0, prefix + "checkpoint_every", ">= 0", self.checkpoint_every),
        ]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SEED_MAX = 2**31 - 1  # zoo seeds are derived as 2 * seed + 1 and drawn into int32 per-model seeds


def seed_check(seed, field: str = "seed") -> tuple:
    ok = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX
    return (ok, field, f"an integer in [0, {SEED_MAX}]", seed)


def raise_failed(checks) -> None:
    """ConfigError for the first failed (ok, field, expected, got) row."""
    for ok, field, expected, got in checks:
        if not ok:
            raise ConfigError(f"{field} must be {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    experiment: str = "badnets"  # the run's name, recorded in summary.json
    seed: int = 0  # every random draw of the run (subsets, poisons, init, batches) derives from it
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "ExperimentConfig":
        """Checks that need no data; data-dependent ones (target < classes, trigger fits) run after loading."""
        a, t = self.attack, self.train
        checks = [
            seed_check(self.seed),
            *self.data.checks(),
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


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"section.field": value}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def changed_fields(saved: dict, cfg, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted names of the fields whose value in a saved config (JSON) differs from `cfg`'s, leaving out the
    top-level sections or fields named in `ignore`; fields added to bdjax since it was saved count as their
    defaults, as in matches_saved."""
    if dataclasses.is_dataclass(cfg):
        try:
            saved = saved_form(from_dict(type(cfg), saved))
        except (ConfigError, TypeError):
            pass  # a field since removed or renamed: compare what is there
    old, new = flatten(saved), flatten(saved_form(cfg))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k.split(".")[0] not in ignore)


def _upgrade(cls, d: dict) -> dict:
    """A saved dict with the fields a class has since moved (its RENAMED = {"old": "new.dotted.path"}) in their
    new places, so a run saved before the move still reads back."""
    renamed = getattr(cls, "RENAMED", None)
    if not renamed:
        return d
    d = json.loads(json.dumps(d))
    for old, new in renamed.items():
        if old in d:
            value = d.pop(old)
            *path, last = new.split(".")
            node = d
            for part in path:
                node = node.setdefault(part, {})
            node.setdefault(last, value)
    return d


def from_dict(cls, d: dict[str, Any]):
    """Rebuild a config from its dict (e.g. a saved config.json), rejecting unknown fields."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected an object of {cls.__name__} fields, got {type(d).__name__}")
    d = _upgrade(cls, d)
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
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{field}={text!r}: expected a value of type float") from None
        if not math.isfinite(value):  # no bdjax setting means anything at inf or nan
            raise ConfigError(f"{field}={text!r}: expected a finite number")
        return value
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is str:
            return text
    except ValueError:
        pass
    raise ConfigError(f"{field}={text!r}: expected a value of type {type_name(hint)}")


def type_name(hint) -> str:
    """'int', 'str | None', 'tuple[int, ...]': a field's annotation as a user reads it."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def derived_fields(cls, prefix: str = "") -> dict[str, str]:
    """{dotted field: the field it is set from} for fields a command fills in itself (a class's DERIVED, e.g.
    {"ulp.seed": "seed"}), so they are not offered as overrides that would be silently replaced."""
    out = {prefix + k: prefix + v for k, v in getattr(cls, "DERIVED", {}).items()}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(derived_fields(hints[f.name], f"{prefix}{f.name}."))
    for k, v in out.items():  # resolve chains: defend.nc.seed <- defend.seed <- seed
        while v in out:
            v = out[v]
        out[k] = v
    return out


def _leaf_names(cfg, prefix: str) -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaf_names(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def field_names(cfg, prefix: str = "") -> list[str]:
    """Every overridable dotted field name of a config, e.g. ['seed', 'train.lr', ...]."""
    derived = derived_fields(type(cfg), prefix)
    return [n for n in _leaf_names(cfg, prefix) if n not in derived]


# ------------------------------------------------------------------------------------------------ field docs

FIELD_DOCS: dict[type, dict[str, str]] = {}  # docs of fields whose class has no comment beside them


def document(cls, **docs: str) -> None:
    """Register one-line docs for fields of a config class that cannot carry comments (e.g. another module's)."""
    FIELD_DOCS.setdefault(cls, {}).update(docs)


def _comment_docs(cls) -> dict[str, str]:
    """The comments beside (trailing) or directly above each field in the class's source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    lines = src.splitlines()
    docs = {}
    for stmt in ast.parse(src).body[0].body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, row = [], stmt.lineno - 1
        while row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
        if above or trailing:
            docs[stmt.target.id] = " ".join(above + trailing)
    return docs


def field_docs(cls) -> dict[str, str]:
    docs = {}
    for klass in reversed(cls.__mro__):  # a subclass's docs win
        if dataclasses.is_dataclass(klass):
            docs.update(_comment_docs(klass))
            docs.update({f.name: f.metadata["doc"] for f in dataclasses.fields(klass) if "doc" in f.metadata})
            docs.update(FIELD_DOCS.get(klass, {}))
    return docs


def describe(cfg) -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, value, one-line doc) of every overridable field of a config, in declaration order."""
    derived = derived_fields(type(cfg))
    rows = []

    def walk(c, prefix):
        hints, docs = _hints(type(c)), field_docs(type(c))
        for f in dataclasses.fields(c):
            value = getattr(c, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif prefix + f.name not in derived:
                rows.append((prefix + f.name, type_name(hints[f.name]), value, docs.get(f.name, "")))

    walk(cfg, "")
    return rows


def _set(cfg, path: list[str], text: str, full: str):
    head = path[0]
    value = getattr(cfg, head)
    if len(path) > 1:
        return dataclasses.replace(cfg, **{head: _set(value, path[1:], text, full)})
    hint = _hints(type(cfg))[head]
    return dataclasses.replace(cfg, **{head: _parse(text, hint, full)})


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.field=value` strings to a (frozen) config and return the new one."""
    valid = field_names(cfg)
    derived = derived_fields(type(cfg))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form field=value (e.g. train.lr=0.05)")
        key, text = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if key in derived:
            raise ConfigError(f"{key} is set from {derived[key]}: override {derived[key]} instead")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {key!r}.{hint} Valid fields: {', '.join(valid)}")
        cfg = _set(cfg, key.split("."), text.strip(), key)
    return cfg
