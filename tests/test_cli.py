"""The command line: demo end to end, overrides, one-line errors, kill -9 and resume with identical results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bdjax.cli import demo_config
from bdjax.config import ExperimentConfig, apply_overrides, to_json as json_config
from bdjax.errors import ConfigError

ENV = {**os.environ, "BDJAX_PROGRESS": "0"}


def bdjax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bdjax", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def bdjax_in_process(capsys, *args) -> tuple[int, str]:
    """The CLI's exit code and stderr without a new interpreter: the config errors below are raised before any
    training, so the ~5 s of a fresh JAX import would be most of each case (the real entry point: the tests
    around, which spawn `python -m bdjax`)."""
    from bdjax import cli

    capsys.readouterr()
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_help_lists_subcommands():
    r = bdjax("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("demo", "badnets", "fields", "data"))


@pytest.mark.parametrize("override,message", [
    ("train.lrr=0.1", "unknown config field 'train.lrr'. Did you mean 'train.lr'?"),
    ("train.epochs=many", "train.epochs='many': expected a value of type int"),
    ("attack.poison_rate=1.5", "attack.poison_rate must be a fraction in (0, 1], got 1.5"),
    ("attack.target=12", "target label 12 is outside the 10 classes"),
    ("attack.trigger_size=9", "trigger of size 9x9 is larger than the 8x8 images"),
    ("data.dataset=/nonexistent/folder", "/nonexistent/folder"),
    ("attack.kind=none", "the demo's defenses need a backdoored model"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, override, message):
    code, err = bdjax_in_process(capsys, "demo", "--out", str(tmp_path / "run"), override, "train.epochs=1")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdjax: error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_override_parsing():
    cfg = apply_overrides(ExperimentConfig(), ["attack.sources=1,2", "data.n_train=none", "attack.clean_label=true"])
    assert cfg.attack.sources == (1, 2) and cfg.data.n_train is None and cfg.attack.clean_label is True
    with pytest.raises(ConfigError, match="not of the form field=value"):
        apply_overrides(cfg, ["train.lr"])


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = bdjax("demo", "--out", str(out), "--no-zoo", "train.epochs=15")  # the zoo half: the test below
    assert r.returncode == 0, r.stderr
    assert "neural_cleanse" in r.stdout  # the defenses' headline is printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("experiment", "dataset", "seed", "clean_acc", "asr", "wall_s", "device"):
        assert key in summary
    # measured 0.992 / 0.991 (README): a broken attack or training falls well below these
    assert summary["dataset"] == "digits" and summary["clean_acc"] > 0.95 and summary["asr"] > 0.9
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 15
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 8
    for png in ("trigger.png", "examples.png", "curves.png", "strip_entropy.png", "nc_triggers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = summary["defenses"]
    for name in ("spectral_signatures", "activation_clustering"):
        assert {"tpr", "fpr", "auc", "poison_removed", "poison_left", "clean_removed"} <= set(d[name])
        assert d[name]["poison_removed"] + d[name]["poison_left"] == summary["n_poison"]
    assert {"frr", "far", "auc", "threshold"} <= set(d["strip"])
    assert len(d["neural_cleanse"]["norms"]) == len(d["neural_cleanse"]["anomaly_index"]) == 10
    # A 15-epoch model is backdoored (asr > 0.8 above): the defenses must see it.
    assert d["activation_clustering"]["tpr"] > 0.5 and d["strip"]["auc"] > 0.8
    assert d["neural_cleanse"]["flagged_labels"] == [0]


def test_demo_zoo_section(tmp_path):
    """The demo's zoo + ULP half, with a tiny zoo (the pipeline itself: tests/test_ulp_pipeline.py): the section
    reports the pipeline's own rows and the AUC of its largest M."""
    from bdjax import cli
    from bdjax.pipelines import ulp

    tiny = apply_overrides(ulp.demo_ulp_config(), [
        "zoo.n_clean=4", "zoo.n_poisoned=4", "zoo.chunk_size=4", "test_zoo.n_clean=2", "test_zoo.n_poisoned=2",
        "train.epochs=2", "ulp.epochs=3", "ulp.batch_models=4", "zoo.min_asr=0"])
    section = cli._demo_zoo(str(tmp_path), tiny)
    summary = json.loads((tmp_path / "zoo_ulp" / "summary.json").read_text())
    assert [(r["method"], r["M"]) for r in section["rows"]] == [("ULP", 1), ("noise", 1), ("ULP", 5), ("noise", 5)]
    assert section["rows"] == summary["rows"] and section["M"] == 5
    assert section["auc"] == next(r["auc"] for r in summary["rows"] if r["method"] == "ULP" and r["M"] == 5)
    assert section["zoo_train_models"] == 8 and section["zoo_test_models"] == 4
    assert (tmp_path / "zoo_ulp" / "roc.png").exists()
    noise5 = next(r["auc"] for r in summary["rows"] if r["method"] == "noise" and r["M"] == 5)
    assert cli.ulp_headline(section) == (f"ULP (M = 5) test AUC {section['auc']:.3f} on 4 held-out models with unseen "
                                         f"triggers; noise inputs {noise5:.3f}")


