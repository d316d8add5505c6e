"""Where the zoo trainer's time goes against PyTorch: the ULP CNN's convolutions alone, XLA:CPU against oneDNN.

    python scripts/bench_conv.py [--batch 64] [--reps 10]

For each distinct 5x5 convolution of the ULP CIFAR CNN (bdjax.models.ulp_cnn; 32x32, 16x16 and 8x8 maps): the
time of forward + both gradients (input and weights, what a train step needs) through `jax.vjp` of
`lax.conv_general_dilated` as bdjax compiles it (one CPU device, as each model of a population gets), and through
`torch.nn.functional.conv2d` + `backward()` with one thread and with all cores, in the same process.
`xla_over_torch_1_thread` > 1 means XLA's convolution is slower than PyTorch's on one core. Needs `torch`
(`pip install -e ".[bench]"`). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import bdjax  # noqa: F401  (one CPU device per core, as the zoo trainer runs)
import jax
import jax.numpy as jnp
import numpy as np

import torch_baselines

LAYERS = [(32, 3, 64), (32, 64, 64), (16, 64, 64), (8, 64, 64)]  # (map side, in channels, out channels)


def best_ms(fn, reps: int) -> float:
    fn()  # warm-up (compile, allocator, oneDNN primitive cache)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def xla_ms(batch: int, side: int, c_in: int, c_out: int, reps: int) -> float:
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.jit
    def fwd_bwd(x, w, g):
        y, vjp = jax.vjp(conv, x, w)
        return y, *vjp(g)

    dev = jax.local_devices()[0]
    x = jax.device_put(jnp.ones((batch, side, side, c_in)), dev)
    w = jax.device_put(jnp.full((5, 5, c_in, c_out), 0.01), dev)
    g = jax.device_put(jnp.ones((batch, side, side, c_out)), dev)
    return best_ms(lambda: jax.block_until_ready(fwd_bwd(x, w, g)), reps)


def torch_ms(batch: int, side: int, c_in: int, c_out: int, reps: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(batch, c_in, side, side, requires_grad=True)
    w = torch.full((c_out, c_in, 5, 5), 0.01, requires_grad=True)

    def fwd_bwd():
        x.grad = w.grad = None
        torch.nn.functional.conv2d(x, w, padding=2).sum().backward()

    return best_ms(fwd_bwd, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if not torch_baselines.torch_available():
        raise SystemExit("bench_conv needs torch: pip install -e '.[bench]'")
    cores = os.cpu_count() or 1
    rows = []
    for side, c_in, c_out in LAYERS:
        xla = xla_ms(args.batch, side, c_in, c_out, args.reps)
        t1 = torch_ms(args.batch, side, c_in, c_out, args.reps, 1)
        tn = torch_ms(args.batch, side, c_in, c_out, args.reps, cores)
        rows.append({"layer": f"{side}x{side} {c_in}->{c_out}", "xla_ms": round(xla, 2), "torch_1_thread_ms": round(t1, 2),
                     f"torch_{cores}_threads_ms": round(tn, 2), "xla_over_torch_1_thread": round(xla / t1, 2)})
        print(f"{rows[-1]['layer']:>14}: XLA {xla:7.1f} ms, PyTorch 1 thread {t1:7.1f} ms, {cores} threads {tn:7.1f} ms "
              f"-> XLA / PyTorch(1) {xla / t1:.2f}", flush=True)
    print(json.dumps({"batch": args.batch, "device": bdjax.runtime.device_summary(), "rows": rows}))


if __name__ == "__main__":
    main()
