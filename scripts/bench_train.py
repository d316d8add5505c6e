"""Training throughput of bdjax's train step, as ratios measured in one process.

    python scripts/bench_train.py [--steps 6] [--networks ulp_cnn,resnet18] [--batch 64]

For each network: images/s of the step compiled for one device (the straightforward baseline) and of the same
step with the batch sharded over every local device (on CPU, bdjax exposes each core as a device; see
bdjax/runtime.py), the achieved GFLOP/s (XLA's own FLOP count of the step / time) and the dense f32 matmul rate of
this machine measured in the same run. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import bdjax  # noqa: F401  (sets up one CPU device per core before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.config import TrainConfig
from bdjax.models import get_model
from bdjax.train import core, create_state, make_optimizer
from bdjax.train.sharding import data_mesh, replicated


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(a)
    r.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def step_rate(name: str, batch: int, steps: int, sharded: bool) -> tuple[float, float]:
    """(images/s, FLOPs per step) of one train step of `name` at `batch`, 32x32x3 inputs."""
    model = get_model(name, 10)
    cfg = TrainConfig(model=name, batch_size=batch, epochs=1, optimizer="sgd", lr=0.01, schedule="constant")
    n = batch * (steps + 2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int32)
    tx = make_optimizer(cfg, n // batch)
    state = create_state(model, tx, jax.random.key(0), (32, 32, 3))
    mesh = data_mesh(batch) if sharded else None
    if mesh is not None and mesh.size > 1:
        state, x, y = jax.device_put((state, x, y), replicated(mesh))
    else:
        mesh = None
        state, x, y = jax.device_put((state, x, y), jax.devices()[0])
    step = core.single_model_step(model, tx, mesh=mesh, batch_size=batch, steps_per_epoch=n // batch)
    perm = jax.device_put(core.epoch_permutation(jax.random.key(0), 0, n), x.sharding)
    task = jax.device_put(core.RunTask(np.int32(0)), x.sharding)
    flops = (step.lower(state, task, perm, (x, y)).compile().cost_analysis() or {}).get("flops", float("nan"))
    for _ in range(2):  # compile + warm-up
        state, m = step(state, task, perm, (x, y))
        jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, task, perm, (x, y))
        jax.block_until_ready(m)  # as fit() does on CPU: see bdjax.train.loop.needs_step_sync
    return batch * steps / (time.perf_counter() - t), flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="ulp_cnn,resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()

    out = {"devices": len(jax.devices()), "platform": jax.devices()[0].platform, "batch": args.batch,
           "matmul_gflops": round(matmul_gflops(), 1), "images_per_s": {}, "single_device_images_per_s": {},
           "speedup_vs_single_device": {}, "achieved_gflops": {}, "fraction_of_matmul": {}}
    for name in args.networks.split(","):
        base, flops = step_rate(name, args.batch, args.steps, sharded=False)
        fast, _ = step_rate(name, args.batch, args.steps, sharded=True)
        gflops = fast / args.batch * flops / 1e9
        out["single_device_images_per_s"][name] = round(base, 1)
        out["images_per_s"][name] = round(fast, 1)
        out["speedup_vs_single_device"][name] = round(fast / base, 2)
        out["achieved_gflops"][name] = round(gflops, 1)
        out["fraction_of_matmul"][name] = round(gflops / out["matmul_gflops"], 2)
        print(f"{name}: {base:.1f} img/s on one device, {fast:.1f} img/s on {out['devices']} "
              f"({fast / base:.2f}x), {gflops:.1f} GFLOP/s achieved ({flops / args.batch / 1e9:.2f} GFLOP/image)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
