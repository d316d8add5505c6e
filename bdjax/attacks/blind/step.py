"""The blind backdoor (Bagdasaryan and Shmatikov 2021) as one core gradient function: no new training loop.

Per batch: the main task on the clean inputs (x, y), the backdoor task on synthesised inputs x* = mu(x) with
labels y* = v(y), optionally the Neural Cleanse evasion task; their gradients are combined with MGDA weights
(bdjax.attacks.blind.mgda) or fixed scales. The attack switches on only once the running mean of the main loss
is below the threshold T (None/inf: always on); that mean lives in TrainState.extra, on device.

    blind = make_blind(model, cfg, image_shape, num_classes, batch_size)
    state = fit(model, train_cfg, x, y, seed=0, grad_fn=blind.grad_fn, extra=blind.extra)

Cost: each task is its own forward and backward pass (its own BatchNorm batch statistics, as the reference
computes each loss on its own batch), so a 2-task step does twice the work of a plain step; the Gram matrix and
the min-norm solve are negligible. Fixed scales take one backward pass through the weighted sum (same FLOPs).
The running BatchNorm statistics are those of the clean batch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bdjax.attacks.blind.config import BlindConfig
from bdjax.attacks.blind.labels import LabelFunction, make_label_function
from bdjax.attacks.blind.mgda import gram, mgda_weights
from bdjax.attacks.blind.synthesizers import Synthesizer, make_synthesizer
from bdjax.defenses.gradient_shaping import shaped_grads
from bdjax.train.core import apply_train

TASKS = ("main", "backdoor", "evasion")


class BlindAttack(NamedTuple):
    grad_fn: Callable  # core grad_fn(params, state, batch, rng) -> (grads, aux)
    extra: dict  # the initial TrainState.extra the step carries
    synthesizer: Synthesizer
    label_fn: LabelFunction
    config: BlindConfig


def running_mean(extra: dict, decay: float) -> jax.Array:
    """Bias-corrected exponential mean of the main loss over the steps so far (inf before the first)."""
    n = extra["loss_count"]
    return jnp.where(n > 0, extra["loss_ema"] / (1.0 - decay ** jnp.maximum(n, 1).astype(jnp.float32)), jnp.inf)


def attack_on(cfg: BlindConfig, extra: dict) -> jax.Array:
    if cfg.always_on:
        return jnp.bool_(True)
    return running_mean(extra, cfg.loss_decay) < cfg.threshold


def _ce(model, params, state, x, y, rng, acc_mask=None):
    """Cross-entropy over the batch; aux accuracy over acc_mask's examples (all by default)."""
    logits, batch_stats = apply_train(model, params, state, x, rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    acc = jnp.mean(hits) if acc_mask is None else jnp.sum(hits * acc_mask) / jnp.maximum(jnp.sum(acc_mask), 1.0)
    return loss, (batch_stats, acc)


def backdoor_batch(synth: Synthesizer, label_fn: LabelFunction, key, x, y, fraction: float = 1.0):
    """(x*, y*, mask): the first round(fraction * B) examples synthesised, mu(x) with labels v(y); the rest clean."""
    n = round(fraction * x.shape[0])
    mask = jnp.arange(x.shape[0]) < n
    xs = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), synth.apply(key, x), x)
    return xs, jnp.where(mask, label_fn.apply(y), y), mask.astype(jnp.float32)


