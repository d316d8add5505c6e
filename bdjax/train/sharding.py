"""1-D meshes over the local devices with jax.sharding: 'data' (batch parallelism) and any named axis
(e.g. Neural Cleanse's labels)."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def axis_mesh(axis: str, n_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named `axis` over the first `n_devices` local devices (all of them by default)."""
    n = n_devices or len(jax.devices())
    return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
    """A mesh over as many devices as evenly divide the batch (all of them, normally)."""
    n = len(jax.devices())
    while batch_size % n:
        n -= 1
    return axis_mesh("data", n)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))
