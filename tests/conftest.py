"""Shared test helpers. Real-data tests skip when the datasets are absent, but fail on CI (CI=true)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One compilation per distinct computation for the whole run: many tests, and the CLI and experiment processes they
# spawn, compile the same train steps again. JAX's persistent compilation cache shares them across tests, xdist
# workers (they inherit this environment from the controller) and subprocesses. A fresh folder per run, removed at
# exit, so nothing accumulates; a user's own JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="bdjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
import jax  # noqa: E402  (read the variables above even if a plugin imported JAX first)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

from bdjax.data import default_data_root  # noqa: E402
from bdjax.errors import DataError  # noqa: E402


def load_script(relative: str):
    """A module from one of the repository's script folders (experiments/, scripts/ are scripts, not packages),
    e.g. load_script("experiments/htba_cifar10.py")."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_data_root(name: str | None = None) -> Path:
    """The local data root (and <root>/<name> exists); skip if missing, or fail when CI=true."""
    try:
        root = default_data_root()
        why = "no data root (set BDJAX_DATA_ROOT or provide ../shared/datasets)"
    except DataError as e:
        root, why = None, str(e)
    if root is not None and name is not None and not any((root / n).exists() for n in (name, f"{name}.npz")):
        root, why = None, f"dataset {name!r} not found under {root}"
    if root is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data required on CI: {why}")
        pytest.skip(f"real data unavailable: {why}")
    return root


@pytest.fixture
def data_root() -> Path:
    return require_data_root()


# ------------------------------------------------------------------------------------------ a detectable ULP zoo

# A ULP run whose backdoors a detector must find on HELD-OUT models (a test zoo with the unseen test triggers):
# tiny digits CNNs on the digits 0 and 1 only. With two classes a poisoned model's target is fixed by its source,
# so litmus patterns started from stamped 0s and 1s separate clean from poisoned models with a linear h on these
# few models (measured: test AUC 0.94-1.0 over 6 zoo seeds at M = 2). On the 10 digits a zoo this small stays
# near chance (the demo's 0.60: a linear h over random targets needs hundreds of models).
DETECT = ["zoo.trigger_dir=random", "zoo.trigger_size=3", "zoo.n_clean=12", "zoo.n_poisoned=12", "zoo.chunk_size=24",
          "zoo.mode=vmap", "zoo.min_clean_acc=0.8", "zoo.min_asr=0.8", "zoo.val_fraction=0.1", "test_zoo.n_clean=8",
          "test_zoo.n_poisoned=8", "train.model_options=width=4,hidden=16", "train.epochs=8", "train.lr=0.01",
          "patterns=1,2", "ulp.epochs=30", "ulp.batch_models=24", "ulp.features=log_softmax", "ulp.init=stamped",
          "ulp.pattern_lr=0.1", "baselines.nc_models=2", "baselines.nc_images=64", "baselines.nc.batch_size=16",
          "baselines.nc.steps_per_check=2", "baselines.nc.max_checks=3"]


def digits01(path: Path) -> Path:
    """The embedded digits 0 and 1 as an .npz dataset."""
    import numpy as np

    from bdjax.data import load_dataset

    ds = load_dataset("digits")
    tr, te = ds.y_train < 2, ds.y_test < 2
    np.savez(path, x_train=ds.x_train[tr], y_train=ds.y_train[tr], x_test=ds.x_test[te], y_test=ds.y_test[te],
             class_names=np.array(["0", "1"]))
    return path


def detect_config(data: Path, *extra):
    from bdjax.config import apply_overrides
    from bdjax.pipelines.ulp import ULPExperimentConfig

    return apply_overrides(ULPExperimentConfig(experiment="ulp_detect", scale="test"),
                           [f"data.dataset={data}", *DETECT, *extra])


@pytest.fixture(scope="session")
def ulp_run(tmp_path_factory):
    """(run folder, summary, config) of the pipeline on the detectable zoo; trained once per test session (the
    ULP unit tests read its zoos). Tests that rerun it with other settings work on a copy."""
    from bdjax.pipelines.ulp import run_ulp_experiment

    root = tmp_path_factory.mktemp("ulp_detect")
    cfg = detect_config(digits01(root / "digits01.npz"))
    return root / "run", run_ulp_experiment(cfg, root / "run"), cfg