def _ce_fooled(model, params, state, x_rev, y, target: int, rng):
    """The evasion task: cross-entropy towards the TRUE labels, on the examples the reversed trigger currently
    sends to the backdoor label (elsewhere it is not a working trigger, and pulling a large random mask towards
    the true labels would only fight the main task); aux acc = the share of examples so fooled."""
    logits, batch_stats = apply_train(model, params, state, x_rev, rng)
    fooled = lax.stop_gradient((jnp.argmax(logits, -1) == target) & (y != target)).astype(jnp.float32)
    loss = jnp.mean(fooled * optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, (batch_stats, jnp.mean(fooled))


def _combine(w, grads: list):
    return jax.tree.map(lambda *gs: sum(w[k] * g for k, g in enumerate(gs)), *grads)


def _evasion(model, cfg: BlindConfig, image_shape, batch_size: int):
    """(init, step) of the Neural Cleanse evasion: each training step first advances bdjax's own Neural Cleanse
    (nc_optimizer: one Adam step on the target label's mask and pattern, its cost schedule every
    evasion_steps_per_check steps) against the current model, then stamps the clean batch with that reversed
    trigger; the evasion task keeps the TRUE labels there, so the smallest trigger NC can find stops working."""
    from bdjax.defenses.neural_cleanse import NCConfig, decode, nc_optimizer, stamp

    # the cost starts at init_cost (not 0, as the defence does) so the reversed mask shrinks from the first step
    nc_cfg = NCConfig(batch_size=batch_size, steps_per_check=cfg.evasion_steps_per_check,
                      init_cost=cfg.evasion_init_cost, reset_cost_to_zero=False, early_stop=False, seed=0).validate()
    opt = nc_optimizer(model, nc_cfg, tuple(image_shape), batch_size)
    labels = jnp.asarray([cfg.target], jnp.int32)

    def step(nc_state, params, state, x):
        variables = {"params": lax.stop_gradient(params), **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        nc_state = opt.update(nc_state, variables, lax.stop_gradient(x), labels)
        mask, pattern = decode(nc_state.params)
        return nc_state, stamp(x, mask[0], pattern[0])

    return lambda: opt.init(labels), step


def make_blind(model, cfg: BlindConfig, image_shape, num_classes: int, batch_size: int) -> BlindAttack:
    cfg.validate()
    synth = make_synthesizer(cfg.synthesizer, image_shape)
    label_fn = make_label_function(cfg.label, num_classes, cfg.target)
    K = cfg.n_tasks
    extra = {"loss_ema": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}
    evasion = None
    if cfg.evasion == "neural_cleanse":
        nc_init, evasion = _evasion(model, cfg, image_shape, batch_size)
        extra["nc"] = nc_init()
    off = jax.nn.one_hot(0, K)  # attack off: the main task alone
    scales = jnp.asarray(cfg.scales if cfg.balancing == "fixed" else (0.0,) * K, jnp.float32)
    shaping = cfg.shaping_clip > 0

    def grad_fn(params, state, batch, rng):
        k_syn, k_task, k_shape = jax.random.split(rng, 3)
        x, y = batch["x"], batch["y"]
        x_bd, y_bd, bd_mask = backdoor_batch(synth, label_fn, k_syn, x, y, cfg.poison_fraction)
        xs, ys = [x, x_bd], [y, y_bd]
        new_extra = dict(state.extra)
        if evasion is not None:
            new_extra["nc"], x_rev = evasion(state.extra["nc"], params, state, x)
            xs.append(x_rev)
            ys.append(y)
        keys = jax.random.split(k_task, K)

        def task(k):
            if k == 2:
                return lambda p: _ce_fooled(model, p, state, xs[k], ys[k], cfg.target, keys[k])
            return lambda p: _ce(model, p, state, xs[k], ys[k], keys[k], bd_mask if k == 1 else None)
        on = attack_on(cfg, state.extra)

        if cfg.balancing == "mgda":
            outs = [jax.value_and_grad(task(k), has_aux=True)(params) for k in range(K)]
            losses = jnp.stack([o[0][0] for o in outs])
            accs = jnp.stack([o[0][1][1] for o in outs])
            task_grads = [o[1] for o in outs]
            G = gram(task_grads)
            w = mgda_weights(G, losses, cfg.normalization, clip=cfg.clip, steps=cfg.solver_steps)
            if K == 3:  # no example fooled: a zero evasion gradient would be MGDA's min-norm point; drop the task
                w2 = mgda_weights(G[:2, :2], losses[:2], cfg.normalization, clip=cfg.clip)
                w = jnp.where(accs[2] > 0, w, jnp.concatenate([w2, jnp.zeros(1)]))
            w = jnp.where(on, w, off)
            batch_stats = outs[0][0][1][0]
            grads = None if shaping else _combine(w, task_grads)
        else:
            w = jnp.where(on, scales, off)

            def weighted(p):
                res = [task(k)(p) for k in range(K)]
                return sum(w[k] * r[0] for k, r in enumerate(res)), res
            if shaping:
                res = weighted(params)[1]
            else:
                (_, res), grads = jax.value_and_grad(weighted, has_aux=True)(params)
            losses = jnp.stack([r[0] for r in res])
            accs = jnp.stack([r[1][1] for r in res])
            batch_stats = res[0][1][0]

        metrics = {}
        if shaping:  # the defender's trainer: per-example gradients of the attacker's weighted loss, clipped + noise
            w_fixed = lax.stop_gradient(w)

            def example_loss(p, st, ex, r):
                total = sum(w_fixed[k] * _ce(model, p, st, ex[f"x{k}"], ex[f"y{k}"], r)[0] for k in range(K))
                return total, {}
            grads, _, norms = shaped_grads(example_loss, params, state,
                                           {**{f"x{k}": xs[k] for k in range(K)}, **{f"y{k}": ys[k] for k in range(K)}},
                                           k_shape, clip=cfg.shaping_clip, noise=cfg.shaping_noise)
            metrics["grad_norm"] = jnp.mean(norms)

        new_extra["loss_ema"] = cfg.loss_decay * state.extra["loss_ema"] + (1.0 - cfg.loss_decay) * losses[0]
        new_extra["loss_count"] = state.extra["loss_count"] + 1
        metrics.update({"loss": losses[0], "acc": accs[0], "attack_on": on.astype(jnp.float32),
                        "loss_mean": running_mean(state.extra, cfg.loss_decay)})
        for k in range(K):
            if k:
                metrics[f"{TASKS[k]}_loss"], metrics[f"{TASKS[k]}_acc"] = losses[k], accs[k]
            metrics[f"w_{TASKS[k]}"] = w[k]
        return grads, {"batch_stats": batch_stats, "extra": new_extra, "metrics": metrics}

    return BlindAttack(grad_fn, extra, synth, label_fn, cfg)
