"""The official cost schedule (`Visualizer.visualize`) as per-label array state: pure and jittable."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bdjax.defenses.neural_cleanse.config import NCConfig


class CostSchedule(NamedTuple):
    """Per-label (L,) arrays: the official Visualizer's Python scalars, one entry per label."""
    cost: jax.Array
    set_counter: jax.Array
    up_counter: jax.Array
    down_counter: jax.Array
    up_flag: jax.Array
    down_flag: jax.Array
    reg_best: jax.Array  # best (smallest) mean mask norm among check-points that reached the threshold
    es_counter: jax.Array
    es_reg_best: jax.Array
    done: jax.Array  # early-stopped: frozen from then on
    n_checks: jax.Array  # check-points run (not counting those after the stop)


def schedule_init(num_labels: int, cfg: NCConfig) -> CostSchedule:
    L = int(num_labels)
    zi, zb = jnp.zeros((L,), jnp.int32), jnp.zeros((L,), bool)
    inf = jnp.full((L,), jnp.inf, jnp.float32)
    cost = jnp.full((L,), 0.0 if cfg.reset_cost_to_zero else cfg.init_cost, jnp.float32)
    return CostSchedule(cost, zi, zi, zi, zb, zb, inf, zi, inf, zb, zi)


def schedule_update(s: CostSchedule, success, reg, cfg: NCConfig) -> tuple[CostSchedule, jax.Array]:
    """One check-point of the official schedule for every label at once (pure, jittable).

    success, reg: (L,) attack success and mean mask norm over the check-point. Returns the new state and
    `improved` (L,): labels whose current mask becomes the best one. Labels already done are unchanged."""
    f32 = jnp.float32
    active = ~s.done
    succ = success >= cfg.success_threshold
    improved = active & succ & (reg < s.reg_best)
    reg_best = jnp.where(improved, reg.astype(f32), s.reg_best)

    es_counter, es_reg_best, stop = s.es_counter, s.es_reg_best, jnp.zeros_like(s.done)
    if cfg.early_stop:
        found = jnp.isfinite(reg_best)
        no_gain = reg_best >= cfg.early_stop_threshold * es_reg_best
        es_counter = jnp.where(found, jnp.where(no_gain, es_counter + 1, 0), es_counter)
        es_reg_best = jnp.minimum(reg_best, es_reg_best)
        stop = s.down_flag & s.up_flag & (es_counter >= cfg.early_stop_patience)

    cost, up_c, down_c, up_f, down_f = s.cost, s.up_counter, s.down_counter, s.up_flag, s.down_flag
    set_cond = (cost == 0) & succ
    set_counter = jnp.where(set_cond, s.set_counter + 1, 0)
    do_set = set_cond & (set_counter >= cfg.patience)
    cost = jnp.where(do_set, f32(cfg.init_cost), cost)
    up_c, down_c = jnp.where(do_set, 0, up_c), jnp.where(do_set, 0, down_c)
    up_f, down_f = up_f & ~do_set, down_f & ~do_set

    up_c = jnp.where(succ, up_c + 1, 0)
    down_c = jnp.where(succ, 0, down_c + 1)
    do_up = up_c >= cfg.patience
    do_down = ~do_up & (down_c >= cfg.patience)
    up_c, down_c = jnp.where(do_up, 0, up_c), jnp.where(do_down, 0, down_c)
    cost = jnp.where(do_up, cost * f32(cfg.cost_multiplier),
                     jnp.where(do_down, cost / f32(cfg.cost_multiplier ** 1.5), cost))
    up_f, down_f = up_f | do_up, down_f | do_down

    # the official loop breaks before touching the cost at the early-stop check-point
    keep = lambda new, old: jnp.where(active & ~stop, new, old)
    new = CostSchedule(
        cost=keep(cost, s.cost), set_counter=keep(set_counter, s.set_counter), up_counter=keep(up_c, s.up_counter),
        down_counter=keep(down_c, s.down_counter), up_flag=keep(up_f, s.up_flag), down_flag=keep(down_f, s.down_flag),
        reg_best=jnp.where(active, reg_best, s.reg_best), es_counter=jnp.where(active, es_counter, s.es_counter),
        es_reg_best=jnp.where(active, es_reg_best, s.es_reg_best), done=s.done | (active & stop),
        n_checks=s.n_checks + active.astype(jnp.int32),
    )
    return new, improved
