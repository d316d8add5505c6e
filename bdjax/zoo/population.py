"""Zoo populations: P models trained together, poisoned batches made on device.

Every model has its own parameters, optimiser state, initialisation, batch order, augmentation and (when
poisoned) trigger, corner, source and target; all of them live in arrays with a leading axis of P. The training
set is on device ONCE: a poisoned model's extra samples (its source class stamped with its trigger, labelled
target, appended to the clean set as in ULP) are virtual indices N..N+n_source-1 of its own permutation, and
the batch is gathered and stamped inside the compiled step. No per-model copy of the data exists anywhere.

The step is the training core's (bdjax.train.core.data_step with `model_batch` as its gather), run over the model
axis by bdjax.train.population (vmap or unrolled per device, the axis sharded over a "models" mesh; see there).
Per-model results leave through distributed.to_host.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import distributed, triggers as T
from bdjax.errors import ConfigError
from bdjax.train import core, population
from bdjax.train.core import TrainState, to_float
from bdjax.train.population import (AXIS, MODES, check_mode, compile_population_step, default_mode,  # noqa: F401
                                    model_mesh, over_models, place, sharded)


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
    xb = jnp.where(is_poison[:, None, None, None], stamp_batch(data, task, xb), xb)
    return xb, jnp.where(is_poison, task.target, yb)


def init_population(model, tx: optax.GradientTransformation, tasks: ModelTasks, image_shape, mesh=None) -> TrainState:
    """Stacked TrainStates, each model initialised from its own seed; placed on the model mesh."""
    return population.init_population(model, tx, tasks.seed, image_shape, mesh)


def make_epoch_permutations(n_len: int, mesh):
    """epoch -> (P, n_len) per-model virtual permutations, computed once per epoch on device."""
    def one(task, data, epoch):
        key = jax.random.fold_in(core.stream_keys(task.seed)["perm"], epoch)
        return virtual_permutation(key, n_virtual(task, data), n_len)

    fn = sharded(over_models(one, "vmap", 1), mesh, 1, 3)  # no convolutions here: vmap is fine everywhere
    return jax.jit(fn)


def make_population_step(model, tx: optax.GradientTransformation, *, steps_per_epoch: int, batch_size: int,
                         augment_kind: str = "none", crop_padding: int = 4, mode: str = "auto", mesh=None,
                         loss_fn=None):
    """step(states, tasks, perms, data) -> (states, metrics (P,)); perms from make_epoch_permutations.
    The core's step with the zoo's gather (`model_batch`); loss_fn: a core loss (default cross-entropy)."""
    step = core.training_step(model, tx, model_batch, loss_fn=loss_fn, batch_size=batch_size,
                              steps_per_epoch=steps_per_epoch, augment_kind=augment_kind, crop_padding=crop_padding)
    return compile_population_step(step, mode, mesh)


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
