"""scripts/bench_zoo.py end to end on a tiny model: its FLOP count against a hand count of the network, and
the derived fields against the rates they are derived from."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mnist_cnn_forward_flops(h: int = 32, c: int = 3, width: int = 32, hidden: int = 128, classes: int = 10) -> int:
    """2 x multiply-adds of bdjax's mnist_cnn (VALID 3x3 convs, 2x2 pool, two dense layers) on one h x h x c image."""
    h1, h2 = h - 2, h - 4
    macs = h1 * h1 * width * 9 * c + h2 * h2 * 2 * width * 9 * width
    macs += (h2 // 2) ** 2 * 2 * width * hidden + hidden * classes
    return 2 * macs


def test_bench_zoo_counts_the_step_and_derives_its_fields():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_zoo.py"), "--model", "mnist_cnn",
                        "--populations", "1,2", "--batch", "8", "--steps", "1"],
                       env={**os.environ, "BDJAX_PROGRESS": "0"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["images_per_s"]) == {"1", "2"} and all(v > 0 for v in out["images_per_s"].values())
    # a train step is the forward pass plus a backward pass of about twice its cost (no input gradient for
    # conv1): XLA's count per image must be 2.4-3.3x the hand count, or the script measures the wrong thing
    # (only the forward pass, a whole batch, the update...)
    ratio = out["flops_per_image"] / mnist_cnn_forward_flops()
    assert 2.4 < ratio < 3.3, ratio
    seq = out["sequential_images_per_s"]
    assert seq == out["by_mode"][out["modes"][0]]["1"]
    assert out["speedup_vs_sequential"]["2"] == round(out["images_per_s"]["2"] / seq, 2)
    bound = out["gemm_bound_images_per_s"]
    assert abs(bound - out["gemm_gflops"] * 1e9 / out["flops_per_image"]) < 0.1
    assert out["fraction_of_gemm_bound"]["1"] == round(out["images_per_s"]["1"] / bound, 3)
    # PyTorch runs only for the ULP CNN (and only when installed): never a ratio against another network
    assert out["torch_sequential_images_per_s"] is None and out["ratio_vs_torch"] is None


def test_torch_baseline_device_follows_jax_platform(monkeypatch):
    """A PyTorch baseline is timed only where it is like-for-like: on the CPU beside XLA:CPU, never without torch."""
    from conftest import load_script
    tb = load_script("scripts/torch_baselines.py")
    monkeypatch.setattr(tb, "torch_available", lambda: False)
    assert [tb.torch_device_for(p) for p in ("cpu", "gpu", "tpu")] == [None, None, None]
    monkeypatch.setattr(tb, "torch_available", lambda: True)
    assert tb.torch_device_for("cpu") == "cpu"
