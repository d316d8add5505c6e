"""The training core: every training procedure in bdjax is a loss (or gradient) function on this one step.

    loss_fn = classification_loss(model)                  # or any fn(params, state, batch, rng) -> (loss, aux)
    update = make_update(value_and_grad(loss_fn), tx)     # pure: (state, batch, rng) -> (state, metrics)
    step = data_step(update, gather, batch_size=..., steps_per_epoch=...)   # + batch order, augmentation, keys
    jit_step = compile_step(step)                         # one model (optionally under the data mesh)
    jit_step = compile_population_step(step, mode, mesh)  # P models along a sharded model axis

A procedure with several losses and its own gradient combination (the blind backdoor's MGDA) passes its own
`grad_fn`; one that carries more state through the step (an EMA target network, a queue of negatives, a running
loss mean) keeps it in `TrainState.extra`: the loss returns the new value as `aux["extra"]`, and `after_update`
sees the new parameters (e.g. to move an EMA target towards them). Nothing else needs a new loop: the host loop
(`bdjax.train.loop.train_loop`) drives any of these steps, with checkpoints, logging and evaluation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bdjax.train.augment import augment


@flax.struct.dataclass
class TrainState:
    """A plain pytree (no functions inside), so orbax saves and restores it as it is."""

    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    extra: Any = flax.struct.field(default_factory=dict)  # procedure state carried through the step ({}: none)

    @property
    def variables(self) -> dict:
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation, extra: Any = None) -> "TrainState":
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                   opt_state=tx.init(params), extra={} if extra is None else extra)


def stream_keys(seed) -> dict[str, jax.Array]:
    """Independent random streams of one model's run, fixed by its seed (a Python int or a traced int32)."""
    k_init, k_perm, k_aug, k_drop = jax.random.split(jax.random.key(seed), 4)
    return {"init": k_init, "perm": k_perm, "augment": k_aug, "dropout": k_drop}


def to_float(x: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images pass through as float32."""
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def init_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape, extra: Any = None) -> TrainState:
    """Pure (jittable, vmappable) initialisation of one model's state."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(variables, tx, extra)


def create_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape, extra: Any = None) -> TrainState:
    return jax.jit(lambda k, e: init_state(model, tx, k, image_shape, e))(key, extra)


# ----------------------------------------------------------------------------------------------------------
# Losses and the update


def apply_train(model, params, state: TrainState, x, rng):
    """Train-mode forward pass: (logits, new batch_stats)."""
    variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return logits, updates.get("batch_stats", state.batch_stats)


def classification_loss(model) -> Callable:
    """Mean cross-entropy of batch["x"] (float images) against batch["y"]; metrics loss and acc."""
    def loss_fn(params, state: TrainState, batch: dict, rng):
        logits, batch_stats = apply_train(model, params, state, batch["x"], rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return loss, {"batch_stats": batch_stats, "metrics": {"loss": loss, "acc": acc}}
    return loss_fn


def value_and_grad(loss_fn: Callable) -> Callable:
    """loss_fn(params, state, batch, rng) -> (loss, aux)  =>  grad_fn(...) -> (grads, aux)."""
    def grad_fn(params, state, batch, rng):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch, rng)
        return grads, aux
    return grad_fn


def make_update(grad_fn: Callable, tx: optax.GradientTransformation, *,
                after_update: Callable[[TrainState], TrainState] | None = None) -> Callable:
    """The pure update every trainer shares: (state, batch, rng) -> (new state, metrics).

    grad_fn(params, state, batch, rng) -> (grads, aux); aux may hold "batch_stats", "extra" (new values of those
    state fields) and "metrics" (a dict of scalars)."""
    def update(state: TrainState, batch: dict, rng) -> tuple[TrainState, dict]:
        grads, aux = grad_fn(state.params, state, batch, rng)
        # a hand-written grad_fn (several tasks, MGDA) must hand back one gradient per parameter: say so at trace time
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, batch_stats=aux.get("batch_stats", state.batch_stats),
                            extra=aux.get("extra", state.extra))
        if after_update is not None:
            new = after_update(new)
        return new, aux.get("metrics", {})
    return update