def test_fields_lists_every_section_with_type_default_and_doc():
    r = bdjax("fields")
    assert r.returncode == 0, r.stderr
    sections, current = {}, None
    for line in r.stdout.splitlines():
        if line.startswith("# bdjax "):
            current = sections.setdefault(line.removeprefix("# bdjax "), {})
        elif line.strip():
            current[line.split()[0]] = line
    assert list(sections) == ["badnets", "defend", "zoo", "ulp", "demo"]
    want = {("badnets", "attack.poison_rate"): ("float", "0.01", "fraction of the training set poisoned"),
            ("defend", "defend.nc.max_checks"): ("int", "1000", "official STEPS"),
            ("defend", "defend.strip.n_overlay"): ("int", "100", "superimposed on each input"),
            ("defend", "defend.spectral.eps"): ("float | None", "None", "assumed poison budget"),
            ("defend", "defend.ac.size_threshold"): ("float", "0.35", "largest relative size"),
            ("zoo", "zoo.val_fraction"): ("float", "0.0", "held out"),
            ("ulp", "ulp.pattern_lr"): ("float", "0.015", "SGD on the patterns"),
            ("ulp", "baselines.nc.max_checks"): ("int", "1000", "official STEPS"),
            ("demo", "defend.nc.max_checks"): ("int", "80", "official STEPS"),
            ("demo", "zoo_ulp.zoo.n_clean"): ("int", "96", "clean models"),
            ("demo", "zoo_ulp.data.classes"): ("tuple[int, ...]", "(0, 1, 2)", "relabelled 0..k-1")}
    for (command, name), parts in want.items():
        line = sections[command].get(name, "")
        assert all(p in line for p in parts), (command, name, line)
    zoo = bdjax("fields", "zoo")
    assert "zoo.min_asr" in zoo.stdout and "defend." not in zoo.stdout and "#" not in zoo.stdout.split()[0]
    assert bdjax("fields", "nope").returncode == 2


def test_every_field_of_every_command_is_documented():
    from bdjax import cli
    from bdjax.config import describe

    for command in cli.CONFIG_COMMANDS:
        undocumented = [name for name, _, _, doc in describe(cli._default_config(command)) if not doc]
        assert undocumented == [], (command, undocumented)


def test_every_command_takes_its_sections_and_names_the_close_field(tmp_path, capsys):
    for command, override, close in [("demo", "defend.strip.n_overlay=x", None), ("defend", "defend.nc.max_check=3", "defend.nc.max_checks"),
                                      ("ulp", "ulp.patern_lr=1", "ulp.pattern_lr"), ("zoo", "zoo.val_fractio=0.1", "zoo.val_fraction"),
                                      ("demo", "zoo_ulp.zoo.n_clen=3", "zoo_ulp.zoo.n_clean")]:
        code, err = bdjax_in_process(capsys, command, "--out", str(tmp_path / command), override)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        if close is None:
            assert "defend.strip.n_overlay='x': expected a value of type int" in err
        else:
            assert f"Did you mean {close!r}?" in err


