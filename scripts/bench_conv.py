"""Where the zoo trainer's time goes against PyTorch: the ULP CNN's convolutions alone, XLA:CPU against oneDNN.

    python scripts/bench_conv.py [--batch 64] [--reps 10]
    python scripts/bench_conv.py --parts     # XLA only, no torch: forward, input and weight gradient apart

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


def xla_parts_ms(batch: int, side: int, c_in: int, c_out: int, reps: int) -> dict:
    """Forward, input gradient and weight gradient of XLA's convolution timed apart, and the weight gradient as
    patches x output gradient (gemm_conv's, what conv_impl="gemm_dw" uses)."""
    from bdjax.models.common import gemm_conv

    args = ((1, 1), ((2, 2), (2, 2)))
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    by_gemm = lambda x, w: gemm_conv(x, w, *args, dimension_numbers=dn)
    dev = jax.local_devices()[0]
    x = jax.device_put(jnp.ones((batch, side, side, c_in)), dev)
    w = jax.device_put(jnp.full((5, 5, c_in, c_out), 0.01), dev)
    g = jax.device_put(jnp.ones((batch, side, side, c_out)), dev)
    parts = {"forward": jax.jit(conv),
             "input_grad": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)),
             "weight_grad": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)),
             "weight_grad_gemm": jax.jit(lambda x, w, g: jax.vjp(lambda w: by_gemm(x, w), w)[1](g))}
    call = {"forward": lambda f: f(x, w)}
    return {name: round(best_ms(lambda: jax.block_until_ready(call.get(name, lambda f: f(x, w, g))(f)), reps), 2)
            for name, f in parts.items()}


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
    ap.add_argument("--parts", action="store_true", help="XLA's forward / input / weight gradient apart (no torch)")
    args = ap.parse_args()
    if args.parts:
        rows = [{"layer": f"{side}x{side} {c_in}->{c_out}", **xla_parts_ms(args.batch, side, c_in, c_out, args.reps)}
                for side, c_in, c_out in LAYERS]
        for r in rows:
            print(r, flush=True)
        print(json.dumps({"batch": args.batch, "device": bdjax.runtime.device_summary(), "rows": rows}))
        return
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
