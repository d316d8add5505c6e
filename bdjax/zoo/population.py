"""A population of P models trained together along a leading model axis, poisoned batches made on device.

Every model has its own parameters, optimiser state, initialisation, batch order, augmentation and (when
poisoned) trigger, corner, source and target; all of them live in arrays with a leading axis of P. The training
set is on device ONCE: a poisoned model's extra samples (its source class stamped with its trigger, labelled
target, appended to the clean set as in ULP) are virtual indices N..N+n_source-1 of its own permutation, and
the batch is gathered and stamped inside the compiled step. No per-model copy of the data exists anywhere.

How the models of one device run (`mode`):
- "vmap": jax.vmap of the one-model step. Per-model weights make every convolution a grouped convolution,
  which GPUs run well and XLA:CPU runs slowly (the issue measured ~15 img/s at P = 4).
- "map": the one-model step unrolled over the models of a device: they run one after another inside the
  compiled step, each convolution an ordinary one. Faster on CPU, where XLA runs a convolution on one thread
  and the parallelism comes from sharding the model axis over the cores (bdjax makes every core a device).
  Compile time grows with the models per device, so keep chunks moderate (tens of models). (lax.map would
  compile once, but XLA:CPU runs convolutions inside loops ~50x slower.)
`default_mode()` picks "map" on CPU and "vmap" elsewhere. The model axis is sharded over a 1-D "models"
mesh with shard_map; models never communicate, so the step has no collectives. With several processes
(bdjax.distributed) the mesh spans devices of every process: host values enter through `place` (each process
fills its own devices from its identical host copy) and per-model results leave through distributed.to_host.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bdjax import distributed, triggers as T
from bdjax.errors import ConfigError
from bdjax.train.augment import augment
from bdjax.train.state import TrainState
from bdjax.train.step import to_float

MODES = ("vmap", "map")
AXIS = "models"


def default_mode() -> str:
    return "map" if jax.devices()[0].platform == "cpu" else "vmap"


def check_mode(mode: str) -> str:
    mode = default_mode() if mode == "auto" else mode
    if mode not in MODES:
        raise ConfigError(f"population mode must be auto, {' or '.join(MODES)}, got {mode!r}")
    return mode


class ModelTasks(NamedTuple):
    """Per-model settings, each an array with a leading model axis."""

    poisoned: np.ndarray  # bool
    seed: np.ndarray  # int32: initialisation, batch order, augmentation, dropout
    trigger_id: np.ndarray  # int32 index into the trigger pool (0 for clean models)
    source: np.ndarray  # int32
    target: np.ndarray  # int32
    row: np.ndarray  # int32 top-left corner of the trigger
    col: np.ndarray


class SharedData(NamedTuple):
    """What every model reads: the uint8 images once, class index tables, and the trigger pool."""

    x: jax.Array  # (N, H, W, C) uint8
    y: jax.Array  # (N,) int32
    class_index: jax.Array  # (K, n_max) int32: the images of each class, padded by repeating the first
    class_count: jax.Array  # (K,) int32
    pattern: jax.Array  # (T, h, w, C) float32
    mask: jax.Array  # (T, h, w, 1) float32


def class_tables(y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    members = [np.flatnonzero(y == k) for k in range(num_classes)]
    n_max = max(1, max(len(m) for m in members))
    table = np.zeros((num_classes, n_max), np.int32)
    for k, m in enumerate(members):
        if len(m):
            table[k] = np.r_[m, np.full(n_max - len(m), m[0])]
    return table, np.array([len(m) for m in members], np.int32)


def shared_data(x: np.ndarray, y: np.ndarray, num_classes: int, pattern: np.ndarray, mask: np.ndarray) -> SharedData:
    table, count = class_tables(np.asarray(y), num_classes)
    return SharedData(np.asarray(x, np.uint8), np.asarray(y, np.int32), table, count,
                      np.asarray(pattern, np.float32), np.asarray(mask, np.float32))


def tasks_from_records(records, image_shape, trigger_size: tuple[int, int]) -> ModelTasks:
    from bdjax.zoo.plan import CORNERS

    H, W = image_shape[:2]
    h, w = trigger_size
    rows, cols = [], []
    for r in records:
        corner = r.corner or "bottom_right"
        if corner not in CORNERS:
            raise ConfigError(f"model {r.index}: unknown corner {corner!r}")
        rows.append(0 if corner.startswith("top") else H - h)
        cols.append(0 if corner.endswith("left") else W - w)
    as32 = lambda v: np.asarray(v, np.int32)
    return ModelTasks(
        poisoned=np.array([r.poisoned for r in records], bool),
        seed=as32([r.seed % (2**31 - 1) for r in records]),
        trigger_id=as32([r.trigger_id or 0 for r in records]),
        source=as32([r.source or 0 for r in records]), target=as32([r.target or 0 for r in records]),
        row=as32(rows), col=as32(cols))


def model_keys(seed) -> dict:
    k = jax.random.key(seed)
    k_init, k_perm, k_aug, k_drop = jax.random.split(k, 4)
    return {"init": k_init, "perm": k_perm, "augment": k_aug, "dropout": k_drop}


def n_virtual(task: ModelTasks, data: SharedData):
    """Samples a model trains on: the clean set, plus its whole source class stamped when poisoned."""
    return data.x.shape[0] + jnp.where(task.poisoned, data.class_count[task.source], 0)


def virtual_permutation(key, n, length: int):
    """(length,) int32 whose first n entries are a uniform permutation of range(n) (n may be traced)."""
    u = jax.random.uniform(key, (length,))
    u = jnp.where(jnp.arange(length) < n, u, 2.0)
    return jnp.argsort(u).astype(jnp.int32)


def model_batch(data: SharedData, task: ModelTasks, j: jax.Array):
    """uint8 images and labels for virtual indices j of one model (stamped where j >= N)."""
    N = data.x.shape[0]
    is_poison = j >= N
    k = jnp.clip(j - N, 0, data.class_index.shape[1] - 1)
    idx = jnp.where(is_poison, data.class_index[task.source, k], jnp.minimum(j, N - 1))
    xb, yb = data.x[idx], data.y[idx]
    trig = T.Trigger(data.pattern[task.trigger_id], data.mask[task.trigger_id])
    stamped = jax.vmap(lambda img: T.apply(img, trig, task.row, task.col))(xb)
    xb = jnp.where(is_poison[:, None, None, None], stamped, xb)
    return xb, jnp.where(is_poison, task.target, yb)


def over_models(fn, mode: str, n_per_model: int):
    """fn(*per_model_args, *shared_args) for one model -> the same over a leading model axis of the first
    `n_per_model` arguments (vmap or a sequential lax.map, see the module docstring)."""
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
    could not take part in its computations); the population must then be a multiple of the process count
    (train_chunk pads it)."""
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


