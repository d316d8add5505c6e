"""`craft_poisons`: every batch of K poisons optimised to the end in one compiled call.

The iterations run in `lax.while_loop` on the device (no host round trip per iteration: the loop's state,
the source pool, the trigger and the model stay there); batches are a vmapped axis, and the batch axis is split
over the local devices with `jax.shard_map` (on CPU bdjax makes every core a device, see bdjax/runtime.py), so
each device runs its own batches and its own stopping test, with no communication between devices.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bdjax import triggers as T
from bdjax.attacks.htba.config import HTBAConfig
from bdjax.attacks.htba.crafter import CraftInputs, HTBAState, PoisonCrafter, poison_crafter
from bdjax.attacks.htba.features import check_feature_layer, feature_fn
from bdjax.attacks.htba.loop_convs import loop_friendly_convs
from bdjax.errors import ConfigError, DataError

AXIS = "batch"


class HTBAResult(NamedTuple):
    poisons: np.ndarray  # (B * K, H, W, C) float32 in [0, 1], batch-major
    targets: np.ndarray  # (B * K, H, W, C) float32: poisons[i] was started from (and stays within eps of) targets[i]
    distance: np.ndarray  # (B * K,) matched squared feature distances at each batch's last iteration
    iterations: np.ndarray  # (B,) iterations run per batch
    converged: np.ndarray  # (B,) whether the batch met the stop test before max_iters
    trace: np.ndarray  # (B, max_iters) mean matched squared distance per iteration; NaN after the stop


class CraftProgress:
    """The host end of the crafting progress bar. With bars on, the compiled loop hands its step to `report`
    through `jax.debug.callback` (a one-way call: nothing comes back to the device, so the iteration never waits
    on the host); `craft_poisons` points `bar` at its tqdm for the length of its call."""

    def __init__(self):
        self.bar = None

    def report(self, step) -> None:
        bar = self.bar
        if bar is not None:
            n = int(np.max(step))  # the furthest batch (batches on other devices report too)
            if n > bar.n:
                bar.update(n - bar.n)


PROGRESS = CraftProgress()


def run_to_end(crafter: PoisonCrafter, max_iters: int, state: HTBAState, inputs: CraftInputs,
               report=None):
    """Iterate `crafter.update` until the batch converges or reaches max_iters; also returns the per-iteration
    mean distance (max_iters,) so a caller can plot the descent. `report`: called with the step after each
    iteration (a progress bar), or None: no host callback at all."""

    def cond(carry):
        state, _ = carry
        return (state.step < max_iters) & ~state.converged

    def body(carry):
        state, trace = carry
        new = crafter.update(state, inputs)
        if report is not None:
            jax.debug.callback(report, new.step)
        return new, trace.at[state.step].set(new.distance.mean())

    trace = jnp.full((max_iters,), jnp.nan, jnp.float32)
    return jax.lax.while_loop(cond, body, (state, trace))


def batch_mesh(num_batches: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over as many of `devices` (default: all local devices) as evenly divide the batches."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    while num_batches % n:
        n -= 1
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


@functools.lru_cache(maxsize=16)
def make_crafter(model: nn.Module, config: HTBAConfig, mesh: jax.sharding.Mesh, progress: bool = False):
    """The compiled call `(targets (B, K, H, W, C), keys (B,), CraftInputs) -> (HTBAState, trace)`, every leaf
    with a leading batch axis; B must be a multiple of the mesh size. progress: report each step to
    `PROGRESS`. Cached: one compilation per model, config, mesh, progress and input shape."""
    features = feature_fn(model, config.feature_layer)
    if mesh.devices.flat[0].platform == "cpu":
        features = loop_friendly_convs(features)
    crafter = poison_crafter(features, config)

    def one_batch(targets, key, inputs):
        return run_to_end(crafter, config.max_iters, crafter.init(targets, key), inputs,
                          report=PROGRESS.report if progress else None)

    local = jax.vmap(one_batch, in_axes=(0, 0, None))
    # check_vma off: third-party loops inside (optax's Hungarian) start their carries from unvarying constants,
    # which the varying-type check rejects; nothing here communicates across devices, so it guards nothing.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()), out_specs=P(AXIS),
                            check_vma=False)
    return jax.jit(sharded)


def _images(name: str, x) -> np.ndarray | jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 4:
        raise DataError(f"htba {name} must be a (N, H, W, C) image array, got shape {tuple(x.shape)}")
    if x.dtype != np.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
        raise DataError(f"htba {name} must be uint8 [0, 255] or float [0, 1] images, got dtype {x.dtype}")
    if isinstance(x, np.ndarray) and x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"htba float {name} must lie in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x


def check_inputs(targets, sources, trigger: T.Trigger, config: HTBAConfig):
    """Shapes, counts and trigger size, each mistake as one line; returns the two image arrays."""
    targets, sources = _images("targets", targets), _images("sources", sources)
    if tuple(targets.shape[1:]) != tuple(sources.shape[1:]):
        raise DataError(f"htba targets and sources must have the same image shape, got {tuple(targets.shape[1:])} "
                        f"and {tuple(sources.shape[1:])}")
    H, W, C = targets.shape[1:]
    h, w = trigger.shape
    if h > H or w > W:
        raise ConfigError(f"htba trigger of size {h}x{w} is larger than the {H}x{W} images")
    if trigger.pattern.shape[-1] not in (1, C):
        raise ConfigError(f"htba trigger has {trigger.pattern.shape[-1]} channels but the images have {C}")
    k, b = config.poisons_per_batch, config.num_batches
    if targets.shape[0] < k * b:
        raise DataError(f"htba needs {k * b} target images (num_batches {b} x poisons_per_batch {k}: one per "
                        f"poison), got {targets.shape[0]}")
    if sources.shape[0] < k:
        raise DataError(f"htba needs at least poisons_per_batch = {k} source images (K distinct ones are drawn "
                        f"per iteration), got {sources.shape[0]}")
    return targets, sources


def craft_poisons(model: nn.Module, variables, targets, sources, trigger: T.Trigger,
                  config: HTBAConfig = HTBAConfig(), *, key=0,
                  devices: Sequence[jax.Device] | None = None, desc: str = "craft poisons") -> HTBAResult:
    """Hidden-trigger poisons: `num_batches` x `poisons_per_batch` images, poison i started from targets[i].

    targets / sources: (N, H, W, C) uint8 or float [0, 1] images of the target / source class (the first
    num_batches x K targets are used, in order: shuffle before if you want a random subset). `trigger`: a
    `bdjax.triggers.Trigger` (e.g. `triggers.from_image(png, size=30)`), pasted opaquely at a random place on
    every drawn source. The features are `config.feature_layer` of `model.apply(variables, x, features=True)`.
    `key`: a `jax.random.key` or an int seed; the result is a function of it. A progress bar (`desc`) counts
    the iterations unless BDJAX_PROGRESS=0.
    """
    from tqdm.auto import tqdm

    from bdjax.train.loop import progress_enabled

    config = config.validate()
    targets, sources = check_inputs(targets, sources, trigger, config)
    check_feature_layer(model, config.feature_layer, targets.shape[1:])
    key = jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key
    b, k = config.num_batches, config.poisons_per_batch
    mesh = batch_mesh(b, devices)
    split, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    t = targets[: b * k].reshape(b, k, *targets.shape[1:])
    t, keys = jax.device_put((t, jax.random.split(key, b)), split)
    inputs = jax.device_put(CraftInputs(variables, sources, trigger), replicated)
    # `keep` only picks an output: one compilation serves both values
    show = progress_enabled()
    run = make_crafter(model, dataclasses.replace(config, keep="last"), mesh, progress=show)
    with tqdm(total=config.max_iters, desc=desc, unit="it", disable=not show) as bar:
        PROGRESS.bar = bar
        try:
            state, trace = jax.block_until_ready(run(t, keys, inputs))
        finally:
            PROGRESS.bar = None
    poisons = state.best_poisons if config.keep == "best" else state.poisons
    poisons, targets_used, dist, steps, conv, trace = jax.device_get(
        (poisons, state.targets, state.distance, state.step, state.converged, trace))
    shape = (b * k, *targets.shape[1:])
    return HTBAResult(poisons.reshape(shape), targets_used.reshape(shape), dist.reshape(b * k), steps, conv, trace)
