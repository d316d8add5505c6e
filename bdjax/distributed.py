"""Multi-process runs (one JAX process per host, or several on one host): joining them, global arrays,
gathering results to every process, barriers.

    bdjax zoo --out runs/zoo --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # on host 0
    bdjax zoo --out runs/zoo --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1   # on host 1

Every process runs the same program on the same host data; a global array holds each process's share on its
own devices. With one process every helper here reduces to the plain single-process call.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from bdjax.errors import ConfigError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def check_process_args(coordinator, num_processes, process_id) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) validated, or None for a single-process run."""
    n, i = _int(num_processes, "--num-processes"), _int(process_id, "--process-id")
    if not coordinator:
        if n not in (None, 1) or i not in (None, 0):
            raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT (the address of process 0)")
        return None
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if n is None or i is None:
        raise ConfigError("--coordinator needs --num-processes N and --process-id I as well")
    if n < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"--process-id must be in 0..{n - 1} for {n} processes, got {i}")
    return str(coordinator), n, i


def initialize(coordinator=None, num_processes=None, process_id=None) -> None:
    """Join a multi-process run (no-op without a coordinator). Must come before anything touches devices."""
    args = check_process_args(coordinator, num_processes, process_id)
    if args is None:
        return
    # CPU devices of different processes talk through gloo (the default since jax 0.4.3x, named here in case a
    # jax build defaults to none); an explicit choice by the user (e.g. mpi) is kept.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, n, i = args
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i)
    except RuntimeError as e:  # already started backends, unreachable coordinator, ...
        raise ConfigError(f"could not join the {n}-process run at {address} as process {i}: "
                          f"{str(e).strip().splitlines()[0][:300]}") from None


def is_primary() -> bool:
    """Process 0 writes the shared files (manifests, JSON); the others only take part in collectives."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def put(tree, sharding):
    """Host values -> arrays with `sharding`. A sharding spanning other processes' devices is filled from the
    host copy each process holds (make_array_from_callback), since device_put cannot reach their devices."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.tree.map(one, tree)


def to_host(tree):
    """Arrays -> numpy on every process; shards held by other processes are gathered (a collective: every
    process must call it)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)
