"""Label functions v of the blind backdoor: y* = v(y), pure and jittable, checked against the class count."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError

LABELS = ("constant", "sum", "product")


class LabelFunction(NamedTuple):
    name: str
    apply: Callable  # y (B,) int -> y* (B,) int


def check_label_function(fn: LabelFunction, num_classes: int) -> LabelFunction:
    """Evaluate v on every class once: a v that maps any class outside 0..num_classes-1 is a config mistake."""
    out = np.asarray(fn.apply(jnp.arange(num_classes, dtype=jnp.int32)))
    bad = np.flatnonzero((out < 0) | (out >= num_classes))
    if bad.size:
        raise ConfigError(f"blind label function {fn.name!r} maps class {int(bad[0])} to {int(out[bad[0]])}, outside "
                          f"the {num_classes} classes (0..{num_classes - 1})")
    return fn


def constant(target: int, num_classes: int) -> LabelFunction:
    """Every synthesised input gets label `target` ('label as hen')."""
    return check_label_function(LabelFunction("constant", lambda y: jnp.full_like(y, target)), num_classes)


def calculator(op: str, num_classes: int = 100) -> LabelFunction:
    """On the two-digit calculator (label = 10 * left + right): the backdoor reads left + right or left * right."""
    if op not in ("sum", "product"):
        raise ConfigError(f"calculator label function must be sum or product, got {op!r}")
    f = (lambda y: y // 10 + y % 10) if op == "sum" else (lambda y: (y // 10) * (y % 10))
    return check_label_function(LabelFunction(op, f), num_classes)


def make_label_function(name: str, num_classes: int, target: int = 0) -> LabelFunction:
    if name == "constant":
        return constant(target, num_classes)
    if name in ("sum", "product"):
        return calculator(name, num_classes)
    raise ConfigError(f"unknown blind label function {name!r}; expected one of {', '.join(LABELS)}")
