"""The one resumable host loop (`train_loop`), and `fit`, one model trained with it.

train_loop drives any compiled core step, for one model or a population: it restores the latest orbax
checkpoint, dispatches the steps asynchronously, recomputes the batch order once per epoch (every batch is a
function of (seed, step), so a resumed run ends bit-identical to an uninterrupted one), logs to metrics.jsonl,
evaluates and checkpoints at epoch ends, and shows a progress bar.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from bdjax.checkpoint import Checkpointer
from bdjax.config import TrainConfig
from bdjax.errors import ConfigError
from bdjax.results import RunDir
from bdjax.train import core
from bdjax.train.optim import make_optimizer
from bdjax.train.sharding import data_mesh, replicated

LOG_EVERY = 50  # steps between loss records: device_get only then, so the host never waits on every step


def progress_enabled() -> bool:
    return os.environ.get("BDJAX_PROGRESS", "1") != "0"


def needs_step_sync(mesh) -> bool:
    """XLA:CPU's in-process all-reduce can deadlock when several multi-device steps are queued at once
    (seen with jax 0.10: 'Expected 2 threads to join the rendezvous'), so on CPU each sharded step is
    awaited before the next is dispatched; accelerators keep asynchronous dispatch."""
    return mesh is not None and jax.devices()[0].platform == "cpu"


def due(epoch: int, every: int, last: int) -> bool:
    return epoch == last or (every > 0 and epoch % every == 0)


def first_step(step_array) -> int:
    """The step counter (shared by every model of a population), read from this process's own shard."""
    return int(np.asarray(step_array.addressable_data(0)).reshape(-1)[0])


def train_loop(step_fn: Callable, state, order: Callable[[int], object], *, steps_per_epoch: int, epochs: int,
               checkpoint_dir=None, checkpoint_every: int = 1, run: RunDir | None = None,
               eval_fn: Callable | None = None, eval_every: int = 1, scalars: Callable[[dict], dict] | None = None,
               sync: bool = False, desc: str = "train", show_progress: bool = True):
    """Run step_fn(state, perm) -> (state, metrics) from the state's step to epochs * steps_per_epoch; returns
    (final state, number of steps this call ran).

    order(epoch) -> the batch order of that epoch (placed as step_fn expects). scalars(metrics) -> floats to log
    and show, read only on log steps (default: every metric as a float; a population reduces over its models). eval_fn(state) -> a record logged at due epochs. Resumes from the
    latest checkpoint in checkpoint_dir (restored into the shapes and shardings of `state`)."""
    total = epochs * steps_per_epoch
    scalars = scalars or (lambda m: {k: float(v) for k, v in jax.device_get(m).items()})
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = first_step(state.step)
    if run is not None:
        run.truncate_metrics(start)
    perm = order(start // steps_per_epoch)
    with tqdm(total=total, initial=start, desc=desc, unit="step", disable=not (show_progress and progress_enabled()),
              mininterval=2.0, dynamic_ncols=True) as bar:
        for s in range(start, total):
            state, metrics = step_fn(state, perm)
            if sync:
                jax.block_until_ready(metrics)
            done = s + 1
            epoch, end_of_epoch = done // steps_per_epoch, done % steps_per_epoch == 0
            if done % LOG_EVERY == 0 or end_of_epoch:
                m = scalars(metrics)
                if run is not None:
                    run.log({"step": done, "epoch": done / steps_per_epoch, **m})
                if "loss" in m:
                    bar.set_postfix(loss=f"{m['loss']:.3f}")
            if end_of_epoch:
                if epoch < epochs:
                    perm = order(epoch)
                if eval_fn is not None and due(epoch, eval_every, epochs):
                    record = eval_fn(state)
                    if run is not None:
                        run.log({"step": done, "epoch": epoch, **record})
                if ckpt is not None and due(epoch, checkpoint_every, epochs):
                    ckpt.save(done, state)
            bar.update(1)
    if ckpt is not None:
        ckpt.close()
    return state, total - start


def fit(model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, *, seed: int,
        run: RunDir | None = None, eval_fn: Callable[[core.TrainState], dict] | None = None,
        eval_every: int = 1, desc: str = "train", loss_fn: Callable | None = None,
        variables: dict | None = None) -> core.TrainState:
    """Train `model` on images (uint8, or float in [0, 1]); resumes from `run`'s latest checkpoint when there is one.
    loss_fn: a core loss (default: cross-entropy on the labels). variables: start from these (finetuning) instead
    of a fresh init from the seed."""
    n = len(x_train)
    if cfg.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the {n} training images")
    steps_per_epoch = n // cfg.batch_size
    tx = make_optimizer(cfg, steps_per_epoch)
    mesh = data_mesh(cfg.batch_size)
    mesh = mesh if mesh.size > 1 else None

    keys = core.stream_keys(seed)
    if variables is None:
        state = core.create_state(model, tx, keys["init"], x_train.shape[1:])
    else:  # host copies: the step donates its state, which must not be the caller's buffers
        state = core.TrainState.create(jax.device_get(variables), tx)
    x_all = np.asarray(x_train) if np.asarray(x_train).dtype == np.float32 else np.asarray(x_train, np.uint8)
    data = (x_all, np.asarray(y_train, np.int32))
    task = core.RunTask(np.int32(seed % (2**31 - 1)))
    placement = replicated(mesh) if mesh is not None else jax.devices()[0]
    state, data, task = jax.device_put((state, data, task), placement)

    step = core.single_model_step(model, tx, mesh=mesh, loss_fn=loss_fn, batch_size=cfg.batch_size,
                                  steps_per_epoch=steps_per_epoch, augment_kind=cfg.augment,
                                  crop_padding=cfg.crop_padding)
    order = lambda epoch: jax.device_put(core.epoch_permutation(keys["perm"], epoch, n), placement)
    rename = lambda m: {"loss": float(m["loss"]), "train_acc": float(m["acc"])}
    state, _ = train_loop(lambda st, perm: step(st, task, perm, data), state, order, steps_per_epoch=steps_per_epoch,
                          epochs=cfg.epochs, checkpoint_dir=run.checkpoints if run is not None else None,
                          checkpoint_every=cfg.checkpoint_every, run=run, eval_fn=eval_fn, eval_every=eval_every,
                          scalars=rename, sync=needs_step_sync(mesh), desc=desc)
    return state
