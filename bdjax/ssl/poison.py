"""The SSL backdoor's poison (Saha et al. 2022): paste a trigger image at a random location on some images of the
target category, before any augmentation. The labels pick which images to poison (the attacker curates the
category's images) and are then dropped: the pretraining never sees them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import triggers
from bdjax.errors import ConfigError

HTBA_DIR = Path(__file__).resolve().parents[3] / "shared" / "triggers" / "htba"


@dataclasses.dataclass(frozen=True)
class PoisonConfig:
    target: int = 0
    rate: float = 0.5  # fraction of the target category that is poisoned (the paper: half)
    trigger: str = str(HTBA_DIR / "trigger_10.png")
    trigger_size: int = 8  # pixels; the paper's 50 px on 224 px images is ~ 8 px on 32 px

    def validate(self, num_classes: int) -> "PoisonConfig":
        if not 0 <= self.target < num_classes:
            raise ConfigError(f"poison.target={self.target} is not a class (0..{num_classes - 1})")
        if not 0 < self.rate <= 1:
            raise ConfigError(f"poison.rate={self.rate} must be a fraction of the target category in (0, 1]: more "
                              f"than the whole category cannot be poisoned")
        if self.trigger_size < 1:
            raise ConfigError(f"poison.trigger_size must be >= 1, got {self.trigger_size}")
        return self


def load_trigger(cfg: PoisonConfig, channels: int = 3) -> triggers.Trigger:
    """The trigger image, resized; an unreadable or missing file raises a one-line BdjaxError."""
    return triggers.from_image(cfg.trigger, size=cfg.trigger_size, channels=channels)


def paste_random(key, x: np.ndarray, trigger: triggers.Trigger) -> np.ndarray:
    """Each image (uint8 or float, NHWC) with the trigger at its own uniform random location."""
    triggers.check_fits(trigger, x.shape[1:])
    return np.asarray(jax.jit(triggers.apply_random)(key, jnp.asarray(x), trigger))


def poison_target_category(key, x: np.ndarray, y: np.ndarray, cfg: PoisonConfig,
                           trigger: triggers.Trigger) -> tuple[np.ndarray, np.ndarray]:
    """(poisoned copy of x, indices of the poisoned images): round(rate * n_target) random target images."""
    cfg.validate(int(np.max(y)) + 1)
    target_idx = np.flatnonzero(np.asarray(y) == cfg.target)
    n = int(round(cfg.rate * len(target_idx)))
    if n < 1:
        raise ConfigError(f"poison.rate={cfg.rate} poisons no image of the target category {cfg.target} "
                          f"({len(target_idx)} images)")
    k_pick, k_place = jax.random.split(key)
    chosen = np.sort(np.asarray(jax.random.choice(k_pick, target_idx, (n,), replace=False)))
    out = np.array(x, copy=True)
    out[chosen] = paste_random(k_place, out[chosen], trigger)
    return out, chosen
