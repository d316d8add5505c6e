"""The `bdjax` command line (also `python -m bdjax`).

    bdjax demo --out runs/demo                       offline BadNets + 4 defenses + a zoo and ULP on the embedded digits
    bdjax badnets --out runs/x data.dataset=mnist train.model=mnist_cnn attack.poison_rate=0.01
    bdjax defend --out runs/d defend.nc.max_checks=50   a BadNets run and the four defenses on it
    bdjax zoo --out runs/zoo zoo.n_clean=8           a zoo of clean and poisoned models; multi-process: one command
        --coordinator HOST:PORT --num-processes N --process-id I      per process, I = 0..N-1
    bdjax ulp --out runs/u zoo.n_clean=50            train and test zoos, Universal Litmus Patterns and baselines
    bdjax fields [badnets|defend|zoo|ulp|demo]       each command's config fields: type, default, what it does
    bdjax data cifar10                               what a dataset looks like once loaded

Every setting of a command is a config field, overridden as `section.field=value`; a misspelled field is an error
naming the closest one. `bdjax --debug COMMAND ...` shows the traceback of an unexpected error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from bdjax.config import ExperimentConfig, apply_overrides, describe, to_dict
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


def demo_defense_settings(seed: int = 0):
    """The official defense settings, except a shorter Neural Cleanse budget (5 Adam steps per check-point, at
    most 80 check-points instead of 31 and 1000) so the demo stays within its 3 minutes."""
    from bdjax.defenses.neural_cleanse import NCConfig
    from bdjax.pipelines.defend import DefenseSettings

    return DefenseSettings(nc=NCConfig(steps_per_check=5, max_checks=80, seed=seed), seed=seed)


def demo_full_config():
    """`bdjax demo`'s whole config: demo_config's attack, demo_defense_settings, the ULP demo zoo."""
    import dataclasses

    from bdjax.pipelines.demo import DemoConfig
    from bdjax.pipelines.ulp import demo_ulp_config

    attack = demo_config()
    return DemoConfig(**{f.name: getattr(attack, f.name) for f in dataclasses.fields(ExperimentConfig)},
                      defend=demo_defense_settings(), zoo_ulp=demo_ulp_config())


def _default_config(command: str):
    """The config a command starts from, before its overrides."""
    if command == "badnets":
        return ExperimentConfig()
    if command == "defend":
        from bdjax.pipelines.defend import DefendConfig
        return DefendConfig()
    if command == "zoo":
        from bdjax.zoo import ZooConfig
        return ZooConfig()
    if command == "ulp":
        from bdjax.pipelines.ulp import ULPExperimentConfig
        return ULPExperimentConfig()
    if command == "demo":
        return demo_full_config()
    raise ConfigError(f"no command {command!r}; commands with a config: {', '.join(CONFIG_COMMANDS)}")


CONFIG_COMMANDS = ("badnets", "defend", "zoo", "ulp", "demo")


def _print_summary(summary: dict) -> None:
    keys = ("experiment", "dataset", "model", "clean_acc", "asr", "n_poison", "wall_s", "device")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))


def _run_badnets(cfg: ExperimentConfig, out: str) -> dict:
    from bdjax.pipelines import badnets  # imported late: `bdjax fields badnets` should not pay for jax/flax start-up

    result = badnets.run(cfg, out)
    _print_summary(result.summary)
    print(f"results in {out}/ (summary.json, metrics.jsonl, config.json, *.png)")
    return result.summary


def _attack_and_defend(cfg, out: str, extra: Callable[[], dict] | None = None) -> dict:
    """BadNets run of cfg (a DefendConfig), the four defenses on it, `extra` sections; summary with `defenses`."""
    from bdjax.pipelines import badnets, defend
    from bdjax.results import RunDir, write_json

    t0 = time.time()
    result = badnets.run(cfg.attack_config(), out)
    settings = cfg.settings()
    write_json(RunDir(out).path / "defend_config.json", to_dict(settings))  # config.json is the attack's (resume)
    sections = defend.run_defenses(result, RunDir(out), settings)
    if extra is not None:
        sections.update(extra())
    summary = RunDir(out).write_summary({**result.summary, "defenses": sections, "wall_s": time.time() - t0})
    _print_summary(summary)
    print(json.dumps(defend.headline(sections), indent=2))
    print(f"results in {out}/ (summary.json, metrics.jsonl, config.json, defend_config.json, *.png)")
    return summary


def _cmd_demo(args) -> None:
    cfg = apply_overrides(_default_config("demo"), args.overrides)
    if cfg.attack.kind == "none" and not args.no_defenses:
        raise ConfigError("the demo's defenses need a backdoored model: drop attack.kind=none or add --no-defenses")
    cfg.validate()  # every section, before any training
    if args.no_defenses:
        _run_badnets(cfg.attack_config(), args.out)
        return
    extra = None if args.no_zoo else (lambda: {"ulp": _demo_zoo(args.out, cfg.ulp_config())})
    summary = _attack_and_defend(cfg, args.out, extra)
    if not args.no_zoo:
        print(ulp_headline(summary["defenses"]["ulp"]))


def ulp_headline(section: dict) -> str:
    """The demo's last line: ULP against noise inputs at the largest M, on the held-out test zoo."""
    auc = {(r["method"], r["M"]): r["auc"] for r in section["rows"]}
    m = section["M"]
    return (f"ULP (M = {m}) test AUC {auc[('ULP', m)]:.3f} on {section['zoo_test_models']} held-out models with "
            f"unseen triggers; noise inputs {auc[('noise', m)]:.3f}")


