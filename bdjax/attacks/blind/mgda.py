"""Multiple-gradient descent (MGDA, Desideri 2012; Sener and Koltun 2018) for the blind backdoor's tasks.

MGDA weights the tasks by the min-norm point of the convex hull of their gradients,
    w* = argmin_{w in simplex} |sum_i w_i g_i|^2 = argmin w^T G w,   G_ij = <g_i, g_j>,
so everything here works on the K x K Gram matrix G (K = 2 or 3 tasks): the parameter-sized gradients are
touched once, to build G. Two tasks have a closed form; three or more use projected gradient descent
(accelerated, FISTA) onto the simplex. Both are pure and jittable.

Normalisation (the reference code's options) rescales each task's gradient before the min-norm problem:
'l2' by its norm, 'loss' by its loss, 'loss+' by min(loss * norm, 10), 'none' not at all. As in the reference,
the weights found on the rescaled gradients then weight the RAW losses: the scale only decides the balance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from optax.projections import projection_simplex

from bdjax.errors import ConfigError

NORMALIZATIONS = ("loss+", "loss", "l2", "none")
LOSS_PLUS_CAP = 10.0  # the reference caps loss * |g| at 10, so a huge early loss does not silence its task
EPS = 1e-5  # added to every scale (the reference's), so a task with a zero gradient does not divide by zero


def check_normalization(name: str) -> str:
    if name not in NORMALIZATIONS:
        raise ConfigError(f"unknown gradient normalisation {name!r}; expected one of {', '.join(NORMALIZATIONS)}")
    return name


def flat(tree) -> jax.Array:
    """A gradient pytree as one float32 vector."""
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def gram(grads: list) -> jax.Array:
    """K x K inner products of K gradient pytrees (same structure)."""
    v = jnp.stack([flat(g) for g in grads])
    return v @ v.T


def task_scales(G: jax.Array, losses: jax.Array, normalization: str) -> jax.Array:
    """Per-task divisor of the gradient under a normalisation (a constant: no gradient flows through it)."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    losses = jnp.asarray(losses, jnp.float32)
    if normalization == "l2":
        s = norms
    elif normalization == "loss":
        s = losses
    elif normalization == "loss+":
        s = jnp.minimum(losses * norms, LOSS_PLUS_CAP)
    elif normalization == "none":
        s = jnp.ones_like(losses)
    else:
        check_normalization(normalization)
    return lax.stop_gradient(s + EPS)


def min_norm_2(G: jax.Array, clip: float = 1e-3) -> jax.Array:
    """Closed form for two tasks: gamma = <g2 - g1, g2> / |g1 - g2|^2 on g1, clipped to [clip, 1 - clip]
    (the reference clips at 0.001 so neither task is ever switched off entirely). Equal gradients: 1/2."""
    g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
    denom = g11 + g22 - 2.0 * g12
    gamma = jnp.where(denom > 1e-12 * (g11 + g22 + 1e-30), (g22 - g12) / jnp.where(denom > 0, denom, 1.0), 0.5)
    gamma = jnp.clip(gamma, clip, 1.0 - clip)
    return jnp.stack([gamma, 1.0 - gamma])


def min_norm_simplex(G: jax.Array, steps: int = 200) -> jax.Array:
    """argmin_{w in simplex} w^T G w by accelerated projected gradient (FISTA) with step 1 / L, L = 2 lambda_max(G).
    G is first divided by its largest diagonal entry (scale-free: gradients of 1e-4 and of 1e2 converge alike)."""
    K = G.shape[0]
    G = G / jnp.maximum(jnp.max(jnp.diagonal(G)), 1e-30)
    lipschitz = 2.0 * jnp.maximum(jnp.linalg.eigvalsh(G)[-1], 1e-12)
    w0 = jnp.full((K,), 1.0 / K, G.dtype)

    def body(_, carry):
        w, z, t = carry
        w_next = projection_simplex(z - (2.0 * G @ z) / lipschitz)
        t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return w_next, w_next + ((t - 1.0) / t_next) * (w_next - w), t_next

    w, _, _ = lax.fori_loop(0, steps, body, (w0, w0, jnp.ones((), G.dtype)))
    return w


def mgda_weights(G: jax.Array, losses: jax.Array, normalization: str = "loss+", *, clip: float = 1e-3,
                 steps: int = 200) -> jax.Array:
    """The task weights (a point of the simplex) for Gram matrix G of the raw gradients and the raw losses."""
    s = task_scales(G, losses, normalization)
    Gn = lax.stop_gradient(G) / (s[:, None] * s[None, :])
    return min_norm_2(Gn, clip) if G.shape[0] == 2 else min_norm_simplex(Gn, steps)


def brute_force_min_norm(G: np.ndarray, resolution: int = 200) -> np.ndarray:
    """Reference solution for tests and debugging: the best point of a regular grid on the simplex (K <= 3)."""
    G = np.asarray(G, np.float64)
    K = G.shape[0]
    if K == 2:
        a = np.linspace(0, 1, resolution + 1)
        W = np.stack([a, 1 - a], 1)
    elif K == 3:
        i, j = np.meshgrid(np.arange(resolution + 1), np.arange(resolution + 1), indexing="ij")
        keep = i + j <= resolution
        a, b = i[keep] / resolution, j[keep] / resolution
        W = np.stack([a, b, 1 - a - b], 1)
    else:
        raise ValueError("brute_force_min_norm handles 2 or 3 tasks")
    values = np.einsum("nk,kl,nl->n", W, G, W)
    return W[np.argmin(values)]
