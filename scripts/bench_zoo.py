"""Population training throughput: P models trained together vs the same models one after another.

    python scripts/bench_zoo.py [--populations 1,8,32,128] [--model ulp_cnn] [--batch 64] [--steps 3] [--modes auto]
                                [--convs xla,gemm,gemm_dw]

For each population size P: images/s summed over the P models of `bdjax.zoo.population.make_population_step`
(half clean, half poisoned: the batches are gathered and stamped on device inside the step), the model axis
sharded over every local device (bdjax exposes each CPU core as one). The baseline ("one after another with the
same code") is the P = 1 population: its rate is what training the models sequentially achieves. Modes: `map`
(models of a device run one after another inside the compiled step: ordinary convolutions) and `vmap` (grouped
convolutions); `auto` is the backend's default, `all` times both. `--convs gemm` also times every mode with the
convolutions computed as patches x matrix (bdjax.models.common.gemm_conv: under vmap a batched GEMM instead of a
grouped convolution), `--convs gemm_dw` with XLA's convolution except for the weight gradient (patches x output
gradient, bdjax.models.common.gemm_dw_conv: for CPUs whose weight-gradient convolution is slow); the sequential
baseline is always the plain XLA convolution. Data: random 32x32x3 uint8 images (the cost
does not depend on the pixels). Compile and one warm-up step are excluded.

models_per_hour_ulp_cifar10: models finished per hour at the ULP CIFAR-10 schedule (50 epochs over 50000 clean
+ 5000 stamped images), from the same rates.

The ceiling, measured in the same process: `flops_per_image` is XLA's cost analysis of one model's training step
(forward, backward, update) divided by the batch; `gemm_gflops` the summed rate of one large float32 matrix product
per device, all devices at once (the fastest kernel the backend has); `gemm_bound_images_per_s` their ratio, the
images/s a trainer would reach if every FLOP ran at GEMM speed, and `fraction_of_gemm_bound` each P's share of it.
PyTorch, in the same run (only when `torch` is importable: `pip install -e ".[bench]"`; never needed by the tests):
`torch_sequential_images_per_s` is the same ULP CIFAR CNN trained by a plain PyTorch loop on all cores
(scripts/torch_baselines.py), the way a zoo is trained one model after another today, and `ratio_vs_torch` each
P's summed rate over it (null without torch, or for another --model).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BDJAX_PROGRESS", "0")

import bdjax  # noqa: E402,F401  (one CPU device per core before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from bdjax import runtime  # noqa: E402
from bdjax.config import TrainConfig  # noqa: E402
from bdjax.models import get_model  # noqa: E402
from bdjax.train.optim import make_optimizer  # noqa: E402
from bdjax.zoo import population as pop  # noqa: E402
from bdjax.zoo.plan import TriggerPool, plan_zoo  # noqa: E402

import torch_baselines  # noqa: E402  (scripts/ is on sys.path when this file runs)

ULP_IMAGES_PER_MODEL = 50 * (50000 + 5000)


def population_rate(model, P: int, batch: int, steps: int, mode: str, n_images: int = 2048) -> float:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n_images).astype(np.int32)
    pool = TriggerPool(("t0",), (rng.random((1, 5, 5, 3)) > 0.5).astype(np.float32), np.ones((1, 5, 5, 1), np.float32))
    records = plan_zoo(P - P // 2, P // 2, pool, 10, seed=0)
    cfg = TrainConfig(model="ulp_cnn", batch_size=batch, optimizer="adam", lr=1e-2, schedule="constant")
    spe = n_images // batch
    tx = make_optimizer(cfg, spe)
    mesh = pop.model_mesh(P)
    tasks_host = pop.tasks_from_records(records, x.shape[1:], pool.size)
    tasks = pop.place(tasks_host, mesh, True)
    data_host = pop.shared_data(x, y, 10, pool.pattern, pool.mask)
    data = pop.place(data_host, mesh, False)
    states = pop.init_population(model, tx, tasks_host, x.shape[1:], mesh)
    perms = pop.make_epoch_permutations(n_images + int(data_host.class_count.max()), mesh)(
        tasks, data, pop.place(np.int32(0), mesh, False))
    step = pop.make_population_step(model, tx, steps_per_epoch=spe, batch_size=batch, mode=mode, mesh=mesh)
    for _ in range(2):  # compile + warm-up
        states, m = step(states, tasks, perms, data)
        jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        states, m = step(states, tasks, perms, data)
        jax.block_until_ready(m)
    return P * batch * steps / (time.perf_counter() - t)


def step_flops_per_image(model, batch: int) -> float:
    """XLA's FLOP count for one model's training step on `batch` 32x32x3 images, per image."""
    x, y = jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params, batch_stats):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    compiled = jax.jit(jax.grad(loss)).lower(variables["params"], variables.get("batch_stats", {})).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax
    return float(cost["flops"]) / batch


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Summed GFLOP/s of an n x n float32 matrix product on every local device at once."""
    devices = jax.local_devices()
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("d")))
    a = put(jax.random.normal(jax.random.key(0), (len(devices), n, n)))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    t = time.perf_counter()
    for _ in range(reps):
        out = matmul(a, a)
    jax.block_until_ready(out)
    return len(devices) * reps * 2 * n**3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--populations", default="1,8,32,128")
    ap.add_argument("--model", default="ulp_cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="auto", help="auto | map | vmap | all")
    ap.add_argument("--convs", default="xla", help="comma-separated of xla, gemm (bdjax.models.common.gemm_conv: "
                                                   "patches x matrix), gemm_dw (only the weight gradient so)")
    args = ap.parse_args()
    modes = list(pop.MODES) if args.modes == "all" else [pop.check_mode(m) for m in args.modes.split(",")]
    variants = [(m, c) for m in modes for c in args.convs.split(",")]
    label = lambda m, c: m if c == "xla" else f"{m}+{c}"
    models = {c: get_model(args.model, 10, conv_impl=c) for c in args.convs.split(",")}
    out = {"model": args.model, "batch": args.batch, "device": runtime.device_summary(), "modes": modes,
           "images_per_s": {}, "by_mode": {label(m, c): {} for m, c in variants}}
    sizes = [int(p) for p in args.populations.split(",")]
    for P in sizes:
        for mode, conv in variants:
            r = population_rate(models[conv], P, args.batch, args.steps, mode)
            out["by_mode"][label(mode, conv)][str(P)] = round(r, 1)
            print(f"P={P:4d} {label(mode, conv):9s}: {r:8.1f} images/s summed", flush=True)
        out["images_per_s"][str(P)] = max(v[str(P)] for v in out["by_mode"].values())
    base = pop.check_mode("auto")
    seq = out["by_mode"].get(base, {}).get("1")
    if seq is None:  # the baseline is always the plain program: one model, XLA convolution, the default mode
        seq = population_rate(get_model(args.model, 10), 1, args.batch, args.steps, base)
    out["sequential_images_per_s"] = seq
    out["speedup_vs_sequential"] = {p: round(r / seq, 2) for p, r in out["images_per_s"].items()}
    out["models_per_hour_ulp_cifar10"] = {p: round(r * 3600 / ULP_IMAGES_PER_MODEL, 3)
                                          for p, r in out["images_per_s"].items()}
    out["sequential_models_per_hour_ulp_cifar10"] = round(seq * 3600 / ULP_IMAGES_PER_MODEL, 3)
    out["flops_per_image"] = round(step_flops_per_image(get_model(args.model, 10), args.batch))
    out["gemm_gflops"] = round(gemm_gflops(), 1)
    out["gemm_bound_images_per_s"] = round(out["gemm_gflops"] * 1e9 / out["flops_per_image"], 1)
    out["fraction_of_gemm_bound"] = {p: round(r / out["gemm_bound_images_per_s"], 3) for p, r in out["images_per_s"].items()}
    torch_rate = None
    if args.model == "ulp_cnn" and torch_baselines.torch_available():
        torch_rate = round(torch_baselines.ulp_cnn_images_per_s(args.batch, max(args.steps, 3)), 1)
        print(f"PyTorch, one model after another on all cores: {torch_rate} images/s", flush=True)
    out["torch_sequential_images_per_s"] = torch_rate
    out["ratio_vs_torch"] = {p: round(r / torch_rate, 2) for p, r in out["images_per_s"].items()} if torch_rate else None
    print(f"{out['flops_per_image'] / 1e9:.3f} GFLOP per image; float32 GEMM {out['gemm_gflops']} GFLOP/s summed "
          f"-> at most {out['gemm_bound_images_per_s']} images/s at GEMM speed", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
