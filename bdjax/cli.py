"""The `bdjax` command line (also `python -m bdjax`).

    bdjax demo --out runs/demo                       offline BadNets + 4 defenses + a zoo and ULP on the embedded digits
    bdjax badnets --out runs/x data.dataset=mnist train.model=mnist_cnn attack.poison_rate=0.01
    bdjax zoo --out runs/zoo zoo.n_clean=8           a zoo of clean and poisoned models; multi-process: one command
        --coordinator HOST:PORT --num-processes N --process-id I      per process, I = 0..N-1
    bdjax fields                                     every config field with its default
    bdjax data cifar10                               what a dataset looks like once loaded

Any config field can be overridden as `section.field=value`; a misspelled field is an error listing the valid ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from bdjax.config import ExperimentConfig, apply_overrides, field_names, to_dict
from bdjax.errors import BdjaxError, ConfigError

OVERRIDES_HELP = "config overrides as section.field=value (see `bdjax fields`), e.g. train.epochs=5 attack.target=3"


def demo_config() -> ExperimentConfig:
    """BadNets on the scikit-learn digits (8x8): a 3x3 white patch, all-to-one target 0, 3% poisoned (43 images,
    a quarter of the target class: inside the budgets the four defenses were designed for)."""
    cfg = ExperimentConfig(experiment="demo")
    return apply_overrides(cfg, [
        "data.dataset=digits", "train.model=mnist_cnn", "train.epochs=30", "train.batch_size=64",
        "train.lr=0.05", "train.schedule=cosine", "attack.trigger=patch", "attack.trigger_size=3",
        "attack.target=0", "attack.poison_rate=0.03",
    ])


def demo_defense_settings(seed: int):
    """The official defense settings, except a shorter Neural Cleanse budget (5 Adam steps per check-point, at
    most 80 check-points instead of 31 and 1000) so the demo stays within its 3 minutes."""
    from bdjax.defenses.neural_cleanse import NCConfig
    from bdjax.pipelines.defend import DefenseSettings

    return DefenseSettings(nc=NCConfig(steps_per_check=5, max_checks=80, seed=seed), seed=seed)


def _print_summary(summary: dict) -> None:
    keys = ("experiment", "dataset", "model", "clean_acc", "asr", "n_poison", "wall_s", "device")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))


def _run_badnets(cfg: ExperimentConfig, out: str) -> dict:
    from bdjax.pipelines import badnets  # imported late: `bdjax fields` should not pay for jax/flax start-up

    result = badnets.run(cfg, out)
    _print_summary(result.summary)
    print(f"results in {out}/ (summary.json, metrics.jsonl, config.json, *.png)")
    return result.summary


def _cmd_demo(args) -> None:
    cfg = apply_overrides(demo_config(), args.overrides)
    if cfg.attack.kind == "none" and not args.no_defenses:
        raise ConfigError("the demo's defenses need a backdoored model: drop attack.kind=none or add --no-defenses")
    if args.no_defenses:
        _run_badnets(cfg, args.out)
        return
    from bdjax.pipelines import badnets, defend
    from bdjax.results import RunDir

    t0 = time.time()
    result = badnets.run(cfg, args.out)
    sections = defend.run_defenses(result, RunDir(args.out), demo_defense_settings(cfg.seed))
    if not args.no_zoo:
        sections["ulp"] = _demo_zoo(args.out, cfg.seed)
    summary = RunDir(args.out).write_summary({**result.summary, "defenses": sections, "wall_s": time.time() - t0})
    _print_summary(summary)
    print(json.dumps(defend.headline(sections), indent=2))
    print(f"results in {args.out}/ (summary.json, metrics.jsonl, config.json, *.png)")


def _demo_zoo(out: str, seed: int) -> dict:
    """The model-level half of the demo: a small digits zoo and ULP vs noise inputs, as one summary section."""
    from pathlib import Path

    from bdjax.pipelines import ulp

    s = ulp.run_ulp_experiment(ulp.demo_ulp_config(seed), Path(out) / "zoo_ulp")
    return {"auc": s["auc"], "M": s["M"], "rows": s["rows"], "zoo_train_models": s["zoo_train"]["n_models"],
            "zoo_test_models": s["zoo_test"]["n_models"], "wall_s": s["wall_s"]}


def _cmd_badnets(args) -> None:
    _run_badnets(apply_overrides(ExperimentConfig(), args.overrides), args.out)


def _cmd_zoo(args) -> None:
    from bdjax import distributed
    from bdjax.zoo import ZooConfig, train_zoo  # importing touches no device

    cfg = apply_overrides(ZooConfig(), args.overrides).validate()  # a bad override fails before connecting
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before any device is used
    store = train_zoo(cfg, args.out)
    if distributed.is_primary():
        recs = store.records
        asr = [r.asr for r in recs if r.asr is not None]
        print(json.dumps({"n_models": len(recs), "kept": sum(bool(r.kept) for r in recs),
                          "clean_acc_mean": sum(r.clean_acc for r in recs) / len(recs),
                          "asr_mean": sum(asr) / len(asr) if asr else None}, indent=2))
        print(f"zoo in {args.out}/ (manifest.json, chunks/)")


def _cmd_fields(args) -> None:
    cfg = ExperimentConfig()
    flat = {}
    for name in field_names(cfg):
        value = to_dict(cfg)
        for part in name.split("."):
            value = value[part]
        flat[name] = value
    width = max(map(len, flat))
    for name, value in flat.items():
        print(f"{name:<{width}}  {value!r}")


def _cmd_data(args) -> None:
    from bdjax.data import load_dataset

    ds = load_dataset(args.name, data_root=args.data_root)
    print(json.dumps({"name": ds.name, "train": list(ds.x_train.shape), "test": list(ds.x_test.shape),
                      "classes": list(ds.class_names)}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdjax", description="Backdoor attacks and defenses in JAX.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline BadNets demo on the embedded digits, then all four defenses")
    p.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    p.add_argument("--no-defenses", action="store_true", help="stop after the attack")
    p.add_argument("--no-zoo", action="store_true", help="skip the zoo of models and ULP")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("badnets", help="train a BadNets-poisoned (or clean: attack.kind=none) classifier")
    p.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_badnets)

    p = sub.add_parser("zoo", help="train (or resume) a zoo of clean and poisoned models, optionally multi-process")
    p.add_argument("--out", required=True, help="zoo folder (created; rerun the same command to resume)")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="HOST:PORT of process 0, for a multi-process run (default $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", default=os.environ.get("JAX_NUM_PROCESSES"),
                   help="processes in the run (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", default=os.environ.get("JAX_PROCESS_ID"),
                   help="this process, 0..N-1 (default $JAX_PROCESS_ID)")
    p.add_argument("overrides", nargs="*", help="config overrides as section.field=value, e.g. zoo.n_clean=4 "
                                                "train.epochs=2 train.model_options=width=8,hidden=32")
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("fields", help="list every config field and its default")
    p.set_defaults(func=_cmd_fields)

    p = sub.add_parser("data", help="load a dataset (local folder, .npz, digits or TFDS name) and describe it")
    p.add_argument("name")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=_cmd_data)
    return parser


def guarded(fn: Callable[[], None]) -> int:
    """Run fn; user mistakes become one line on stderr and exit status 2, not a traceback."""
    try:
        fn()
    except BdjaxError as e:
        print(f"bdjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdjax: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args))


def experiment_main(get_config: Callable[[str], ExperimentConfig], runner: Callable | None = None,
                    argv: list[str] | None = None, description: str | None = None) -> int:
    """Shared entry point of experiments/*.py: `--out DIR --scale small|full [overrides...]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    parser.add_argument("--scale", choices=("small", "full"), default="small",
                        help="small: fits 2 CPU cores in ~20 min; full: the paper's setting, for a GPU")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = parser.parse_args(argv)

    def go():
        cfg = apply_overrides(get_config(args.scale), args.overrides)
        (runner or _run_badnets)(cfg, args.out)

    return guarded(go)
