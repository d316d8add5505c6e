"""Process-level JAX setup: expose every CPU core as its own XLA device.

Why: XLA's CPU backend runs each convolution on a single thread (measured: a 5x5x64 conv takes the same time
pinned to one core as on two), while a batch sharded over N CPU devices runs N convolutions at once.
`scripts/bench_train.py` measures the effect. Accelerator backends are unaffected: the setting only
concerns the host platform.
"""
from __future__ import annotations

import os

import jax

_ENV = "BDJAX_CPU_DEVICES"


def cpu_device_count_wanted() -> int:
    """BDJAX_CPU_DEVICES if set, else one device per usable core (at most 8: more buys nothing on CPU)."""
    if _ENV in os.environ:
        try:
            n = int(os.environ[_ENV])
        except ValueError:
            raise ValueError(f"{_ENV} must be a positive integer, got {os.environ[_ENV]!r}") from None
        if n < 1:
            raise ValueError(f"{_ENV} must be a positive integer, got {n}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def use_all_cpu_cores() -> bool:
    """Ask for one CPU device per core; a no-op (returns False) once JAX has already started its backends
    or when the user set the device count through XLA_FLAGS themselves."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", cpu_device_count_wanted())
    except RuntimeError:  # backends already initialised by the caller: keep what they chose
        return False
    return True


def device_summary() -> str:
    """A short human string for summary.json: platform, count and kind of the default devices."""
    devs = jax.devices()
    return f"{devs[0].platform}:{len(devs)}x{devs[0].device_kind}"