# ----------------------------------------------------------------------------------------------------------
# Batches: every step's batch is a function of (seed, step)


class RunTask(NamedTuple):
    """The per-model context of a single run (a population passes its own per-model task with a `seed`)."""
    seed: jax.Array


@functools.partial(jax.jit, static_argnums=2)
def epoch_permutation(perm_key: jax.Array, epoch, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(perm_key, epoch), n)


def data_step(update: Callable, gather: Callable, *, batch_size: int, steps_per_epoch: int,
              augment_kind: str = "none", crop_padding: int = 4, constrain: Callable | None = None) -> Callable:
    """Wrap an update into step(state, task, perm, data) -> (state, metrics).

    The batch of step s is entries (s % steps_per_epoch) * B ... + B of `perm` (the epoch's order, computed on
    device once per epoch), turned into images and labels by gather(data, task, idx) -> (x, y); then augmented
    with the key stream of task.seed folded with the step. A run is therefore a pure function of its seed, and a
    run resumed at step s continues exactly as the uninterrupted one. `constrain` (optional) places the gathered
    batch, e.g. split over the data mesh."""
    B = batch_size

    def step(state: TrainState, task, perm, data):
        chex.assert_rank(perm, 1)  # one model's order (a population maps this step over its model axis)
        keys = stream_keys(task.seed)
        idx = lax.dynamic_slice(perm, ((state.step % steps_per_epoch) * B,), (B,))
        x, y = gather(data, task, idx)
        if constrain is not None:
            x, y = constrain(x), constrain(y)
        x = augment(jax.random.fold_in(keys["augment"], state.step), to_float(x), augment_kind, crop_padding)
        return update(state, {"x": x, "y": y}, jax.random.fold_in(keys["dropout"], state.step))
    return step


def gather_arrays(data, task, idx):
    """gather for data = (x_all, y_all) arrays on device."""
    x_all, y_all = data
    return x_all[idx], y_all[idx]


def compile_step(step: Callable) -> Callable:
    """jit with the state donated: step(state, task, perm, data) -> (state, metrics)."""
    return jax.jit(step, donate_argnums=(0,))


def training_step(model, tx: optax.GradientTransformation, gather: Callable, *, loss_fn: Callable | None = None,
                  grad_fn: Callable | None = None, **batch_options) -> Callable:
    """The uncompiled step(state, task, perm, data) of a model trained on loss_fn (default: cross-entropy), or on
    a hand-written grad_fn (several tasks combined, e.g. the blind backdoor's MGDA; exclusive with loss_fn);
    batch_options go to data_step (batch_size, steps_per_epoch, augment_kind, crop_padding, constrain)."""
    if loss_fn is not None and grad_fn is not None:
        raise ValueError("pass loss_fn or grad_fn, not both")
    update = make_update(grad_fn or value_and_grad(loss_fn or classification_loss(model)), tx)
    return data_step(update, gather, **batch_options)


def single_model_step(model, tx: optax.GradientTransformation, *, mesh=None, loss_fn: Callable | None = None,
                      grad_fn: Callable | None = None, **batch_options) -> Callable:
    """Compiled step(state, RunTask, perm, (x_all, y_all)) of one model; with a data mesh the batch is split over
    its devices and XLA inserts the gradient all-reduce."""
    from bdjax.train.sharding import batch_sharded

    constrain = (lambda a: lax.with_sharding_constraint(a, batch_sharded(mesh))) if mesh is not None else None
    return compile_step(training_step(model, tx, gather_arrays, loss_fn=loss_fn, grad_fn=grad_fn, constrain=constrain,
                                      **batch_options))
