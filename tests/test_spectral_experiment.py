"""experiments/spectral_cifar10.py's row cache on the digits: a finished row is reused only for the settings that
made it; other settings stop the run with an error naming them (its folder holds their trainings)."""
import json

import pytest

from bdjax.config import ExperimentConfig, apply_overrides
from bdjax.errors import ConfigError
from conftest import load_script



@pytest.fixture(scope="module")
def spectral():
    mod = load_script("experiments/spectral_cifar10.py")
    mod._OPTIONS.update(rows="pattern-5-0.2", layer=None, target_only=True, scale="small")
    return mod


def digits_config(*extra):
    return apply_overrides(ExperimentConfig(experiment="sp"), [
        "data.dataset=digits", "train.model=mnist_cnn", "train.model_options=width=4,hidden=16", "train.epochs=1",
        "train.batch_size=64", "train.checkpoint_every=0", *extra])


def test_rows_are_reused_only_for_the_settings_that_made_them(spectral, tmp_path, monkeypatch):
    out = tmp_path / "sp"
    first = spectral.run(digits_config(), out)
    row = out / "rows" / "pattern_5_0.2" / "row.json"
    stamp, config = row.stat().st_mtime_ns, (out / "config.json").read_text()
    assert spectral.run(digits_config(), out)["rows"] == first["rows"] and row.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"pattern_5_0.2 made with other settings \(train.epochs\); use another --out"):
        spectral.run(digits_config("train.epochs=2"), out)
    assert (out / "config.json").read_text() == config  # refused before anything was replaced
    monkeypatch.setitem(spectral._OPTIONS, "target_only", False)
    with pytest.raises(ConfigError, match=r"other settings \(target_only\)"):
        spectral.run(digits_config(), out)
    monkeypatch.setitem(spectral._OPTIONS, "target_only", True)
    # a row written before producers were recorded: its config.json and the run's vouch for it
    (row.parent / "producer.json").unlink()
    assert spectral.run(digits_config(), out)["rows"] == first["rows"] and row.stat().st_mtime_ns == stamp
    (row.parent / "producer.json").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(train.epochs\)"):
        spectral.run(digits_config("train.epochs=2"), out)
    assert json.loads((row.parent / "config.json").read_text())["train"]["epochs"] == 1