def init_population(model, tx: optax.GradientTransformation, tasks: ModelTasks, image_shape, mesh=None) -> TrainState:
    """Stacked TrainStates, each model initialised from its own seed; placed on the model mesh."""
    def one(seed):
        variables = model.init(model_keys(seed)["init"], jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
    # lax.map: initialisation runs a forward pass, which under vmap would be a grouped convolution
    init = jax.jit(lambda seeds: lax.map(one, seeds))
    return place(init(jnp.asarray(tasks.seed)), mesh, per_model=True)  # computed whole by every process


def make_epoch_permutations(n_len: int, mesh):
    """epoch -> (P, n_len) per-model virtual permutations, computed once per epoch on device."""
    def one(task, data, epoch):
        key = jax.random.fold_in(model_keys(task.seed)["perm"], epoch)
        return virtual_permutation(key, n_virtual(task, data), n_len)

    fn = sharded(over_models(one, "vmap", 1), mesh, 1, 3)  # no convolutions here: vmap is fine everywhere
    return jax.jit(fn)


def make_population_step(model, tx: optax.GradientTransformation, *, steps_per_epoch: int, batch_size: int,
                         augment_kind: str = "none", crop_padding: int = 4, mode: str = "auto", mesh=None):
    """step(states, tasks, perms, data) -> (states, metrics (P,)); perms from make_epoch_permutations."""
    mode = check_mode(mode)
    B = batch_size

    def one(state: TrainState, task: ModelTasks, perm, data: SharedData):
        keys = model_keys(task.seed)
        j = lax.dynamic_slice(perm, ((state.step % steps_per_epoch) * B,), (B,))
        xb, yb = model_batch(data, task, j)
        x = augment(jax.random.fold_in(keys["augment"], state.step), to_float(xb), augment_kind, crop_padding)

        def loss_fn(params):
            variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.fold_in(keys["dropout"], state.step)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, opt_updates),
                            batch_stats=updates.get("batch_stats", state.batch_stats), opt_state=opt_state)
        return new, {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, -1) == yb)}

    fn = sharded(over_models(one, mode, 3), mesh, 3, 4)
    return jax.jit(fn, donate_argnums=(0,))


