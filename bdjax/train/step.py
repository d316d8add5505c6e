"""The jitted, donated train step.

Each step's batch is a function of (seed, step): the epoch's order is `epoch_permutation(key, epoch)`, computed
on device once per epoch, and the step slices its batch out of it. The whole run is therefore a pure function
of the seed, so a run resumed from a checkpoint at step s continues exactly as the uninterrupted one would,
with no loader state to save.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bdjax.train.augment import augment
from bdjax.train.sharding import batch_sharded
from bdjax.train.state import TrainState


def stream_keys(seed: int) -> dict[str, jax.Array]:
    """Independent random streams of one run, fixed by its seed."""
    k_init, k_perm, k_aug, k_drop = jax.random.split(jax.random.key(seed), 4)
    return {"init": k_init, "perm": k_perm, "augment": k_aug, "dropout": k_drop}


@functools.partial(jax.jit, static_argnums=2)
def epoch_permutation(perm_key: jax.Array, epoch, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(perm_key, epoch), n)


def to_float(x_uint8: jax.Array) -> jax.Array:
    return x_uint8.astype(jnp.float32) / 255.0


def make_train_step(model, tx: optax.GradientTransformation, *, seed: int, n_train: int, batch_size: int,
                    augment_kind: str = "none", crop_padding: int = 4, mesh=None):
    """Returns step(state, x_all, y_all, perm) -> (state, metrics); x_all is the uint8 training set on device and
    perm the current epoch's `epoch_permutation`."""
    keys = stream_keys(seed)
    steps_per_epoch = n_train // batch_size

    def train_step(state: TrainState, x_all: jax.Array, y_all: jax.Array, perm: jax.Array):
        idx = lax.dynamic_slice(perm, ((state.step % steps_per_epoch) * batch_size,), (batch_size,))
        xb, yb = x_all[idx], y_all[idx]
        if mesh is not None:  # split the batch over devices; XLA inserts the gradient all-reduce
            xb = lax.with_sharding_constraint(xb, batch_sharded(mesh))
            yb = lax.with_sharding_constraint(yb, batch_sharded(mesh))
        x = augment(jax.random.fold_in(keys["augment"], state.step), to_float(xb), augment_kind, crop_padding)

        def loss_fn(params):
            variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.fold_in(keys["dropout"], state.step)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, opt_updates),
                                  batch_stats=updates.get("batch_stats", state.batch_stats), opt_state=opt_state)
        metrics = {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, -1) == yb)}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,))
