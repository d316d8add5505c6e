"""BadNets data poisoning (Gu et al. 2017): stamp a trigger on a fraction of the training set and relabel.

The poisoned set is returned with the boolean mask of poisoned samples: the ground truth every data-filtering
defense is scored against.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import triggers as T
from bdjax.attacks.labels import LabelMap
from bdjax.errors import ConfigError

TRIGGER_KINDS = ("patch", "checkerboard", "pixel", "pattern", "blend", "image")


@dataclasses.dataclass(frozen=True)
class PoisonedSet:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int32 (N,), poisoned labels where mask is set
    mask: np.ndarray  # bool (N,), True where the sample was poisoned
    y_true: np.ndarray  # int32 (N,), the original labels

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


def make_trigger(kind: str, image_shape, *, size: int = 3, color=1.0, alpha: float = 0.2,
                 image_path: str | None = None, seed: int = 0) -> T.Trigger:
    """Build a trigger by name; `image_shape` is (H, W, C) of the images it will be stamped on."""
    C = image_shape[-1]
    if kind == "patch":
        trig = T.patch(size, C, color)
    elif kind == "checkerboard":
        trig = T.checkerboard(size, C)
    elif kind == "pixel":
        trig = T.pixel(C, color)
    elif kind == "pattern":
        trig = T.pixel_pattern(T.DEFAULT_PIXEL_PATTERN, C, color)
    elif kind == "blend":
        pattern = T.random_blend_pattern(jax.random.key(seed), image_shape)
        trig = T.blend(pattern, alpha)
    elif kind == "image":
        if not image_path:
            raise ConfigError("trigger 'image' needs attack.trigger_image (a PNG/BMP path)")
        trig = T.from_image(image_path, size, C)
    else:
        raise ConfigError(f"unknown trigger kind {kind!r}; expected one of {', '.join(TRIGGER_KINDS)}")
    T.check_fits(trig, image_shape)
    return trig


def positions(n: int, image_shape, trigger: T.Trigger, placement: str, key: jax.Array, margin: int = 0):
    """Per-sample (rows, cols) for a named placement: a corner, or 'random' (one position per sample)."""
    if placement == "random":
        keys = jax.random.split(key, n)
        rows, cols = jax.vmap(lambda k: T.random_position(k, image_shape, trigger))(keys)
        return rows, cols
    r, c = T.corner_position(image_shape, trigger, placement, margin)
    return jnp.full((n,), r), jnp.full((n,), c)


def stamp(x: np.ndarray, trigger: T.Trigger, placement: str, key: jax.Array, margin: int = 0,
          chunk: int = 4096) -> np.ndarray:
    """Stamp a uint8 host array in device-sized chunks (keeps peak device memory bounded)."""
    if len(x) == 0:
        return x.copy()
    rows, cols = positions(len(x), x.shape[1:], trigger, placement, key, margin)
    fn = jax.jit(T.apply_batch)
    out = [np.asarray(fn(x[i:i + chunk], trigger, rows[i:i + chunk], cols[i:i + chunk])) for i in range(0, len(x), chunk)]
    return np.concatenate(out)


def _poison_count(n_total: int, rate: float | None, count: int | None) -> int:
    if count is not None:
        if count < 1:
            raise ConfigError(f"poison count must be >= 1, got {count}")
        return int(count)
    if rate is None or not 0 < rate <= 1:
        raise ConfigError(f"poison rate must be in (0, 1], got {rate}")
    return max(1, int(round(rate * n_total)))


def poison_training_set(x: np.ndarray, y: np.ndarray, trigger: T.Trigger, label_map: LabelMap, num_classes: int, *,
                        rate: float | None = None, count: int | None = None, clean_label: bool = False,
                        placement: str = "bottom_right", margin: int = 0, seed: int = 0) -> PoisonedSet:
    """Poison `rate` of the whole training set (or exactly `count` samples) drawn from the eligible ones.

    Dirty-label: eligible = samples the label map would flip; their label becomes the target.
    Clean-label: eligible = samples already of the target class; labels stay, only the trigger is added.
    """
    label_map.validate(num_classes)
    T.check_fits(trigger, x.shape[1:])
    n_poison = _poison_count(len(x), rate, count)
    if clean_label:
        if label_map.kind == "all_to_all":
            raise ConfigError("clean-label poisoning needs a single target class, not the all_to_all label map")
        eligible = np.flatnonzero(y == label_map.target)
    else:
        eligible = np.flatnonzero(label_map.eligible(y))
    if n_poison > len(eligible):
        raise ConfigError(f"cannot poison {n_poison} samples: only {len(eligible)} are eligible under "
                          f"{'clean-label ' if clean_label else ''}{label_map.kind} with target {label_map.target}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, n_poison, replace=False))
    key = jax.random.key(seed)
    x_out, y_out = x.copy(), y.astype(np.int32).copy()
    x_out[chosen] = stamp(x[chosen], trigger, placement, key, margin)
    if not clean_label:
        y_out[chosen] = label_map.relabel(y[chosen], num_classes)
    mask = np.zeros(len(x), bool)
    mask[chosen] = True
    return PoisonedSet(x_out, y_out, mask, y.astype(np.int32))


def poison_test_set(x: np.ndarray, y: np.ndarray, trigger: T.Trigger, label_map: LabelMap, num_classes: int, *,
                    placement: str = "bottom_right", margin: int = 0, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Triggered copies of the test images the attack should flip (true label not the target), with their
    attack labels: ASR is the accuracy of the model on this set."""
    label_map.validate(num_classes)
    keep = label_map.eligible(y)
    xs = stamp(x[keep], trigger, placement, jax.random.key(seed), margin)
    return xs, label_map.relabel(y[keep], num_classes).astype(np.int32)
