"""Neural Cleanse (Wang et al., IEEE S&P 2019; official code bolunwang/backdoor): reverse-engineer, for every
label, the smallest trigger that sends clean images to that label; a backdoored label needs a much smaller
trigger than the others, which shows up as a low outlier of the mask norms (MAD anomaly index > 2).

    res = neural_cleanse(model, variables, x_clean, num_classes)          # all labels at once
    res.norms, res.anomaly_index, res.flagged_labels, res.masks, res.patterns
    save_trigger_grid(out / "nc_triggers.png", res)
    new_vars, info = unlearn(model, variables, x_clean, y_clean, res)     # optional mitigation

Per label l the trigger is a one-channel mask m = tanh(a)/2 + 0.5 (H, W, 1) and a pattern
p = tanh(b)/2 + 0.5 (H, W, C); the stamped image is (1 - m) * x + m * p (inputs in [0, 1]) and the loss
mean CE(f(stamped), l) + cost * |m|_1, minimised with Adam (lr 0.1, betas (0.5, 0.9)) on batches of clean images.
The official code divides tanh by (2 - 1e-7) (so masks can leave [0, 1] by 1e-7); here tanh/2 + 0.5 is used
and the random initial mask/pattern (uniform in [0, 1], as the official script) are clipped before arctanh.

Cost schedule (the official `Visualizer.visualize`, patience 5, multiplier 2 up, 2**1.5 down), per label:
- the cost starts at 0 (RESET_COST_TO_ZERO) and is set to init_cost (1e-3) after `patience` consecutive
  check-points with attack success >= 99% (counters and up/down flags are reset then);
- after `patience` consecutive check-points at >= 99% the cost is multiplied by 2, after `patience` below it
  is divided by 2**1.5;
- a check-point that reaches 99% with a smaller mean mask norm than the best so far saves the current
  mask and pattern (the smallest-norm mask that reaches 99% is kept; if none ever does, the last one is);
- early stop once the cost has gone both up and down and the best norm has not improved for
  `early_stop_patience` = 25 check-points.

Granularity: as in the original, the schedule is updated per CHECK-POINT, i.e. per mini-epoch of
`steps_per_check` Adam steps (official: NB_SAMPLE 1000 // BATCH_SIZE 32 = 31), with the attack success and
mask norm averaged over the batches of that mini-epoch; at most `max_checks` check-points (official: 1000).

Vectorisation: every label's parameters, Adam state and schedule counters are arrays with a leading label
axis. A step stamps the shared clean batch with every label's trigger and sends the L x B stamped images
through the (shared) model as ONE batch of L * B images; the loss is the sum of the per-label losses, so
each label gets the gradient of its own loss. The host drives the loop: one jitted call per Adam step and
one per check-point end (the schedule update, on device), dispatched asynchronously; the host waits only
every `checks_per_sync` check-points, to stop once every label has early-stopped. (A lax.fori_loop over
the steps saves the dispatches but is slower: XLA:CPU runs the input-gradient convolutions of a loop body
4-10x slower than at top level.) A label that has early-stopped is frozen (its parameters, Adam state and
counters no longer change) while the others continue, so running labels together or one at a time
(`mode="sequential"`: the same code with one label) gives the same result up to float32 rounding. All
labels share the same clean batch at each step; the batch of step t is a function of (seed, t) and the
initial trigger of label l of (seed, l). With several devices (bdjax exposes every CPU core as one) the
label axis is sharded over them (no cross-device communication in a step), so each core optimises its
share of the labels; one label runs on one device.

Speed (scripts/bench_neural_cleanse.py): the gain of all labels at once over one at a time is at most the
device count (2 here) times how much cheaper an image gets in a batch L times bigger, which on XLA:CPU is
little for a convolutional net (~1.2x for 8x8 digits, none for 32x32 GTSRB images): measured 0.8-1.2x on 2
shared CPU cores, see the script's docstring. GTSRB, 43 labels x 16 images, cifar_cnn: ~2 CPU-seconds per step.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bdjax.defenses.metrics import flag_small_outliers, mad_anomaly_index
from bdjax.errors import ConfigError
from bdjax.train.sharding import axis_mesh

MODES = ("batched", "sequential")


@dataclasses.dataclass(frozen=True)
class NCConfig:
    batch_size: int = 32  # clean images per step (shared by all labels)
    steps_per_check: int = 31  # Adam steps per check-point (official MINI_BATCH = 1000 // 32)
    max_checks: int = 1000  # official STEPS
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0  # up: x multiplier; down: / multiplier ** 1.5
    reset_cost_to_zero: bool = True  # start at cost 0 (official default); False: start at init_cost
    early_stop: bool = True
    early_stop_patience: int = 25  # check-points without improvement of the best norm (5 * patience)
    early_stop_threshold: float = 1.0  # "no improvement" = best >= threshold * previous best
    anomaly_threshold: float = 2.0
    checks_per_sync: int = 10  # check-points dispatched between the host's checks for early stop
    seed: int = 0

    def validate(self) -> "NCConfig":
        checks = [
            (self.batch_size >= 1, "batch_size", ">= 1"), (self.steps_per_check >= 1, "steps_per_check", ">= 1"),
            (self.max_checks >= 1, "max_checks", ">= 1"), (self.lr > 0, "lr", "> 0"),
            (0 <= self.beta1 < 1, "beta1", "in [0, 1)"), (0 <= self.beta2 < 1, "beta2", "in [0, 1)"),
            (self.init_cost > 0, "init_cost", "> 0"), (0 < self.success_threshold <= 1, "success_threshold", "in (0, 1]"),
            (self.patience >= 1, "patience", ">= 1"), (self.cost_multiplier > 1, "cost_multiplier", "> 1"),
            (self.early_stop_patience >= 1, "early_stop_patience", ">= 1"),
            (self.early_stop_threshold > 0, "early_stop_threshold", "> 0"),
            (self.anomaly_threshold > 0, "anomaly_threshold", "> 0"), (self.checks_per_sync >= 1, "checks_per_sync", ">= 1"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise ConfigError(f"neural cleanse {field} must be {expected}, got {getattr(self, field)!r}")
        return self


# ----------------------------------------------------------------------------------------------------------
# The cost schedule as per-label array state


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


# ----------------------------------------------------------------------------------------------------------
# The optimisation, all labels at once


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


def _to_float(x):
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def _freeze(active, new, old):
    """Per-label select on a pytree whose leaves have a leading label axis."""
    def sel(n, o):
        a = active.reshape(active.shape + (1,) * (n.ndim - 1))
        return jnp.where(a, n, o)
    return jax.tree.map(sel, new, old)


@functools.lru_cache(maxsize=16)
def _compiled(model, cfg: NCConfig, image_shape: tuple, n_clean: int):
    """(init, step, end_check) jitted for one model / config / image shape; the label set is a traced
    argument, so a given number of labels compiles once whatever the labels are.

    The host drives the loop (one call per Adam step, one per check-point end) instead of a lax loop:
    XLA:CPU runs the input-gradient convolutions of a loop body ~4-10x slower than at top level (in a loop
    it folds the kernel transpose into the convolution, which then misses the fast convolution path)."""
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
        return _to_float(x_all[lax.dynamic_slice(perm, (pos * B,), (B,))])

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

    def step(variables, x_all, labels, st: NCState) -> NCState:
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

    return jax.jit(init), jax.jit(step, donate_argnums=(3,)), jax.jit(end_check, donate_argnums=(0,))


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
    key_cfg = dataclasses.replace(cfg, max_checks=1, checks_per_sync=1, anomaly_threshold=2.0)
    init, step, end_check = _compiled(model, key_cfg, tuple(int(d) for d in x_clean.shape[1:]), len(x_clean))
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
        for _ in range(n):
            for _ in range(cfg.steps_per_check):
                state = step(variables, x_dev, labels_dev, state)
            state = end_check(state)
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


# ----------------------------------------------------------------------------------------------------------
# Detection


@dataclasses.dataclass
class NCResult:
    labels: np.ndarray  # (L,) the labels analysed
    norms: np.ndarray  # (L,) L1 norm of each label's kept mask
    anomaly_index: np.ndarray  # (L,) MAD anomaly index of the norms (over the labels analysed)
    flagged_labels: list  # labels below the median norm with anomaly index > threshold
    masks: np.ndarray  # (L, H, W) in [0, 1]
    patterns: np.ndarray  # (L, H, W, C) in [0, 1]
    reached: np.ndarray  # (L,) whether a mask reached the success threshold (else the last mask is kept)
    cost: np.ndarray  # (L,) final cost
    n_checks: np.ndarray  # (L,) check-points run per label
    early_stopped: np.ndarray  # (L,)
    steps: int  # optimisation steps run (the longest label)
    mode: str
    wall_s: float
    config: NCConfig

    def trigger(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask (H, W, 1), pattern (H, W, C)) reversed for `label`."""
        i = int(np.flatnonzero(self.labels == label)[0])
        return self.masks[i][..., None], self.patterns[i]

    def summary(self) -> dict:
        return {
            "labels": self.labels.tolist(), "norms": self.norms.tolist(),
            "anomaly_index": self.anomaly_index.tolist(), "flagged_labels": list(self.flagged_labels),
            "reached": self.reached.tolist(), "n_checks": self.n_checks.tolist(), "steps": self.steps,
            "mode": self.mode, "nc_wall_s": self.wall_s, "nc_config": dataclasses.asdict(self.config),
        }


