"""Any one-model function of the training core, run for P models along a leading model axis.

How the models of one device run (`mode`):
- "vmap": jax.vmap of the one-model function. Per-model weights make every convolution a grouped convolution,
  which GPUs run well and XLA:CPU runs slowly (~15 img/s at P = 4 for the ULP CNN).
- "map": the one-model function unrolled over the models of a device: they run one after another inside the
  compiled program, each convolution an ordinary one. Faster on CPU, where XLA runs a convolution on one thread
  and the parallelism comes from sharding the model axis over the cores (bdjax makes every core a device).
  Compile time grows with the models per device, so keep chunks moderate (tens of models). (lax.map would
  compile once, but XLA:CPU runs convolutions inside loops ~50x slower.)
`default_mode()` picks "map" on CPU and "vmap" elsewhere. The model axis is sharded over a 1-D "models" mesh
with shard_map; models never communicate, so a population step has no collectives. With several processes
(bdjax.distributed) the mesh spans devices of every process: host values enter through `place` (each process
fills its own devices from its identical host copy).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bdjax import distributed
from bdjax.errors import ConfigError
from bdjax.train.core import TrainState, init_state, stream_keys

MODES = ("vmap", "map")
AXIS = "models"


def default_mode() -> str:
    return "map" if jax.devices()[0].platform == "cpu" else "vmap"


def check_mode(mode: str) -> str:
    mode = default_mode() if mode == "auto" else mode
    if mode not in MODES:
        raise ConfigError(f"population mode must be auto, {' or '.join(MODES)}, got {mode!r}")
    return mode


def over_models(fn, mode: str, n_per_model: int):
    """fn(*per_model_args, *shared_args) for one model -> the same over a leading model axis of the first
    `n_per_model` arguments (vmap, or unrolled: see the module docstring)."""
    if mode == "vmap":
        def run(*args):
            axes = (0,) * n_per_model + (None,) * (len(args) - n_per_model)
            return jax.vmap(fn, in_axes=axes)(*args)
        return run

    def run(*args):
        # Unrolled, not lax.map: XLA:CPU runs a convolution inside a while loop ~50x slower than the same
        # convolution in straight-line code (measured: 1.2 vs 93 img/s for one ULP CNN train step).
        per, shared = args[:n_per_model], args[n_per_model:]
        n = jax.tree.leaves(per)[0].shape[0]
        outs = [fn(*jax.tree.map(lambda a: a[i], per), *shared) for i in range(n)]
        return jax.tree.map(lambda *o: jnp.stack(o), *outs)
    return run


def sharded(fn, mesh, n_per_model: int, n_args: int):
    """shard_map the model axis of the first n_per_model arguments over `mesh` (None: plain function)."""
    if mesh is None:
        return fn
    specs = (P(AXIS),) * n_per_model + (P(),) * (n_args - n_per_model)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS))


def model_mesh(n_models: int):
    """A 'models' mesh over as many devices as evenly divide the population (None for one device).

    With several processes every process lends the same number of its own devices (a process outside the mesh
    could not take part in its computations); the population must then be a multiple of the process count."""
    n_proc = jax.process_count()
    k = jax.local_device_count()
    while k and n_models % (k * n_proc):
        k -= 1
    if k == 0:
        raise ConfigError(f"{n_models} models cannot be split evenly over {n_proc} processes")
    if k * n_proc == 1:
        return None
    own = [[d for d in jax.devices() if d.process_index == p][:k] for p in range(n_proc)]
    devices = [d for ds in own for d in ds]
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def place(tree, mesh, per_model: bool):
    if mesh is None:
        return jax.device_put(tree, jax.local_devices()[0])
    return distributed.put(tree, NamedSharding(mesh, P(AXIS) if per_model else P()))


def init_population(model, tx: optax.GradientTransformation, seeds, image_shape, mesh=None) -> TrainState:
    """Stacked TrainStates, model i initialised from the init stream of seeds[i]; placed on the model mesh."""
    one = lambda seed: init_state(model, tx, stream_keys(seed)["init"], image_shape)
    # lax.map: initialisation runs a forward pass, which under vmap would be a grouped convolution
    init = jax.jit(lambda s: lax.map(one, s))
    return place(init(jnp.asarray(seeds, jnp.int32)), mesh, per_model=True)  # computed whole by every process


def compile_population_step(step: Callable, mode: str = "auto", mesh=None) -> Callable:
    """A core step(state, task, perm, data) -> step over P models: (states, tasks, perms, data) with a leading
    model axis on the first three, data shared; jitted with the states donated."""
    fn = sharded(over_models(step, check_mode(mode), 3), mesh, 3, 4)
    return jax.jit(fn, donate_argnums=(0,))
