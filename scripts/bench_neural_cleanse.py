"""Neural Cleanse: all labels at once (one vmapped optimisation) vs one label at a time, with the same code.

    python scripts/bench_neural_cleanse.py [--labels 10,43] [--steps-per-check 10] [--checks 4] [--repeats 1]

Both modes call `bdjax.defenses.neural_cleanse.neural_cleanse` (mode="batched" / mode="sequential"; the
sequential mode runs `reverse_engineer` on [label] for each label, i.e. the identical jitted code with a label
axis of 1). Model: bdjax's `mnist_cnn` with K outputs, randomly initialised (seed 0), on the embedded 8x8 digits
test images (360 clean images, batch 32): the optimisation costs the same whatever the weights, and a
random net lets K go to 43 (GTSRB's label count). Early stop is off, so every label runs exactly
checks x steps-per-check Adam steps in both modes.

Timing: compile time is EXCLUDED from both modes: each mode is run once to compile (batched with K labels;
sequential with label 0, which compiles the one-label function reused for every label), then timed on a
second run (best of --repeats). Both modes run in this one process, alternating, so the machine's load
affects both. The last line is one JSON object with speedup_K = sequential time / batched time, and the
cost per image of a bare forward + input-gradient pass at batch B and at B x K (fwd_grad_us_per_image_*):
since both modes run the whole optimisation inside compiled loops (no per-step host round trip), the ratio
is bounded by how much cheaper an image gets in a K-times bigger batch on this device.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("BDJAX_PROGRESS", "0")

import bdjax  # noqa: E402,F401  (JAX device setup before JAX starts)
import jax  # noqa: E402

from bdjax import runtime  # noqa: E402
from bdjax.data import load_dataset  # noqa: E402
from bdjax.defenses.neural_cleanse import NCConfig, neural_cleanse  # noqa: E402
from bdjax.models import get_model, init_model  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_grad_us_per_image(model, variables, image_shape, batch: int, reps: int = 5) -> float:
    """Microseconds per image of one forward + input-gradient pass at `batch` (the work of one NC step):
    shows whether a bigger batch (all labels at once) makes each image cheaper on this machine."""
    import jax.numpy as jnp

    variables = jax.device_put(variables, jax.devices()[0])
    f = jax.jit(jax.grad(lambda x: model.apply(variables, x, train=False).sum()))
    x = jnp.full((batch, *image_shape), 0.5, jnp.float32)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(x)
    r.block_until_ready()
    return (time.perf_counter() - t) / reps / batch * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="10,43", help="label counts to benchmark (comma-separated)")
    ap.add_argument("--steps-per-check", type=int, default=10)
    ap.add_argument("--checks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    ds = load_dataset("digits")
    x = ds.x_test
    cfg = NCConfig(batch_size=args.batch, steps_per_check=args.steps_per_check, max_checks=args.checks,
                   checks_per_call=args.checks, early_stop=False)
    steps = cfg.steps_per_check * cfg.max_checks
    out = {"steps_per_label": steps, "batch": cfg.batch_size, "image_shape": list(x.shape[1:]),
           "model": "mnist_cnn (random init)", "compile": "excluded (one warm-up run per mode)",
           "device": runtime.device_summary()}
    for k in [int(s) for s in args.labels.split(",") if s.strip()]:
        model = get_model("mnist_cnn", k)
        variables = init_model(model, 0, x.shape[1:])
        run = lambda mode, labels=None: neural_cleanse(model, variables, x, k, labels=labels, config=cfg, mode=mode)
        compile_batched = timed(lambda: run("batched"))
        compile_seq = timed(lambda: run("sequential", [0]))
        t_b, t_s = [], []
        for _ in range(args.repeats):
            t_b.append(timed(lambda: run("batched")))
            t_s.append(timed(lambda: run("sequential")))
        tb, ts = min(t_b), min(t_s)
        out.update({f"batched_s_{k}": round(tb, 3), f"sequential_s_{k}": round(ts, 3),
                    f"speedup_{k}": round(ts / tb, 2), f"first_run_batched_s_{k}": round(compile_batched, 2),
                    f"first_run_one_label_s_{k}": round(compile_seq, 2),
                    f"label_steps_per_s_batched_{k}": round(k * steps / tb, 1),
                    f"label_steps_per_s_sequential_{k}": round(k * steps / ts, 1)})
        us_small = forward_grad_us_per_image(model, variables, x.shape[1:], cfg.batch_size)
        us_big = forward_grad_us_per_image(model, variables, x.shape[1:], cfg.batch_size * k)
        out.update({f"fwd_grad_us_per_image_{k}_batch{cfg.batch_size}": round(us_small, 1),
                    f"fwd_grad_us_per_image_{k}_batch{cfg.batch_size * k}": round(us_big, 1)})
        print(f"{k} labels x {steps} steps: all at once {tb:.2f} s, one at a time {ts:.2f} s, "
              f"speedup {ts / tb:.1f}x; forward+input-grad {us_small:.0f} us/image at batch {cfg.batch_size}, "
              f"{us_big:.0f} at batch {cfg.batch_size * k}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