def _check_labels(labels, num_classes: int) -> np.ndarray:
    if labels is None:
        return np.arange(num_classes, dtype=np.int32)
    arr = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).reshape(-1)
    if arr.size == 0 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= num_classes:
        raise ConfigError(f"neural cleanse labels must be a non-empty list of class indices in [0, {num_classes}), "
                          f"got {labels!r}")
    if len(set(arr.tolist())) != arr.size:
        raise ConfigError(f"neural cleanse labels must not repeat, got {arr.tolist()}")
    return arr.astype(np.int32)


def neural_cleanse(model, variables, x_clean, num_classes: int, *, labels=None, config: NCConfig = NCConfig(),
                   mode: str = "batched", progress: bool = False) -> NCResult:
    """Reverse-engineer a trigger for every label (or `labels`) and flag low-norm outliers.

    mode="batched": all labels advance together (one optimisation over a label axis); mode="sequential": the
    same code run on one label at a time (as the original scans labels), for comparison."""
    if mode not in MODES:
        raise ConfigError(f"neural cleanse mode must be one of {', '.join(MODES)}, got {mode!r}")
    labels = _check_labels(labels, num_classes)
    t0 = time.time()
    if mode == "batched":
        out = reverse_engineer(model, variables, x_clean, labels, config, progress=progress)
    else:
        parts = [reverse_engineer(model, variables, x_clean, [int(l)], config, progress=progress) for l in labels]
        out = {k: (max(p[k] for p in parts) if k == "steps" else np.concatenate([p[k] for p in parts]))
               for k in parts[0]}
    norms = out["norms"].astype(np.float64)
    flagged = [int(labels[i]) for i in flag_small_outliers(norms, config.anomaly_threshold)]
    return NCResult(labels=labels, norms=norms, anomaly_index=mad_anomaly_index(norms), flagged_labels=flagged,
                    masks=out["masks"], patterns=out["patterns"], reached=out["reached"], cost=out["cost"],
                    n_checks=out["n_checks"], early_stopped=out["early_stopped"], steps=out["steps"], mode=mode,
                    wall_s=time.time() - t0, config=config)


