"""One HTBA iteration as a pure optax-style (init, update) pair over an `HTBAState` pytree.

An iteration (Saha et al. 2020, Algorithm 1): draw K source images, paste the trigger at a random place on each,
re-match the K poisons to the K patched sources in feature space, take one gradient step on
sum_k ||f(z_k) - f(s_a(k))||^2 (an optax transformation: plain SGD as the official code, or Adam) and project onto
the eps-ball around the targets and onto [0, 1].

`update` is `finish(state, prepared, match(prepared.cost))` with `prepared = prepare(state, inputs)`; the two
halves are public so a caller can put another matcher between them (the benchmark's host-side scipy solver).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bdjax import triggers as T
from bdjax.attacks.htba.assignment import match, squared_distances
from bdjax.attacks.htba.config import HTBAConfig

# features(variables, images (B, H, W, C) in [0, 1]) -> (B, D)
FeatureFn = Callable[[Any, jax.Array], jax.Array]


class HTBAState(NamedTuple):
    poisons: jax.Array  # (K, H, W, C) float32 in [0, 1]
    targets: jax.Array  # (K, H, W, C) float32: the images the poisons started from
    key: jax.Array  # iteration i draws its sources with fold_in(key, i)
    step: jax.Array  # int32: iterations done
    lr: jax.Array  # float32: step size of the last iteration
    distance: jax.Array  # (K,) matched squared feature distances at the last iteration (before its step)
    converged: jax.Array  # bool: max(distance) < stop_distance
    best_mean: jax.Array  # float32: smallest mean of `distance` seen so far
    best_poisons: jax.Array  # the poisons at which best_mean was measured
    opt_state: Any  # the optax state of the pixel optimiser (empty for plain SGD)


class CraftInputs(NamedTuple):
    """What every iteration reads and never changes (a pytree, so it passes through jit, vmap and shard_map)."""
    variables: Any  # the feature extractor's flax variables
    sources: jax.Array  # (N, H, W, C) source-class images, uint8 or float in [0, 1]
    trigger: T.Trigger


class Prepared(NamedTuple):
    cost: jax.Array  # (K, K) squared distances, rows = poisons, columns = patched sources
    poison_feats: jax.Array  # (K, D)
    source_feats: jax.Array  # (K, D), constants of the step
    pullback: Callable  # vjp of the features at the poisons (a pytree: it can leave a jitted function)


class PoisonCrafter(NamedTuple):
    init: Callable[[jax.Array, jax.Array], HTBAState]
    update: Callable[[HTBAState, CraftInputs], HTBAState]
    prepare: Callable[[HTBAState, CraftInputs], Prepared]
    finish: Callable[[HTBAState, Prepared, jax.Array], HTBAState]


def as_unit_float(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def patched_sources(key: jax.Array, sources: jax.Array, trigger: T.Trigger, k: int) -> jax.Array:
    """K distinct source images, each with the trigger pasted at its own random position."""
    k_pick, k_place = jax.random.split(key)
    idx = jax.random.choice(k_pick, sources.shape[0], (k,), replace=False)
    return T.apply_random(k_place, as_unit_float(sources[idx]), trigger)


def poison_crafter(features: FeatureFn, config: HTBAConfig) -> PoisonCrafter:
    """The (init, update) pair for `config` (validated here); `features` maps images to (B, D) features."""
    cfg = config.validate()
    # the official schedule: lr * lr_decay ** (step // lr_decay_every)
    schedule = optax.exponential_decay(cfg.lr, cfg.lr_decay_every, cfg.lr_decay, staircase=True)
    # unit-rate directions scaled by schedule(state.step): the step, not the optimiser's own count, sets the lr
    tx = optax.sgd(1.0) if cfg.optimizer == "sgd" else optax.adam(1.0)

    def init(targets: jax.Array, key: jax.Array) -> HTBAState:
        t = as_unit_float(targets)
        k = t.shape[0]
        return HTBAState(
            poisons=t, targets=t, key=key, step=jnp.zeros((), jnp.int32), lr=jnp.asarray(cfg.lr, jnp.float32),
            distance=jnp.full((k,), jnp.inf, jnp.float32), converged=jnp.zeros((), bool),
            best_mean=jnp.asarray(jnp.inf, jnp.float32), best_poisons=t, opt_state=tx.init(t))

    def prepare(state: HTBAState, inputs: CraftInputs) -> Prepared:
        k = state.poisons.shape[0]
        patched = patched_sources(jax.random.fold_in(state.key, state.step), inputs.sources, inputs.trigger, k)
        fs = jax.lax.stop_gradient(features(inputs.variables, patched))
        fz, pullback = jax.vjp(lambda z: features(inputs.variables, z), state.poisons)
        return Prepared(squared_distances(fz, fs), fz, fs, pullback)

    def finish(state: HTBAState, prepared: Prepared, perm: jax.Array) -> HTBAState:
        diff = prepared.poison_feats - prepared.source_feats[perm]
        dist = jnp.sum(diff * diff, axis=1)
        (grad,) = prepared.pullback(2.0 * diff)
        lr = schedule(state.step).astype(jnp.float32)
        direction, opt_state = tx.update(grad, state.opt_state, state.poisons)
        z = state.poisons + lr * direction
        z = jnp.clip(state.targets + jnp.clip(z - state.targets, -cfg.eps, cfg.eps), 0.0, 1.0)
        mean = dist.mean()
        better = mean < state.best_mean
        return state._replace(
            poisons=z, step=state.step + 1, lr=lr, distance=dist,
            opt_state=opt_state,
            # The official stop test: the loss of this iteration, checked after its step was taken.
            converged=dist.max() < cfg.stop_distance,
            best_mean=jnp.where(better, mean, state.best_mean),
            best_poisons=jnp.where(better, state.poisons, state.best_poisons))

    def update(state: HTBAState, inputs: CraftInputs) -> HTBAState:
        prepared = prepare(state, inputs)
        return finish(state, prepared, match(prepared.cost, cfg.matching))

    return PoisonCrafter(init, update, prepare, finish)