def _demo_zoo(out: str, cfg) -> dict:
    """The model-level half of the demo: a small digits zoo and ULP vs noise inputs, as one summary section."""
    from pathlib import Path

    from bdjax.pipelines import ulp

    s = ulp.run_ulp_experiment(cfg, Path(out) / "zoo_ulp")
    return {"auc": s["auc"], "M": s["M"], "rows": s["rows"], "zoo_train_models": s["zoo_train"]["n_models"],
            "zoo_test_models": s["zoo_test"]["n_models"], "wall_s": s["wall_s"]}


def _cmd_badnets(args) -> None:
    _run_badnets(apply_overrides(_default_config("badnets"), args.overrides), args.out)


def _cmd_defend(args) -> None:
    cfg = apply_overrides(_default_config("defend"), args.overrides)
    if cfg.attack.kind == "none":
        raise ConfigError("the defenses need a backdoored model: drop attack.kind=none")
    _attack_and_defend(cfg.validate(), args.out)


def _cmd_ulp(args) -> None:
    from bdjax.pipelines.ulp import run_ulp_experiment

    run_ulp_experiment(apply_overrides(_default_config("ulp"), args.overrides), args.out)


def _cmd_zoo(args) -> None:
    from bdjax import distributed
    from bdjax.zoo import train_zoo  # importing touches no device

    cfg = apply_overrides(_default_config("zoo"), args.overrides).validate()  # a bad override fails before connecting
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before any device is used
    store = train_zoo(cfg, args.out)
    if distributed.is_primary():
        recs = store.records
        asr = [r.asr for r in recs if r.asr is not None]
        val = [r.val_acc for r in recs if r.val_acc is not None]
        print(json.dumps({"n_models": len(recs), "kept": sum(bool(r.kept) for r in recs),
                          "clean_acc_mean": sum(r.clean_acc for r in recs) / len(recs),
                          "val_acc_mean": sum(val) / len(val) if val else None,
                          "asr_mean": sum(asr) / len(asr) if asr else None}, indent=2))
        print(f"zoo in {args.out}/ (manifest.json, chunks/)")


def fields_table(cfg) -> list[str]:
    """One line per overridable field: name, type, default, doc."""
    rows = [(name, typ, repr(value), doc) for name, typ, value, doc in describe(cfg)]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{n:<{w[0]}}  {t:<{w[1]}}  {v:<{w[2]}}  {d}".rstrip() for n, t, v, d in rows]


def _cmd_fields(args) -> None:
    commands = [args.name] if args.name else list(CONFIG_COMMANDS)
    for i, command in enumerate(commands):
        if len(commands) > 1:
            print(("\n" if i else "") + f"# bdjax {command}")
        print("\n".join(fields_table(_default_config(command))))


def _cmd_data(args) -> None:
    from bdjax.data import load_dataset

    ds = load_dataset(args.name, data_root=args.data_root)
    print(json.dumps({"name": ds.name, "train": list(ds.x_train.shape), "test": list(ds.x_test.shape),
                      "classes": list(ds.class_names)}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdjax", description="Backdoor attacks and defenses in JAX.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
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

    p = sub.add_parser("defend", help="train (or resume) a BadNets model and run the four defenses on it")
    p.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; defenses: defend.nc.max_checks=50 ...")
    p.set_defaults(func=_cmd_defend)

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

    p = sub.add_parser("ulp", help="zoos, Universal Litmus Patterns, noise-input and Neural Cleanse baselines")
    p.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_ulp)

    p = sub.add_parser("fields", help="list a command's config fields: name, type, default, what it does")
    p.add_argument("name", nargs="?", choices=CONFIG_COMMANDS, help="the command (default: all of them)")
    p.set_defaults(func=_cmd_fields)

    p = sub.add_parser("data", help="load a dataset (local folder, .npz, digits or TFDS name) and describe it")
    p.add_argument("name")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=_cmd_data)
    return parser


DEBUG_FLAG = "--debug"


def guarded(fn: Callable[[], None], debug: bool = False) -> int:
    """Run fn; user mistakes become one line on stderr and exit status 2, not a traceback. Any other exception
    becomes one line too (exit status 1), naming its type, unless `debug` (then it propagates)."""
    try:
        fn()
    except BdjaxError as e:
        print(f"bdjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdjax: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last resort; --debug shows the traceback
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"bdjax: error: {type(e).__name__}: {first} (rerun with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 1
    return 0


def _split_debug(argv: list[str] | None) -> tuple[list[str], bool]:
    """--debug anywhere on the line (the overrides are positional, so argparse would refuse it after them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug(argv)
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args), debug)


def experiment_main(get_config: Callable[[str], ExperimentConfig], runner: Callable | None = None,
                    argv: list[str] | None = None, description: str | None = None) -> int:
    """Shared entry point of experiments/*.py: `--out DIR --scale small|full [--debug] [overrides...]`."""
    argv, debug = _split_debug(argv)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    parser.add_argument("--scale", choices=("small", "full"), default="small",
                        help="small: fits 2 CPU cores in ~20 min; full: the paper's setting, for a GPU")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = parser.parse_args(argv)

    def go():
        cfg = apply_overrides(get_config(args.scale), args.overrides)
        (runner or _run_badnets)(cfg, args.out)

    return guarded(go, debug)
