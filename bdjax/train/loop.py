"""fit(): the training loop with a progress bar, periodic evaluation, orbax checkpoints and exact resume."""
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
from bdjax.train.optim import make_optimizer
from bdjax.train.sharding import data_mesh, replicated
from bdjax.train.state import TrainState, create_state
from bdjax.train.step import epoch_permutation, make_train_step, stream_keys

LOG_EVERY = 50  # steps between loss records: device_get only then, so the host never waits on every step


def progress_enabled() -> bool:
    return os.environ.get("BDJAX_PROGRESS", "1") != "0"


def needs_step_sync(mesh) -> bool:
    """XLA:CPU's in-process all-reduce can deadlock when several multi-device steps are queued at once
    (seen with jax 0.10: 'Expected 2 threads to join the rendezvous'), so on CPU each sharded step is
    awaited before the next is dispatched; accelerators keep asynchronous dispatch."""
    return mesh is not None and jax.devices()[0].platform == "cpu"


def _due(epoch: int, every: int, last: int) -> bool:
    return epoch == last or (every > 0 and epoch % every == 0)


def fit(model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, *, seed: int,
        run: RunDir | None = None, eval_fn: Callable[[TrainState], dict] | None = None,
        eval_every: int = 1, desc: str = "train") -> TrainState:
    """Train `model` on uint8 images; resumes from `run`'s latest checkpoint when there is one."""
    n = len(x_train)
    if cfg.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is larger than the {n} training images")
    steps_per_epoch = n // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    tx = make_optimizer(cfg, steps_per_epoch)
    mesh = data_mesh(cfg.batch_size)
    mesh = mesh if mesh.size > 1 else None

    state = create_state(model, tx, stream_keys(seed)["init"], x_train.shape[1:])
    x_all, y_all = np.asarray(x_train, np.uint8), np.asarray(y_train, np.int32)
    if mesh is not None:
        state, x_all, y_all = jax.device_put((state, x_all, y_all), replicated(mesh))
    else:
        x_all, y_all = jax.device_put((x_all, y_all))

    ckpt = Checkpointer(run.checkpoints) if run is not None else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        run.truncate_metrics(int(state.step))

    step_fn = make_train_step(model, tx, seed=seed, n_train=n, batch_size=cfg.batch_size,
                              augment_kind=cfg.augment, crop_padding=cfg.crop_padding, mesh=mesh)
    start = int(state.step)
    sync = needs_step_sync(mesh)
    perm_key = stream_keys(seed)["perm"]
    placement = replicated(mesh) if mesh is not None else x_all.sharding
    order = lambda epoch: jax.device_put(epoch_permutation(perm_key, epoch, n), placement)
    perm = order(start // steps_per_epoch)
    with tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress_enabled(),
              mininterval=2.0, dynamic_ncols=True) as bar:
        for step in range(start, total):
            state, metrics = step_fn(state, x_all, y_all, perm)
            if sync:
                jax.block_until_ready(metrics)
            done = step + 1
            epoch, end_of_epoch = divmod(done, steps_per_epoch)[0], done % steps_per_epoch == 0
            if run is not None and (done % LOG_EVERY == 0 or end_of_epoch):
                m = jax.device_get(metrics)
                run.log({"step": done, "epoch": done / steps_per_epoch, "loss": float(m["loss"]), "train_acc": float(m["acc"])})
                bar.set_postfix(loss=f"{float(m['loss']):.3f}")
            if end_of_epoch:
                perm = order(epoch)
                if eval_fn is not None and _due(epoch, eval_every, cfg.epochs):
                    record = eval_fn(state)
                    if run is not None:
                        run.log({"step": done, "epoch": epoch, **record})
                if ckpt is not None and _due(epoch, cfg.checkpoint_every, cfg.epochs):
                    ckpt.save(done, state)
            bar.update(1)
    if ckpt is not None:
        ckpt.close()
    return state
