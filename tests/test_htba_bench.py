"""scripts/bench_htba.py end to end on a tiny model: its JSON line, and fields consistent with each other."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_htba_reports_consistent_rates():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_htba.py"), "--model-options", "width=2,hidden=8",
                        "--size", "8", "--k", "6", "--iters", "4", "--runs", "1", "--assign-sizes", "6",
                        "--matchings", "hungarian", "--batches", "1"],
                       env={**os.environ, "BDJAX_PROGRESS": "0"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert any("host loop (scipy every iteration)" in line for line in lines[:-1])  # the readable table
    assert out["iters_per_s"] > 0 and out["host_iters_per_s"] > 0
    assert abs(out["speedup_vs_host"] - out["iters_per_s"] / out["host_iters_per_s"]) < 1e-9
    assert (out["k"], out["iters"], out["batches"]) == (6, 4, 1) and out["batched_iters_per_s"] is None
    assert out["greedy_iters_per_s"] is None and out["hungarian_share"] is None
    assert out["speedup_bound_vs_host"] is None  # it needs the greedy loop
    assert set(out["assignment"]) == {"6"}
    for timing in out["assignment"].values():
        assert timing["optax_ms"] > 0 and timing["scipy_ms"] > 0 and timing["same_cost"] is True


def test_bench_htba_model_options_keep_lists_whole_and_reject_bad_entries():
    import pytest

    from bdjax.errors import ConfigError
    from conftest import load_script

    bench = load_script("scripts/bench_htba.py")
    assert bench.model_options("widths=[32,64,128],dropout=0.5") == {"widths": [32, 64, 128], "dropout": 0.5}
    with pytest.raises(ConfigError, match="name=value"):
        bench.model_options("widths")