def test_defend_overrides_reach_the_defenses(tmp_path):
    out = tmp_path / "d"
    r = bdjax("defend", "--out", str(out), "seed=3", "train.epochs=2", "train.batch_size=64", "attack.poison_rate=0.03",
              "defend.strip.n_overlay=7", "defend.strip_inputs=20", "defend.spectral.eps=0.2",
              "defend.nc.max_checks=2", "defend.nc.steps_per_check=1", "defend.nc.early_stop=false",
              "defend.ac.size_threshold=0.05")
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "summary.json").read_text())["defenses"]
    assert d["strip"]["n_overlay"] == 7 and d["strip"]["n_clean"] == 20
    assert d["spectral_signatures"]["eps"] == 0.2
    assert d["neural_cleanse"]["steps"] == 2
    assert d["activation_clustering"]["flagged_labels"] == []  # no cluster is as small as 5% of a class
    saved = json.loads((out / "defend_config.json").read_text())
    assert saved["seed"] == 3 and saved["nc"]["seed"] == 3 and saved["strip"]["n_overlay"] == 7
    assert "defend" not in json.loads((out / "config.json").read_text())  # the attack's config: it resumes alone


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    from bdjax import cli

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_cmd_data", boom)
    assert cli.main(["data", "digits"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bdjax: error: RuntimeError: boom (rerun with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["data", "digits", "--debug"])
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "data", "digits"])


def test_other_config_in_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    assert bdjax("demo", "--out", str(out), "--no-defenses", "train.epochs=1").returncode == 0
    r = bdjax("demo", "--out", str(out), "--no-defenses", "train.epochs=2")
    assert r.returncode == 2 and "different config" in r.stderr


def final_params(run: Path) -> dict:
    ckpts = run / "checkpoints"
    last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    return ocp.StandardCheckpointer().restore((ckpts / str(last) / "default").absolute())


def test_sigkill_and_resume_gives_identical_parameters(tmp_path):
    args = ["--no-defenses", "train.epochs=40", "train.checkpoint_every=2"]
    ref = tmp_path / "ref"
    assert bdjax("demo", "--out", str(ref), *args).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bdjax", "demo", "--out", str(run), *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # wait for the second checkpoint, then kill -9
        done = [p for p in (run / "checkpoints").glob("*") if p.name.isdigit()] if (run / "checkpoints").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()

    r = bdjax("demo", "--out", str(run), *args)
    assert r.returncode == 0, r.stderr
    a, b = final_params(ref), final_params(run)
    flat_a, flat_b = map(lambda t: __import__("jax").tree.leaves(t), (a, b))
    assert len(flat_a) == len(flat_b) > 0
    for u, v in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records after the checkpoint were dropped, not duplicated
    ref_summary = json.loads((ref / "summary.json").read_text())
    run_summary = json.loads((run / "summary.json").read_text())
    assert ref_summary["clean_acc"] == run_summary["clean_acc"] and ref_summary["asr"] == run_summary["asr"]


def test_demo_config_is_the_documented_one():
    cfg = demo_config()
    assert cfg.data.dataset == "digits" and cfg.attack.poison_rate == 0.03 and cfg.attack.trigger_size == 3


def test_a_run_saved_before_a_new_field_existed_still_resumes(tmp_path):
    from bdjax.pipelines.badnets import _check_resumable
    from bdjax.results import RunDir

    cfg = demo_config()
    run = RunDir(tmp_path)
    old = json.loads(json_config(cfg))
    del old["train"]["model_options"]  # written by a bdjax without that field
    run.write_config(old)
    run.checkpoints.mkdir()
    _check_resumable(run, cfg)  # same settings: resumes
    with pytest.raises(ConfigError, match="different config"):
        _check_resumable(run, apply_overrides(cfg, ["train.model_options=width=8"]))
