"""Cost of the blind backdoor's step against a plain train step of the same model and batch, in one run.

    python scripts/bench_blind.py [--model cifar_cnn] [--batch 128] [--steps 8] [--rounds 5]

Steps timed (each compiled once, the core's single_model_step under the data mesh as fit runs it):
  plain   cross-entropy on the batch (one forward + backward);
  floor2  two separate forward + backward passes (the clean batch and a stamped copy), gradients summed: what the
          per-task gradients of a 2-task step cost at least;
  mgda2   the blind step, MGDA with loss+ normalisation, pixel pattern, constant label (2 tasks);
  mgda3   the same with the Neural Cleanse evasion task (3 tasks: an inner NC Adam step and a third pass).
The steps are timed in interleaved rounds (plain, floor2, mgda2, mgda3, plain, ...) and each one's median is used,
so a load change on a shared machine hits all of them alike. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import bdjax  # noqa: F401  (one CPU device per core before JAX starts)
import jax
import numpy as np

from bdjax.attacks.blind import BlindConfig, make_blind
from bdjax.config import TrainConfig
from bdjax.models import get_model
from bdjax.train import core, create_state, make_optimizer
from bdjax.train.sharding import data_mesh, replicated


def floor_grad_fn(model, synth):
    """Two tasks' gradients with nothing else: the lower bound of any per-task-gradient method."""
    loss = core.classification_loss(model)

    def grad_fn(params, state, batch, rng):
        g1, aux = core.value_and_grad(loss)(params, state, batch, rng)
        g2, _ = core.value_and_grad(loss)(params, state, {"x": synth.apply(rng, batch["x"]), "y": batch["y"]}, rng)
        return jax.tree.map(lambda a, b: a + b, g1, g2), aux
    return grad_fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="steps per timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timings per step kind")
    args = p.parse_args()

    shape, B = (32, 32, 3), args.batch
    model = get_model(args.model, 10)
    cfg = TrainConfig(model=args.model, batch_size=B, epochs=1, optimizer="sgd", lr=0.01, schedule="constant")
    n = B * 4
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))
    tx = make_optimizer(cfg, n // B)
    mesh = data_mesh(B)
    mesh = mesh if mesh.size > 1 else None
    placement = replicated(mesh) if mesh is not None else jax.devices()[0]
    two = make_blind(model, BlindConfig(target=8), shape, 10, B)
    three = make_blind(model, BlindConfig(target=8, evasion="neural_cleanse"), shape, 10, B)
    kinds = {"plain": (None, None), "floor2": (floor_grad_fn(model, two.synthesizer), None),
             "mgda2": (two.grad_fn, two.extra), "mgda3": (three.grad_fn, three.extra)}
    data, task = jax.device_put((data, core.RunTask(np.int32(0))), placement)
    perm = jax.device_put(core.epoch_permutation(jax.random.key(0), 0, n), placement)
    steps, states = {}, {}
    for name, (grad_fn, extra) in kinds.items():
        t = time.perf_counter()
        steps[name] = core.single_model_step(model, tx, mesh=mesh, grad_fn=grad_fn, batch_size=B, steps_per_epoch=n // B)
        state = jax.device_put(create_state(model, tx, jax.random.key(0), shape, extra), placement)
        for _ in range(2):  # compile + warm-up
            state, m = steps[name](state, task, perm, data)
            jax.block_until_ready(m)
        states[name] = state
        print(f"{name}: compiled and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name in kinds:
            state = states[name]
            t = time.perf_counter()
            for _ in range(args.steps):
                state, m = steps[name](state, task, perm, data)
                jax.block_until_ready(m)  # as fit() does on CPU (bdjax.train.loop.needs_step_sync)
            times[name].append((time.perf_counter() - t) / args.steps)
            states[name] = state
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {"model": args.model, "batch": B, "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
           "step_ms": {k: round(v, 2) for k, v in ms.items()},
           "ratio_2_tasks": round(ms["mgda2"] / ms["plain"], 3), "ratio_3_tasks": round(ms["mgda3"] / ms["plain"], 3),
           "floor_2_tasks": round(ms["floor2"] / ms["plain"], 3),
           "overhead_vs_floor_2_tasks": round(ms["mgda2"] / ms["floor2"], 3)}
    for k, v in ms.items():
        print(f"{k}: {v:.1f} ms/step ({v / ms['plain']:.2f}x plain)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
