"""Data parallelism over all local devices with jax.sharding (a 1-D 'data' mesh)."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
    """A mesh over as many devices as evenly divide the batch (all of them, normally)."""
    n = len(jax.devices())
    while batch_size % n:
        n -= 1
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))
