"""Zoo training over 2 processes on localhost (jax.distributed; CPU devices of different processes talk through
gloo) stores the same zoo as one process: `bdjax zoo --coordinator HOST:PORT --num-processes N --process-id I`."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bdjax.distributed import ENV_VARS, check_process_args
from bdjax.errors import ConfigError
from bdjax.zoo import ZooStore

ROOT = Path(__file__).resolve().parents[1]
TRIGGERS = ROOT.parent / "shared" / "triggers" / "ulp_cifar10"
# 3 models in one chunk: over 2 processes the population is padded to 4 (one model per device of 2 x 2)
OVERRIDES = ["data.dataset=digits", "zoo.n_clean=1", "zoo.n_poisoned=2", "zoo.chunk_size=3", "zoo.trigger_size=3",
             "train.epochs=1", "train.lr=0.01", "train.model_options=width=4,hidden=16", f"zoo.trigger_dir={TRIGGERS}"]
# what a jax without CPU cross-process collectives says (then the test skips instead of failing)
UNSUPPORTED = re.compile(r"(not (implemented|supported|available)|unimplemented|unknown).{0,80}"
                         r"(cpu|gloo|collective|multi.?process)", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_zoo(out: Path, devices: int, log: Path, *args) -> subprocess.Popen:
    """`python -m bdjax zoo` on `devices` simulated CPU devices, output to log.out / log.err."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(BDJAX_PROGRESS="0", PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "bdjax", "zoo", "--out", str(out), *args, *OVERRIDES]
    return subprocess.Popen(cmd, env=env, stdout=log.with_suffix(".out").open("w"),
                            stderr=log.with_suffix(".err").open("w"))


def wait_all(procs: dict, timeout: float) -> dict:
    """Exit codes by name; once one process fails the others are stopped (they would wait for it forever)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        if any(p.poll() not in (None, 0) for p in procs.values()):
            break
        time.sleep(0.2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait()
    return {name: p.returncode for name, p in procs.items()}


def without_accuracies(record):
    return dataclasses.replace(record, clean_acc=None, asr=None)


def test_zoo_trained_by_two_processes_equals_one_process(tmp_path):
    if not TRIGGERS.is_dir():
        pytest.skip("shared/triggers not found")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = {"single": start_zoo(tmp_path / "single", 4, tmp_path / "single")}
    for i in range(2):  # 2 processes x 2 CPU devices, the same global device count as the single run
        procs[f"p{i}"] = start_zoo(tmp_path / "multi", 2, tmp_path / f"p{i}", "--coordinator", coordinator,
                                   "--num-processes", "2", "--process-id", str(i))
    codes = wait_all(procs, timeout=600)
    errs = {name: (tmp_path / f"{name}.err").read_text() for name in procs}
    unsupported = [m.group(0) for p in ("p0", "p1") if codes[p] != 0 and (m := UNSUPPORTED.search(errs[p]))]
    if codes["single"] == 0 and unsupported:
        pytest.skip(f"this jax cannot run CPU collectives across processes: {unsupported[0]}")
    for name, code in codes.items():
        assert code == 0, f"{name} exited with {code}:\n{errs[name][-3000:]}"

    single, multi = ZooStore.open(tmp_path / "single"), ZooStore.open(tmp_path / "multi")
    assert all(multi.complete(c) for c in range(len(multi.chunks)))
    assert not multi.train_dir(0).exists()  # training checkpoints removed once the chunk was saved
    a, recs_a = single.load()
    b, recs_b = multi.load()
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.shape[0] == 3
        np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-6)
    for ra, rb in zip(recs_a, recs_b, strict=True):
        assert without_accuracies(rb) == without_accuracies(ra)
        assert rb.clean_acc == pytest.approx(ra.clean_acc, abs=1e-6)
        assert (rb.asr is None) == (ra.asr is None) and (ra.asr is None or rb.asr == pytest.approx(ra.asr, abs=1e-6))
    # only process 0 reports (and writes the manifest)
    assert '"n_models": 3' in (tmp_path / "p0.out").read_text()
    assert "n_models" not in (tmp_path / "p1.out").read_text()


@pytest.mark.parametrize("args,message", [
    (("foo", 2, 0), "--coordinator must be HOST:PORT, got 'foo'"),
    (("localhost:1234", 2, 2), "--process-id must be in 0..1 for 2 processes, got 2"),
    (("localhost:1234", 0, 0), "--num-processes must be >= 1, got 0"),
    (("localhost:1234", "two", 0), "--num-processes must be an integer, got 'two'"),
    (("localhost:1234", 2, None), "--coordinator needs --num-processes N and --process-id I"),
    ((None, 2, 1), "--num-processes/--process-id need --coordinator HOST:PORT"),
])
def test_bad_process_arguments_are_one_clear_error(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_process_args(*args)


def test_process_arguments_parse_strings_from_the_environment():
    assert check_process_args("10.0.0.1:1234", "4", "3") == ("10.0.0.1:1234", 4, 3)
    assert check_process_args(None, None, None) is None
