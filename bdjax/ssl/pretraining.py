"""Self-supervised pretraining (MoCo v2, BYOL, RotNet, Jigsaw) on the training core: a method is a model, a core loss,
extra state and an after_update; `pretrain` runs it with core.data_step + train_loop (resumable, orbax),
data-parallel over every device of the data mesh. The images carry no labels."""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bdjax.config import TrainConfig
from bdjax.errors import ConfigError
from bdjax.results import RunDir
from bdjax.ssl import byol, jigsaw, moco, rotnet
from bdjax.train import core
from bdjax.train.loop import needs_step_sync, train_loop
from bdjax.train.optim import make_optimizer
from bdjax.train.sharding import batch_sharded, data_mesh, replicated

METHODS = ("moco", "byol", "rotnet", "jigsaw")


class Method(NamedTuple):
    model: nn.Module
    loss_fn: Callable
    init_extra: Callable  # (key, variables) -> extra
    after_update: Callable | None
    init_kwargs: dict
    init_input: Callable | None = None  # image shape -> the model's initialisation input (default: one image)


def build(method: str, backbone: nn.Module, method_cfg, *, batch_size: int, total_steps: int,
          n_devices: int = 1) -> Method:
    """The pieces of one method; `backbone` is a bdjax model (for RotNet: with 4 outputs; Jigsaw reads only its
    penultimate features, of every tile)."""
    if method == "moco":
        cfg = method_cfg or moco.MocoConfig()
        cfg.validate(batch_size)
        groups = cfg.bn_groups or n_devices
        if batch_size % groups:
            raise ConfigError(f"moco.bn_groups={groups} must divide the batch size {batch_size}")
        model = moco.encoder(backbone, cfg)
        return Method(model, moco.loss_fn(model, cfg, groups), lambda k, v: moco.init_extra(k, v, cfg),
                      moco.after_update(cfg), {})
    if method == "byol":
        cfg = (method_cfg or byol.ByolConfig()).validate(batch_size)
        groups = cfg.bn_groups or n_devices
        if batch_size % groups:
            raise ConfigError(f"byol.bn_groups={groups} must divide the batch size {batch_size}")
        model = byol.encoder(backbone, cfg)
        return Method(model, byol.loss_fn(model, cfg, groups), lambda k, v: byol.init_extra(v),
                      byol.after_update(cfg, total_steps), {"predict": True})
    if method == "rotnet":
        cfg = (method_cfg or rotnet.RotNetConfig()).validate()
        model = rotnet.RotNet(backbone)
        return Method(model, rotnet.loss_fn(model, cfg), lambda k, v: {}, None, {})
    if method == "jigsaw":
        cfg = (method_cfg or jigsaw.JigsawConfig()).validate()
        model = jigsaw.JigsawNet(backbone, cfg.n_permutations, cfg.hidden)
        orders = jnp.asarray(jigsaw.permutation_set(cfg.n_permutations, cfg.grid, cfg.permutation_seed))
        return Method(model, jigsaw.loss_fn(model, cfg, orders), lambda k, v: {}, None, {},
                      jigsaw.example_input(cfg))
    raise ConfigError(f"unknown ssl method {method!r}; expected one of {', '.join(METHODS)}")


def init_state(m: Method, tx, key, image_shape) -> core.TrainState:
    k_init, k_extra = jax.random.split(key)
    x0 = m.init_input(image_shape) if m.init_input is not None else jnp.zeros((1, *image_shape), jnp.float32)
    variables = m.model.init(k_init, x0, train=False, **m.init_kwargs)
    return core.TrainState.create(variables, tx, m.init_extra(k_extra, variables))


def gather_unlabelled(data, task, idx):
    """Images only; the core's label slot gets zeros (no loss reads it)."""
    return data[0][idx], jnp.zeros(idx.shape, jnp.int32)


def make_step(m: Method, tx, *, batch_size: int, steps_per_epoch: int, mesh=None) -> Callable:
    constrain = (lambda a: lax.with_sharding_constraint(a, batch_sharded(mesh))) if mesh is not None else None
    update = core.make_update(core.value_and_grad(m.loss_fn), tx, after_update=m.after_update)
    return core.compile_step(core.data_step(update, gather_unlabelled, batch_size=batch_size,
                                            steps_per_epoch=steps_per_epoch, constrain=constrain))


def pretrain(method: str, backbone: nn.Module, train_cfg: TrainConfig, x: np.ndarray, *, seed: int,
             method_cfg=None, run: RunDir | None = None, eval_fn: Callable | None = None, eval_every: int = 1,
             use_mesh: bool = True, desc: str | None = None):
    """Pretrain on unlabelled images x (uint8 NHWC); resumes from run's checkpoints. Returns (model, state).
    train_cfg gives epochs, batch size, optimiser, lr (cosine), weight decay and checkpoint_every."""
    n = len(x)
    if train_cfg.batch_size > n:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} is larger than the {n} training images")
    steps_per_epoch = n // train_cfg.batch_size
    mesh = data_mesh(train_cfg.batch_size) if use_mesh else None
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    m = build(method, backbone, method_cfg, batch_size=train_cfg.batch_size,
              total_steps=train_cfg.epochs * steps_per_epoch, n_devices=mesh.size if mesh is not None else 1)
    tx = make_optimizer(train_cfg, steps_per_epoch)
    keys = core.stream_keys(seed)
    state = jax.jit(lambda k: init_state(m, tx, k, x.shape[1:]))(keys["init"])
    placement = replicated(mesh) if mesh is not None else jax.devices()[0]
    task = core.RunTask(np.int32(seed % (2**31 - 1)))
    state, data, task = jax.device_put((state, (np.asarray(x),), task), placement)
    step = make_step(m, tx, batch_size=train_cfg.batch_size, steps_per_epoch=steps_per_epoch, mesh=mesh)
    order = lambda epoch: jax.device_put(core.epoch_permutation(keys["perm"], epoch, n), placement)
    scalars = lambda mt: {k: float(v) for k, v in jax.device_get(mt).items()}
    state, _ = train_loop(lambda st, perm: step(st, task, perm, data), state, order, steps_per_epoch=steps_per_epoch,
                          epochs=train_cfg.epochs, checkpoint_dir=run.checkpoints if run is not None else None,
                          checkpoint_every=train_cfg.checkpoint_every, run=run,
                          eval_fn=(lambda st: eval_fn(m.model, st)) if eval_fn is not None else None,
                          eval_every=eval_every, scalars=scalars, sync=needs_step_sync(mesh), desc=desc or method)
    return m.model, state