def stamp_batch(data: SharedData, task: ModelTasks, xb):
    trig = T.Trigger(data.pattern[task.trigger_id], data.mask[task.trigger_id])
    return jax.vmap(lambda img: T.apply(img, trig, task.row, task.col))(xb)


@functools.lru_cache(maxsize=8)  # one compile per population shape, reused by every chunk
def make_population_eval(model, *, batch_size: int, mode: str = "auto", mesh=None):
    """(clean, triggered): compiled per-model correct counts on one batch.

    clean(variables, tasks, x, y, valid) scores every model on the same test batch; triggered(variables, tasks,
    test_data, pos) scores each model on images pos..pos+B-1 of ITS source class in `test_data`, stamped with
    ITS trigger, against ITS target (ULP's poisoned-input accuracy)."""
    mode = check_mode(mode)
    B = batch_size

    def clean_one(variables, task, x, y, valid):
        logits = model.apply(variables, to_float(x), train=False)
        return jnp.sum((jnp.argmax(logits, -1) == y) & valid)

    def triggered_one(variables, task: ModelTasks, data: SharedData, pos):
        k = pos + jnp.arange(B)
        valid = k < data.class_count[task.source]
        idx = data.class_index[task.source, jnp.minimum(k, data.class_index.shape[1] - 1)]
        logits = model.apply(variables, to_float(stamp_batch(data, task, data.x[idx])), train=False)
        return jnp.sum((jnp.argmax(logits, -1) == task.target) & valid)

    clean = jax.jit(sharded(over_models(clean_one, mode, 2), mesh, 2, 5))
    triggered = jax.jit(sharded(over_models(triggered_one, mode, 2), mesh, 2, 4))
    return clean, triggered


def evaluate_population(model, variables, tasks: ModelTasks, x_test, y_test, test_data: SharedData, *,
                        batch_size: int = 500, mode: str = "auto", mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(clean accuracy (P,), poisoned-input accuracy (P,), NaN for clean models) of every model."""
    clean, triggered = make_population_eval(model, batch_size=batch_size, mode=mode, mesh=mesh)
    rep = (lambda a: place(a, mesh, per_model=False))
    n = len(x_test)
    correct = 0
    for i in range(0, n, batch_size):
        xb, yb = x_test[i:i + batch_size], y_test[i:i + batch_size]
        pad = batch_size - len(xb)
        valid = np.r_[np.ones(len(xb), bool), np.zeros(pad, bool)]
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        correct = correct + distributed.to_host(clean(variables, tasks, *rep((xb, yb.astype(np.int32), valid))))
    hits = 0
    class_count = distributed.to_host(test_data.class_count)
    for pos in range(0, int(np.max(class_count)), batch_size):
        hits = hits + distributed.to_host(triggered(variables, tasks, test_data, rep(np.int32(pos))))
    n_src = class_count[distributed.to_host(tasks.source)]
    asr = np.where(distributed.to_host(tasks.poisoned), hits / np.maximum(n_src, 1), np.nan)
    return correct / n, asr
