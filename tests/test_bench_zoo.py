"""scripts/bench_zoo.py end to end on a tiny model: the JSON line the issue asks for, and its ceiling fields."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_zoo_reports_rates_speedups_and_the_gemm_ceiling():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_zoo.py"), "--model", "mnist_cnn",
                        "--populations", "1,2", "--batch", "8", "--steps", "1"],
                       env={**os.environ, "BDJAX_PROGRESS": "0"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["images_per_s"]) == {"1", "2"} and all(v > 0 for v in out["images_per_s"].values())
    seq = out["sequential_images_per_s"]
    assert seq == out["by_mode"][out["modes"][0]]["1"]
    assert out["speedup_vs_sequential"]["2"] == round(out["images_per_s"]["2"] / seq, 2)
    # mnist_cnn (width 32) on 32x32x3: two 3x3 convs dominate, ~3 x 30 MFLOP per image for a train step
    assert 3e7 < out["flops_per_image"] < 1e9
    assert out["gemm_gflops"] > 0
    bound = out["gemm_bound_images_per_s"]
    assert abs(bound - out["gemm_gflops"] * 1e9 / out["flops_per_image"]) < 0.1
    assert out["fraction_of_gemm_bound"]["1"] == round(out["images_per_s"]["1"] / bound, 3)
