"""Resumable pretraining for real: a MoCo run killed with SIGKILL mid-training and rerun ends with the parameters
(and queue) of an uninterrupted run. Three compilations and a subprocess (~1 min on 2 idle cores, 3 min on loaded
ones): opt-in with BDJAX_SLOW_TESTS=1; tests/test_ssl_methods.py checks the exact resume in process."""
import os
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
from ssl_tiny import TinyNet

from bdjax.config import TrainConfig
from bdjax.results import RunDir
from bdjax.ssl import moco
from bdjax.ssl.augment import AugmentConfig
from bdjax.ssl.pretraining import pretrain

CFG = moco.MocoConfig(dim=8, hidden=16, queue_size=16, momentum=0.9,
                      augment=AugmentConfig(jitter_p=0.0, blur_p=0.0))
TRAIN = TrainConfig(epochs=3, batch_size=8, lr=0.05, checkpoint_every=1)

SCRIPT = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_ssl_resume import CFG, TRAIN, images, TinyNet
from bdjax.results import RunDir
from bdjax.ssl.pretraining import pretrain

def die_at_epoch_2(model, state):
    if int(state.step) == 2 * 4:   # the evaluation of epoch 2 runs before its checkpoint: epoch 1's is the latest
        os.kill(os.getpid(), signal.SIGKILL)
    return {{}}

pretrain("moco", TinyNet(), TRAIN, images(), seed=0, method_cfg=CFG, run=RunDir({out!r}), eval_fn=die_at_epoch_2,
         use_mesh=False)
"""


def images():
    return np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BDJAX_SLOW_TESTS") != "1", reason="slow (set BDJAX_SLOW_TESTS=1)")
def test_kill_9_and_rerun_gives_the_uninterrupted_parameters(tmp_path):
    out = tmp_path / "run"
    tests = str(Path(__file__).parent)
    env = {**os.environ, "BDJAX_PROGRESS": "0", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, out=str(out))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    _, resumed = pretrain("moco", TinyNet(), TRAIN, images(), seed=0, method_cfg=CFG, run=RunDir(out), use_mesh=False)
    _, whole = pretrain("moco", TinyNet(), TRAIN, images(), seed=0, method_cfg=CFG, use_mesh=False)
    assert int(resumed.step) == 12
    chex.assert_trees_all_equal(resumed.params, whole.params)
    chex.assert_trees_all_equal(resumed.extra["queue"], whole.extra["queue"])
