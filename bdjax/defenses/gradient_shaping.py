"""Gradient shaping (Hong et al. 2020), the DP-SGD recipe as a defence against poisoning: each example's
gradient is clipped to L2 norm S and Gaussian noise N(0, (sigma * S)^2) is added to their sum,

    g = (sum_i clip(grad l_i, S) + N(0, sigma^2 S^2 I)) / B,

so no single example (a poison) can move the model much. `shaped_grad_fn(loss_fn, clip, noise)` turns any core
loss into a core grad_fn with per-example gradients (vmap over one-example batches). Per-example gradients are
not defined through BatchNorm's batch statistics, so models with BatchNorm are refused (DP-SGD uses GroupNorm).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from bdjax.errors import ConfigError
from bdjax.train import core


def check_shapeable(state) -> None:
    if state.batch_stats:
        raise ConfigError("gradient shaping needs per-example gradients, which BatchNorm does not have: use a model "
                          "without BatchNorm (e.g. mnist_cnn) or set the shaping clip to 0")


def shaped_grads(loss_fn: Callable, params, state, batch: dict, rng, *, clip: float, noise: float):
    """(shaped gradient, per-example aux stacked) of loss_fn(params, state, one-example batch, rng)."""
    check_shapeable(state)
    B = jax.tree.leaves(batch)[0].shape[0]
    k_ex, k_noise = jax.random.split(rng)

    per_example = core.value_and_grad(loss_fn)

    def one(example, key):
        return per_example(params, state, jax.tree.map(lambda a: a[None], example), key)

    grads, aux = jax.vmap(one)(batch, jax.random.split(k_ex, B))
    norms = jnp.sqrt(sum(jnp.sum(jnp.reshape(g, (B, -1)) ** 2, axis=1) for g in jax.tree.leaves(grads)))
    factor = jnp.minimum(1.0, clip / (norms + 1e-12))
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(k_noise, len(leaves))
    summed = [jnp.tensordot(factor, g, axes=1) + noise * clip * jax.random.normal(k, g.shape[1:], g.dtype)
              for g, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, [s / B for s in summed]), aux, norms


def shaped_grad_fn(loss_fn: Callable, clip: float, noise: float) -> Callable:
    """A core grad_fn(params, state, batch, rng) -> (grads, aux) with gradient shaping; aux["metrics"] are the
    per-example metrics averaged, plus the mean per-example gradient norm before clipping."""
    if clip <= 0 or noise < 0:
        raise ConfigError(f"gradient shaping needs clip > 0 and noise >= 0, got clip={clip} and noise={noise}")

    def grad_fn(params, state, batch, rng):
        grads, aux, norms = shaped_grads(loss_fn, params, state, batch, rng, clip=clip, noise=noise)
        metrics = jax.tree.map(jnp.mean, aux.get("metrics", {}))
        return grads, {"metrics": {**metrics, "grad_norm": jnp.mean(norms)}}
    return grad_fn
