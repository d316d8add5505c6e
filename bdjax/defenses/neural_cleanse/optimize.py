"""The trigger optimisation of Neural Cleanse as a pure (init, update) pair over per-label array state, and its
drivers: from the host (one jitted update per step, fastest on XLA:CPU) or as one compiled lax loop."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bdjax.defenses.neural_cleanse.config import NCConfig
from bdjax.defenses.neural_cleanse.schedule import CostSchedule, schedule_init, schedule_update
from bdjax.errors import ConfigError
from bdjax.train.core import to_float
from bdjax.train.sharding import axis_mesh

DRIVERS = ("auto", "host", "loop")


class NCState(NamedTuple):
    params: dict  # {"mask": (L, H, W, 1), "pattern": (L, H, W, C)} in tanh space
    opt_state: Any  # Adam state, leading label axis
    sched: CostSchedule
    best_mask: jax.Array  # (L, H, W, 1) in [0, 1]
    best_pattern: jax.Array  # (L, H, W, C) in [0, 1]
    acc_sum: jax.Array  # (L,) attack success summed over the steps of the current check-point
    reg_sum: jax.Array  # (L,) mask norm summed likewise
    step: jax.Array  # global step (selects the clean batch)


def decode(params: dict) -> tuple[jax.Array, jax.Array]:
    """tanh-space parameters -> (mask, pattern) in [0, 1]."""
    return jnp.tanh(params["mask"]) / 2 + 0.5, jnp.tanh(params["pattern"]) / 2 + 0.5


def stamp(x: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
    """(1 - m) * x + m * p for float images in [0, 1]."""
    return (1.0 - mask) * x + mask * pattern


def _freeze(active, new, old):
    """Per-label select on a pytree whose leaves have a leading label axis."""
    def sel(n, o):
        a = active.reshape(active.shape + (1,) * (n.ndim - 1))
        return jnp.where(a, n, o)
    return jax.tree.map(sel, new, old)


class NCOptimizer(NamedTuple):
    """init(labels) -> NCState; update(state, variables, x_all, labels) -> NCState: one Adam step for every
    running label, followed at the end of each check-point (every cfg.steps_per_check steps) by the cost schedule
    update. Both pure: jit them, run update under lax.fori_loop/scan, or call it from the host."""
    init: Any
    update: Any


def nc_optimizer(model, cfg: NCConfig, image_shape: tuple, n_clean: int) -> NCOptimizer:
    """The (init, update) pair for one model / config / image shape / clean-set size; labels are traced, so any
    label set of a given size shares one compilation."""
    H, W, C = image_shape
    B, S = cfg.batch_size, cfg.steps_per_check
    steps_per_epoch = n_clean // B
    tx = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)
    key = jax.random.key(cfg.seed)
    k_init, k_data = jax.random.split(key)

    def init(labels):
        def one(label):
            km, kp = jax.random.split(jax.random.fold_in(k_init, label))
            lim = 1.0 - 1e-6
            m0 = jax.random.uniform(km, (H, W, 1))
            p0 = jax.random.uniform(kp, (H, W, C))
            return {"mask": jnp.arctanh(jnp.clip((m0 - 0.5) * 2, -lim, lim)),
                    "pattern": jnp.arctanh(jnp.clip((p0 - 0.5) * 2, -lim, lim))}
        params = jax.vmap(one)(labels)
        mask, pattern = decode(params)
        zeros = jnp.zeros(labels.shape, jnp.float32)
        return NCState(params, jax.vmap(tx.init)(params), schedule_init(labels.shape[0], cfg), mask, pattern,
                       zeros, zeros, jnp.zeros((), jnp.int32))

    def batch(x_all, step):
        epoch, pos = step // steps_per_epoch, step % steps_per_epoch
        perm = jax.random.permutation(jax.random.fold_in(k_data, epoch), n_clean)
        return to_float(x_all[lax.dynamic_slice(perm, (pos * B,), (B,))])

    def total_loss(params, variables, labels, cost, xb):
        """Sum over labels of CE + cost * |m|_1 (each label's parameters get their own loss's gradient).
        The model is shared, so the L x B stamped images go through it as ONE batch of L * B images."""
        mask, pattern = decode(params)
        L = labels.shape[0]
        stamped = stamp(xb[None], mask[:, None], pattern[:, None]).reshape(L * B, H, W, C)
        logits = model.apply(variables, stamped, train=False).reshape(L, B, -1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, None]).mean(axis=1)
        reg = jnp.sum(jnp.abs(mask), axis=(1, 2, 3))
        acc = jnp.mean(jnp.argmax(logits, -1) == labels[:, None], axis=1)
        return jnp.sum(ce + cost * reg), (acc, reg)

    def adam_step(st: NCState, variables, x_all, labels) -> NCState:
        """One Adam step for every label still running (early-stopped labels stay frozen)."""
        active = ~st.sched.done
        (_, (acc, reg)), grads = jax.value_and_grad(total_loss, has_aux=True)(
            st.params, variables, labels, st.sched.cost, batch(x_all, st.step))
        updates, opt_state = jax.vmap(tx.update)(grads, st.opt_state, st.params)
        params = optax.apply_updates(st.params, updates)
        return st._replace(params=_freeze(active, params, st.params),
                           opt_state=_freeze(active, opt_state, st.opt_state),
                           acc_sum=st.acc_sum + acc, reg_sum=st.reg_sum + reg, step=st.step + 1)

    def end_check(st: NCState) -> NCState:
        """The schedule update of a check-point, on the success and norm averaged over its S steps."""
        sched, improved = schedule_update(st.sched, st.acc_sum / S, st.reg_sum / S, cfg)
        mask, pattern = decode(st.params)
        sel = improved[:, None, None, None]
        zeros = jnp.zeros_like(st.acc_sum)
        return st._replace(sched=sched, best_mask=jnp.where(sel, mask, st.best_mask),
                           best_pattern=jnp.where(sel, pattern, st.best_pattern), acc_sum=zeros, reg_sum=zeros)

    def update(st: NCState, variables, x_all, labels) -> NCState:
        st = adam_step(st, variables, x_all, labels)
        # no convolution in end_check, so the cond keeps every convolution of the step at top level
        return lax.cond(st.step % S == 0, end_check, lambda s: s, st)

    return NCOptimizer(init, update)


@functools.lru_cache(maxsize=16)
def _compiled(model, cfg: NCConfig, image_shape: tuple, n_clean: int):
    """(init, update, run) jitted: run(state, variables, x_all, labels, n) applies update n times in a lax loop."""
    opt = nc_optimizer(model, cfg, image_shape, n_clean)

    def run(st, variables, x_all, labels, n):
        return lax.fori_loop(0, n, lambda _, s: opt.update(s, variables, x_all, labels), st)

    return jax.jit(opt.init), jax.jit(opt.update, donate_argnums=(0,)), jax.jit(run, donate_argnums=(0,))


def default_driver() -> str:
    """host on CPU: XLA:CPU runs the input-gradient convolutions of a loop body ~4-10x slower than at top level
    (in a loop it folds the kernel transpose into the convolution, which then misses the fast path); a compiled
    loop elsewhere, where it saves one dispatch per step."""
    return "host" if jax.devices()[0].platform == "cpu" else "loop"


def _progress_bar(cfg: NCConfig, n_labels: int, progress: bool):
    if not progress:
        return None
    from bdjax.train.loop import progress_enabled

    if not progress_enabled():  # BDJAX_PROGRESS=0 turns every bar off
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_checks, desc=f"neural cleanse ({n_labels} labels)", unit="check", mininterval=2.0,
                dynamic_ncols=True)


def reverse_engineer(model, variables, x_clean, labels, cfg: NCConfig = NCConfig(), *, progress: bool = False) -> dict:
    """Run the optimisation for `labels` together; returns numpy arrays with a leading label axis:
    masks (L, H, W), patterns (L, H, W, C), norms (L1 of the kept masks), reached, reg_best, cost, n_checks."""
    cfg.validate()
    x_clean = np.asarray(x_clean)
    if x_clean.ndim != 4:
        raise ConfigError(f"neural cleanse x_clean must be images (N, H, W, C), got shape {x_clean.shape}")
    if len(x_clean) < cfg.batch_size:
        raise ConfigError(f"neural cleanse batch_size={cfg.batch_size} is larger than the {len(x_clean)} clean images")
    labels = np.asarray(labels, np.int32).reshape(-1)
    n_labels = len(labels)
    # fields the compiled code does not read are normalised, so changing them does not recompile
    key_cfg = dataclasses.replace(cfg, max_checks=1, checks_per_sync=1, anomaly_threshold=2.0, driver="auto")
    init, update, run = _compiled(model, key_cfg, tuple(int(d) for d in x_clean.shape[1:]), len(x_clean))
    driver = default_driver() if cfg.driver == "auto" else cfg.driver
    mesh = axis_mesh("labels") if n_labels > 1 and len(jax.devices()) > 1 else None
    if mesh is None:  # one label (or one device): plain jit on unsharded arrays
        dev = jax.devices()[0]
        variables, x_dev, labels_dev = jax.device_put((variables, x_clean, labels), dev)
    else:  # labels split over the devices (padded with copies of the last label); model and images replicated
        labels = np.r_[labels, np.full(-n_labels % mesh.size, labels[-1], np.int32)]
        variables, x_dev = jax.device_put((variables, x_clean), NamedSharding(mesh, P()))
        labels_dev = jax.device_put(labels, NamedSharding(mesh, P("labels")))
    state = init(labels_dev)
    bar = _progress_bar(cfg, n_labels, progress)
    done_checks = 0
    while done_checks < cfg.max_checks:
        # Dispatched asynchronously: the host only waits when it reads `done`. Steps and check-point ends
        # compute per label only (no cross-device collective), so the devices never wait for each other.
        n = min(cfg.checks_per_sync, cfg.max_checks - done_checks)
        if driver == "loop":
            state = run(state, variables, x_dev, labels_dev, n * cfg.steps_per_check)
        else:
            for _ in range(n * cfg.steps_per_check):
                state = update(state, variables, x_dev, labels_dev)
        done_checks += n
        all_done = bool(np.all(np.asarray(state.sched.done)))  # host sync
        if bar is not None:
            bar.update(n)
        if all_done:
            break
    if bar is not None:
        bar.close()
    state = jax.tree.map(lambda a: np.asarray(a)[:n_labels] if np.ndim(a) else np.asarray(a),
                         jax.device_get(state._replace(params=decode(state.params))))  # drop the padding labels
    sched, (last_mask, last_pattern) = state.sched, state.params
    reached = np.isfinite(sched.reg_best)
    sel = reached[:, None, None, None]
    masks = np.where(sel, np.asarray(state.best_mask), last_mask)[..., 0]
    patterns = np.where(sel, np.asarray(state.best_pattern), last_pattern)
    return {
        "labels": labels[:n_labels], "masks": masks, "patterns": patterns, "norms": np.abs(masks).sum(axis=(1, 2)),
        "reached": reached, "reg_best": np.asarray(sched.reg_best), "cost": np.asarray(sched.cost),
        "n_checks": np.asarray(sched.n_checks), "early_stopped": np.asarray(sched.done),
        "steps": int(sched.n_checks.max()) * cfg.steps_per_check,  # the longest label's
    }

