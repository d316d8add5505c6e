"""Jigsaw (Noroozi and Favaro 2016), seeds/000's second contrast case (reported, like RotNet, as not backdoored):
cut each image into grid x grid tiles, shuffle them by one permutation of a fixed set and predict which one. The
network is context-free: one backbone (a bdjax model) encodes every tile, the tiles' features are concatenated in
their shuffled order and an MLP classifies the permutation. Linear evaluation reads the backbone's penultimate
features of whole images, as for the other methods.

Per image: the light supervised augmentation (crop + flip), random grayscale (gray_p), then each tile is a random
`tile`-pixel crop inside its cell, so neighbouring tiles do not meet edge to edge (the paper's gap against the
edge-continuity shortcut), and each tile is normalised by its own mean and standard deviation (against the
low-level statistics shortcut).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.errors import ConfigError
from bdjax.ssl.augment import grayscale
from bdjax.train.augment import augment

ALL_CANDIDATES_UP_TO = math.factorial(9)  # grid 3: search all 9! orders; larger grids draw random candidates
RANDOM_CANDIDATES = 100_000


@dataclasses.dataclass(frozen=True)
class JigsawConfig:
    grid: int = 3  # tiles per side
    tile: int = 8  # tile side in pixels, at most image_size // grid (CIFAR-10: cells of 10, a 0-2 px jitter)
    n_permutations: int = 100  # the paper: 1000 of the 9! orders; 100 at CIFAR scale
    hidden: int = 512  # the MLP over the concatenated tile features
    gray_p: float = 0.3
    augment: str = "crop_flip"  # bdjax.train.augment, on the whole image before tiling
    permutation_seed: int = 0

    def validate(self) -> "JigsawConfig":
        if self.grid < 2:
            raise ConfigError(f"jigsaw.grid must be >= 2, got {self.grid}")
        n_orders = math.factorial(self.grid * self.grid)
        if not 2 <= self.n_permutations <= min(n_orders, RANDOM_CANDIDATES):
            raise ConfigError(f"jigsaw.n_permutations must be in [2, {min(n_orders, RANDOM_CANDIDATES)}] for a "
                              f"{self.grid}x{self.grid} grid, got {self.n_permutations}")
        if self.tile < 1 or self.hidden < 1:
            raise ConfigError("jigsaw.tile and jigsaw.hidden must be positive")
        if not 0 <= self.gray_p <= 1:
            raise ConfigError(f"jigsaw.gray_p must be a probability in [0, 1], got {self.gray_p}")
        if self.augment not in ("none", "flip", "crop", "crop_flip"):
            raise ConfigError(f"jigsaw.augment must be none, flip, crop or crop_flip, got {self.augment!r}")
        return self

    def check_image(self, image_shape) -> None:
        """A tile must fit inside its cell of the image."""
        side = min(image_shape[0], image_shape[1])
        if self.tile > side // self.grid:
            raise ConfigError(f"jigsaw.tile={self.tile} does not fit a cell of a {side}-pixel image cut "
                              f"{self.grid}x{self.grid} (at most {side // self.grid})")


def permutation_set(n: int, grid: int = 3, seed: int = 0) -> np.ndarray:
    """(n, grid * grid) int32 orders of the tiles, chosen greedily for a large minimum Hamming distance between
    any two (Noroozi and Favaro's maximal-Hamming selection): start from a seeded random order, then repeatedly
    add the candidate farthest from every order chosen so far. Candidates: all orders for grids up to 3x3, else
    100000 seeded random ones. Written here: no library ships this selection."""
    return _permutation_set(n, grid, seed).copy()


@functools.lru_cache(maxsize=8)
def _permutation_set(n: int, grid: int, seed: int) -> np.ndarray:
    """The selection itself, cached: a 3x3 grid searches all 9! orders (about a second for 100), and the clean
    and the backdoored pretraining of one experiment build the same set."""
    k = grid * grid
    rng = np.random.default_rng(seed)
    if math.factorial(k) <= ALL_CANDIDATES_UP_TO:
        cands = np.array(list(itertools.permutations(range(k))), np.int8)
    else:
        cands = np.unique(np.argsort(rng.random((RANDOM_CANDIDATES, k)), axis=1).astype(np.int16), axis=0)
    pick = int(rng.integers(len(cands)))
    chosen = [pick]
    min_dist = np.sum(cands != cands[pick], axis=1)
    for _ in range(n - 1):
        pick = int(np.argmax(min_dist))  # the first of the farthest: deterministic
        chosen.append(pick)
        min_dist = np.minimum(min_dist, np.sum(cands != cands[pick], axis=1))
    return cands[chosen].astype(np.int32)


def cut_tiles(x: jax.Array, offsets: jax.Array, grid: int, tile: int) -> jax.Array:
    """(B, H, W, C) -> (B, grid * grid, tile, tile, C), cells in row-major order; offsets (B, grid * grid, 2)
    integer (dy, dx) of each tile inside its cell."""
    cell = x.shape[1] // grid, x.shape[2] // grid
    corners = np.array([(r * cell[0], c * cell[1]) for r in range(grid) for c in range(grid)], np.int32)

    def one(image, offs):
        start = jnp.asarray(corners) + offs
        return jax.vmap(lambda s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (tile, tile, image.shape[-1])))(start)
    return jax.vmap(one)(x, offsets.astype(jnp.int32))


def shuffled_tiles(key, x: jax.Array, orders: jax.Array, cfg: JigsawConfig) -> jax.Array:
    """The network's input for images x (B, H, W, C) float in [0, 1] and one order per image (B, grid * grid):
    position j holds the tile of cell orders[b, j]; each tile jittered in its cell and standardised."""
    k_off, k_gray = jax.random.split(key)
    b, h, w, c = x.shape
    if c == 3 and cfg.gray_p > 0:
        gray = jax.random.uniform(k_gray, (b,)) < cfg.gray_p
        x = jnp.where(gray[:, None, None, None], grayscale(x), x)
    k = cfg.grid * cfg.grid
    room = jnp.array([h // cfg.grid - cfg.tile, w // cfg.grid - cfg.tile])
    offsets = jnp.floor(jax.random.uniform(k_off, (b, k, 2)) * (room + 1)).astype(jnp.int32)
    tiles = cut_tiles(x, offsets, cfg.grid, cfg.tile)
    tiles = jnp.take_along_axis(tiles, orders[:, :, None, None, None], axis=1)
    mean = tiles.mean(axis=(2, 3, 4), keepdims=True)
    std = tiles.std(axis=(2, 3, 4), keepdims=True)
    return (tiles - mean) / (std + 1e-5)


class JigsawNet(nn.Module):
    """Tiles (B, K, t, t, C) -> permutation logits (B, n_permutations); one backbone shared by the K tiles."""
    backbone: nn.Module
    n_permutations: int
    hidden: int

    @nn.compact
    def __call__(self, tiles, train: bool = False):
        b, k = tiles.shape[:2]
        _, feats = self.backbone(tiles.reshape(b * k, *tiles.shape[2:]), train=train, features=True)
        h = feats["penultimate"].reshape(b, -1)  # the tiles' features side by side, in their shuffled order
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(self.n_permutations, name="fc2")(h)

    def features(self, x):
        _, feats = self.backbone(x, train=False, features=True)
        return feats["penultimate"]


def example_input(cfg: JigsawConfig):
    """Initialisation input for an image shape: one image's tiles (checks that a tile fits a cell)."""
    def make(image_shape):
        cfg.check_image(image_shape)
        return jnp.zeros((1, cfg.grid * cfg.grid, cfg.tile, cfg.tile, image_shape[-1]), jnp.float32)
    return make


def loss_fn(model: JigsawNet, cfg: JigsawConfig, orders: jax.Array):
    """Cross-entropy of the permutation index; `orders` is permutation_set(...) as an array."""
    def loss(params, state, batch, rng):
        k_aug, k_tiles, k_pick = jax.random.split(rng, 3)
        x = augment(k_aug, batch["x"], cfg.augment)
        labels = jax.random.randint(k_pick, (x.shape[0],), 0, orders.shape[0])
        tiles = shuffled_tiles(k_tiles, x, orders[labels], cfg)
        logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats}, tiles, train=True,
                                  mutable=["batch_stats"])
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return value, {"batch_stats": upd["batch_stats"], "metrics": {"loss": value, "acc": acc}}
    return loss
