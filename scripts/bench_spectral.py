"""Spectral Signatures scoring: bdjax's compiled randomized SVD vs numpy's exact SVD on one class.

    python scripts/bench_spectral.py                 # n = 5000, D = 4096 (the official representation size)
    python scripts/bench_spectral.py --n 2000 --d 1024   # a quick check (~20 s)

Synthetic representations: clean N(0, I) rows plus a 5% cluster shifted along a random direction, float32,
seeded (the shift makes the poisons separable, as a learned backdoor feature is). Both sides score the same
centred matrix (tau_i = ((R_i - mean) . v)^2); the exact side is `np.linalg.svd(full_matrices=False)` in float32.
Timings are medians after a warm-up (the compile is excluded and printed separately). The exact SVD is timed once
by default: one run takes minutes on 2 busy cores and the gap is two orders of magnitude (`--exact-runs 3` for a
median). The removed sets are compared at Algorithm 1's rule (the top ceil(1.5 * eps * n) scores, eps = the
poison fraction). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

import bdjax  # noqa: F401  (process-level JAX setup)
import jax

from bdjax.defenses.spectral import pad_by_class, removal_count, score_padded, spectral_scores


def synthetic(n: int, d: int, poison_frac: float, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    reps = rng.standard_normal((n, d), dtype=np.float32)
    n_poison = int(round(poison_frac * n))
    poison = np.zeros(n, bool)
    poison[rng.choice(n, n_poison, replace=False)] = True
    direction = rng.standard_normal(d).astype(np.float32)
    reps[poison] += shift * direction / np.linalg.norm(direction)
    return reps, poison


def exact_scores(reps: np.ndarray) -> np.ndarray:
    m = reps - reps.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    proj = m @ vt[0]
    return proj * proj


def timed(fn, runs: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def top_k(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--poison-frac", type=float, default=0.05)
    p.add_argument("--shift", type=float, default=30.0, help="norm of the poison cluster's shift (clean std is 1)")
    p.add_argument("--runs", type=int, default=10, help="timed runs of the randomized scorer")
    p.add_argument("--exact-runs", type=int, default=1,
                   help="timed runs of numpy's exact SVD (about 2.5 min each at the default size on 2 busy cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    reps, poison = synthetic(args.n, args.d, args.poison_frac, args.shift, args.seed)
    y = np.zeros(args.n, np.int64)
    # numpy first, before JAX starts its backend: right after JAX work, XLA:CPU's pool threads keep spinning for a
    # moment and slow OpenBLAS's threads down (measured 20x on small SVDs), which would flatter the speedup.
    exact_s, exact_times, ex = timed(lambda: exact_scores(reps), args.exact_runs)

    padded, mask, index = pad_by_class(reps, y, [0])
    dev_reps, dev_mask = jax.device_put((padded, mask))
    key = jax.random.key(args.seed)

    def randomized():
        return jax.block_until_ready(score_padded(dev_reps, dev_mask, key))

    t = time.perf_counter()
    randomized()
    compile_s = time.perf_counter() - t
    rand_s, rand_times, out = timed(randomized, args.runs)
    rand_scores = np.asarray(out[0])[mask]
    e2e_s, _, _ = timed(lambda: spectral_scores(reps, y, seed=args.seed), max(3, args.runs // 2))

    k = removal_count(args.poison_frac, args.n)
    removed_rand, removed_exact = top_k(rand_scores, k), top_k(ex, k)
    corr = float(np.corrcoef(rand_scores.astype(np.float64), ex.astype(np.float64))[0, 1])
    tpr = len(removed_rand & set(np.flatnonzero(poison).tolist())) / max(1, int(poison.sum()))
    result = {
        "n": args.n, "d": args.d, "poison_frac": args.poison_frac, "removed_k": k,
        "randomized_s": rand_s, "randomized_times_s": rand_times, "compile_s": compile_s,
        "randomized_end_to_end_s": e2e_s, "exact_s": exact_s, "exact_times_s": exact_times,
        "speedup": exact_s / rand_s, "speedup_end_to_end": exact_s / e2e_s,
        "same_removed_set": removed_rand == removed_exact, "corr": corr, "tpr": tpr,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }
    print(f"spectral scoring n={args.n} d={args.d}: randomized {rand_s * 1e3:.1f} ms (compiled; "
          f"{e2e_s * 1e3:.1f} ms end to end from numpy; compile {compile_s:.1f} s) vs numpy exact SVD "
          f"{exact_s:.2f} s -> {result['speedup']:.0f}x ({result['speedup_end_to_end']:.0f}x end to end); "
          f"same removed set (top {k}): {result['same_removed_set']}, Pearson r = {corr:.6f}, tpr = {tpr:.3f}")
    print(json.dumps({k_: (v if not isinstance(v, float) or math.isfinite(v) else None) for k_, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