def model_score(result: NCResult) -> float:
    """One anomaly score per model, for model-level detection (e.g. an AUC over a zoo of models): the largest
    anomaly index among the labels whose mask norm is below the median (a backdoor makes its target's
    trigger unusually SMALL; large norms are not suspicious), 0.0 if no label is below the median."""
    norms = np.asarray(result.norms, np.float64)
    below = norms < np.median(norms)
    return float(np.max(np.asarray(result.anomaly_index)[below])) if below.any() else 0.0


def save_trigger_grid(path, result: NCResult, ncols: int | None = None) -> None:
    """PNG grid of the reversed triggers (mask * pattern) per label, titled with the norm; flagged in red."""
    from bdjax import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    L = len(result.labels)
    ncols = ncols or min(L, 11 if L > 20 else 10)
    nrows = -(-L // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.25 * ncols, 1.45 * nrows), squeeze=False)
    flagged = set(result.flagged_labels)
    for ax in axes.ravel():
        ax.axis("off")
    for i, label in enumerate(result.labels):
        ax = axes.ravel()[i]
        fusion = result.masks[i][..., None] * result.patterns[i]
        img = np.clip(fusion * 255, 0, 255).astype(np.uint8)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{int(label)}: {result.norms[i]:.1f}", fontsize=7,
                     color="crimson" if int(label) in flagged else "black")
    fig.suptitle("Neural Cleanse: reversed triggers (mask x pattern), label: mask L1 norm", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Mitigation by unlearning


def unlearn(model, variables, x_clean, y_clean, result: NCResult, *, labels=None, fraction: float = 0.2,
            epochs: int = 2, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 64,
            seed: int = 0) -> tuple[dict, dict]:
    """Fine-tune on clean images, `fraction` of them stamped with the reversed trigger of a flagged label
    (round-robin over `labels`, default result.flagged_labels) while keeping their TRUE labels, so the
    model unlearns the trigger -> target shortcut (Neural Cleanse, Sec. VI-C). SGD with momentum, train mode
    (BatchNorm statistics are updated), one device. Returns (new variables as host numpy arrays, info)."""
    labels = list(result.flagged_labels if labels is None else labels)
    x = np.asarray(x_clean)
    y = np.asarray(y_clean, np.int32)
    if not 0 < fraction <= 1:
        raise ConfigError(f"unlearning fraction must be in (0, 1], got {fraction!r}")
    if len(x) < batch_size:
        raise ConfigError(f"unlearning batch_size={batch_size} is larger than the {len(x)} clean images")
    info = {"unlearn_labels": [int(l) for l in labels], "unlearn_fraction": float(fraction), "unlearn_epochs": int(epochs)}
    if not labels:
        return variables, {**info, "unlearn_steps": 0}
    rng = np.random.default_rng(seed)
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    chosen = rng.choice(len(x), max(1, int(round(fraction * len(x)))), replace=False)
    for j, i in enumerate(chosen):
        mask, pattern = result.trigger(labels[j % len(labels)])
        xf[i] = (1 - mask) * xf[i] + mask * pattern

    dev = jax.devices()[0]
    # Fresh device buffers: the step donates them, and device_put alone would hand back the caller's own arrays.
    variables = jax.device_put(jax.device_get(variables), dev)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(lr, momentum=momentum)
    opt_state = tx.init(params)
    key = jax.random.key(seed)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, stats, opt_state, xb, yb, i):
        def loss_fn(p):
            v = {"params": p, **({"batch_stats": stats} if stats else {})}
            logits, upd = model.apply(v, xb, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": jax.random.fold_in(key, i)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), upd.get("batch_stats", stats), opt_state, loss

    x_dev, y_dev = jax.device_put(xf, dev), jax.device_put(y, dev)
    n_steps = 0
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for s in range(len(x) // batch_size):
            idx = jax.device_put(perm[s * batch_size:(s + 1) * batch_size], dev)
            params, stats, opt_state, loss = step(params, stats, opt_state, x_dev[idx], y_dev[idx], n_steps)
            n_steps += 1
    # host arrays: usable by any later jit, whatever its device placement (e.g. bdjax.train.evaluate's mesh)
    new = jax.device_get({"params": params, **({"batch_stats": stats} if stats else {})})
    return new, {**info, "unlearn_steps": n_steps, "unlearn_n_stamped": int(len(chosen))}
