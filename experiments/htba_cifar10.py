"""Hidden Trigger Backdoor Attacks on CIFAR-10 (seeds/001's setting and table): random (source, target) pairs, an
8x8 trigger on 32x32 images, 800 poisons (eps 16/255) with 3000 clean images, a binary classifier per pair whose
last layer (fc8) is finetuned on the clean images (clean model) or on the clean images plus the poisons labelled
with their true class, the target (poisoned model).

    python experiments/htba_cifar10.py --out runs/htba_cifar10 --scale small            # 3 pairs, 2 CPU cores
    python experiments/htba_cifar10.py --out runs/htba_tiny --scale tiny                 # smoke run, minutes
    python experiments/htba_cifar10.py --out runs/htba_full --scale full --weights alexnet.safetensors  # a GPU
    python experiments/htba_cifar10.py --out runs/htba_multi --scale small --multi-source  # every class -> target

Metrics (bdjax.attacks.htba.evaluate_attack, on the CIFAR-10 test set): val_clean = accuracy on the clean test
images of the pair's two classes; val_patched_source = accuracy on the source test images with the trigger pasted
at a random place (lower = stronger attack); asr = the fraction of those classified as the target.

Feature network: no download is possible, so the feature net is pretrained here with bdjax's `fit` on classes
disjoint from the attacked ones, with orbax checkpoints in the run folder (a rerun reuses them); --weights FILE takes
a user AlexNet instead (load_alexnet, full scale). The pipeline pretrains per pair on the 8 other classes by default
(HTBASetting.holdout=None). small (2 CPU cores): ONE feature net for all pairs, pretrained on the 6 classes outside
HOLDOUT (2500 images each, 12 epochs, crop+flip), the pairs drawn inside HOLDOUT, so no pair was seen in
pretraining; the net is cifar_cnn at widths 32-64-128 (bdjax's CPU-sized CIFAR net; its pooled 128-d `penultimate`
plays AlexNet's fc7 and its `fc` head fc8). The narrowed torchvision-layout AlexNet did not train at 32x32 in a few
epochs (loss stayed at ln 8 with SGD 0.05 and Adam 1e-3: its stride-4 11x11 conv1 leaves a 7x7 map), and crafting
costs one forward/backward per poison per iteration, so the cheaper net was chosen.
small crafting: 800 poisons in 2 batches of K = 400 re-matched together, 450 iterations at lr 0.01 (no early
stop), eps 16/255; finetuning the head 30 epochs (SGD 0.05, momentum 0.9, batch 128) on 3000 clean images (+ the
800 poisons; only the head moves and nothing augments, so it trains on the frozen features computed once).
full: seeds/001's ImageNet setting as a preset (224x224, 30x30 trigger, AlexNet fc7, 400 poisons, the official
crafting and finetuning recipes); CIFAR images would need resizing to 224, and the weights come from --weights.

Multi-source (`--scale small --multi-source`: the targets of the 3 pairs, 8 and 0, every other class a source; a
10-way head on 1500 clean images per class + 800 poisons; 17.9 min with the feature net cached): clean / poisoned
model val_clean 0.678 +- 0.001 / 0.668 +- 0.000, val_patched_source 0.588 +- 0.019 / 0.514 +- 0.035, asr
0.067 +- 0.025 / 0.230 +- 0.053 (0.178, 0.283 per target; seeds/001's ImageNet multi-source: 30.7%).

Measured (`--scale small`, seed 0, 2 idle CPU cores, from scratch: 28.1 min, of which pretraining 6.3 min):
pairs 5->8, 3->0, 8->0; clean / poisoned model: val_clean 0.882 +- 0.065 / 0.845 +- 0.067, val_patched_source
0.811 +- 0.037 / 0.346 +- 0.039 (0.401, 0.317, 0.320 per pair), asr 0.189 / 0.654 (seeds/001: 0.993 / 0.182).
How the preset got there (same pairs): widths 16-32-64 on 1000 images per class with K = 100 x 150 iterations gave
0.458 +- 0.114 (val_clean 0.853 / 0.812); widths 32-64-128 with K = 100 x 150: 0.419 +- 0.061 (0.500, 0.405,
0.352). With K = 100 the poisons collapse onto the centre of the patched-source cloud (each sees only 100 fresh
draws per iteration: their squared feature distance to the nearest patched source, 2.8, is below that
between patched sources, 4.1); a larger K and more iterations lowered val_patched_source (the probes in
setting_for's comment). The clean model's val_patched_source (0.81, not ~1) is bounded by the small net's
accuracy on the pair, and so is val_clean.

Output: OUT/config.json, OUT/summary.json (`rows`: one per pair and model, `mean` / `std` per model), OUT/table.md,
OUT/poisons.png (the first pair's targets, poisons, differences), OUT/pairs/<s>_<t>/ per pair (resumable).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bdjax import runtime
from bdjax.cli import guarded
from bdjax.config import TrainConfig
from bdjax.errors import ConfigError

METRICS = ("val_clean", "val_patched_source", "asr")
HOLDOUT = (0, 3, 5, 8)  # airplane, cat, dog, ship: the small preset's pair classes


def setting_for(scale: str):
    from bdjax.pipelines.htba import HTBASetting

    if scale == "small":
        # one feature net for every pair (2 CPU cores): pretrained on the 6 classes outside HOLDOUT, pairs drawn
        # inside it, so no pair was seen in pretraining
        # widths 32-64-128 on 2500 images per class with crop+flip (16-32-64 on 1000 left val_clean at 0.85).
        # K = 400 poisons re-matched together, 450 iterations: on pair 5->8, a logistic-regression head on the
        # features gave val_patched_source 0.549 for K 100 x 150 iterations, 0.523 for K 400 x 150, 0.508 for
        # K 800 x 150, 0.462 for K 100 x 450, 0.460 for K 400 x 300; the full run's numbers are in the docstring
        return HTBASetting(holdout=HOLDOUT, model_options=("widths=[32,64,128]",),
                           pretrain=TrainConfig(model="cifar_cnn", epochs=12, batch_size=128, lr=0.05,
                                                augment="crop_flip"),
                           pretrain_per_class=2500, poisons_per_batch=400, max_iters=450), 3
    if scale == "tiny":  # a smoke run of every stage: minutes, numbers not meaningful
        return HTBASetting(holdout=HOLDOUT,
                           pretrain=TrainConfig(model="cifar_cnn", epochs=1, batch_size=128, lr=0.05),
                           pretrain_per_class=200, n_poisons=40, poisons_per_batch=20, n_clean_per_class=100,
                           max_iters=20, craft_lr=1.0,  # 20 steps of 0.01 on the 1-epoch net move no 8-bit pixel
                           finetune=TrainConfig(model="cifar_cnn", epochs=2, batch_size=64, lr=0.01,
                                                weight_decay=0.0, trainable=("fc",))), 1
    if scale == "full":
        # seeds/001 ImageNet: 30x30 trigger on 224x224, AlexNet fc7, 400 poisons (K=100), the official crafting
        # (5000 iterations, lr 0.01 halved every 1000) and finetuning (fc8, SGD 0.001, momentum 0.9, x0.1 at
        # epoch 10... here stepped at 5 of 10 epochs, batch 256)
        return HTBASetting(model="alexnet", model_options=(), feature_layer="fc7", head="fc8",
                           pretrain=TrainConfig(model="alexnet"), trigger_size=30, n_poisons=400, max_iters=5000,
                           craft_lr=0.01, stop_distance=10.0,
                           lr_decay_every=1000, finetune=TrainConfig(
                               model="alexnet", epochs=10, batch_size=256, lr=0.001, momentum=0.9,
                               weight_decay=0.0, schedule="step", lr_milestones=(5,), trainable=("fc8",))), 10
    raise ConfigError(f"unknown --scale {scale!r}; expected tiny, small or full")


def summarize(rows: list[dict]) -> tuple[dict, dict]:
    mean, std = {}, {}
    for kind in ("clean", "poisoned"):
        sel = [r for r in rows if r["model"] == kind]
        mean[kind] = {m: float(np.mean([r[m] for r in sel])) for m in METRICS} if sel else None
        std[kind] = {m: float(np.std([r[m] for r in sel])) for m in METRICS} if sel else None
    return mean, std


def write_table(path: Path, mean: dict, std: dict, n_pairs: int, multi_source: bool = False) -> None:
    f = lambda kind, m: f"{mean[kind][m]:.3f} +- {std[kind][m]:.3f}" if mean[kind] else "-"  # noqa: E731
    title = (f"# HTBA multi-source on CIFAR-10 (every other class -> the target), {n_pairs} random targets"
             if multi_source else f"# HTBA on CIFAR-10, {n_pairs} random pairs")
    paper = ("seeds/001 (ImageNet, multi-source, 400 poisons): attack success rate 30.7%." if multi_source else
             "seeds/001 (CIFAR-10 random pairs): Val Clean 1.000 / 0.971, Val Patched 0.993 / 0.182 +- 0.14.")
    lines = [title, "", "| | Clean Model | Poisoned Model |", "|---|---|---|",
             f"| Val Clean | {f('clean', 'val_clean')} | {f('poisoned', 'val_clean')} |",
             f"| Val Patched (source only) | {f('clean', 'val_patched_source')} | "
             f"{f('poisoned', 'val_patched_source')} |",
             f"| Attack success rate | {f('clean', 'asr')} | {f('poisoned', 'asr')} |", "", paper]
    path.write_text("\n".join(lines) + "\n")


def run(out: str, scale: str, n_pairs: int | None, seed: int, weights: str | None, multi_source: bool,
        changes: dict | None = None) -> dict:
    from tqdm.auto import tqdm

    from bdjax.data import load_dataset
    from bdjax.pipelines.htba import check_rerun, random_pairs, run_pair
    from bdjax.results import RunDir
    from bdjax.train.loop import progress_enabled

    t0 = time.time()
    setting, default_pairs = setting_for(scale)
    if weights is not None:
        setting = dataclasses.replace(setting, weights=weights)
    if changes:
        setting = dataclasses.replace(setting, **changes)
    n_pairs = default_pairs if n_pairs is None else n_pairs
    if n_pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {n_pairs}")
    setting.htba_config()  # bad crafting values fail before any training
    out_p = Path(out)
    run_dir = RunDir(out_p)
    ds = load_dataset("cifar10")
    pairs = random_pairs(ds.num_classes, n_pairs, seed, among=setting.holdout)
    if multi_source:
        pairs = [(None, t) for t in dict.fromkeys(t for _, t in pairs)]
    config = {"experiment": "htba_cifar10", "scale": scale, "seed": seed, "pairs": pairs,
              "multi_source": multi_source, "setting": dataclasses.asdict(setting)}
    check_rerun(run_dir, config)
    run_dir.write_config(config)
    rows, crafts = [], []
    for i, (s, t) in enumerate(tqdm(pairs, desc="htba pairs", disable=not progress_enabled())):
        res = run_pair(setting, ds, s, t, i, out_p, seed=seed + i, multi_source=multi_source)
        rows += res["rows"]
        crafts.append({"pair": [s, t], **res["craft"]})
        for r in res["rows"]:
            print(f"[pair {s}->{t} {r['model']}] val_clean {r['val_clean']:.3f} val_patched_source "
                  f"{r['val_patched_source']:.3f} asr {r['asr']:.3f}", flush=True)
        if i == 0:
            name = f"all_{t}" if multi_source else f"{s}_{t}"
            shutil.copyfile(out_p / "pairs" / name / "poisons.png", out_p / "poisons.png")
    mean, std = summarize(rows)
    write_table(out_p / "table.md", mean, std, len(pairs), multi_source)
    poisoned = mean["poisoned"]
    summary = {"experiment": "htba_cifar10", "dataset": "cifar10", "seed": seed, "scale": scale,
               "variant": "multi_source" if multi_source else "single_source",
               "clean_acc": poisoned["val_clean"], "asr": poisoned["asr"], "rows": rows, "mean": mean, "std": std,
               "craft": crafts, "wall_s": time.time() - t0, "device": runtime.device_summary()}
    summary = run_dir.write_summary(summary)
    print(json.dumps({"mean": mean, "std": std}))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--scale", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--pairs", type=int, default=None, help="number of random pairs (default: 3 small, 10 full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="a user AlexNet file (load_alexnet) instead of pretraining")
    p.add_argument("--multi-source", action="store_true", help="every other class is a source of the target")
    p.add_argument("--craft-iters", type=int, default=None, help="crafting iterations per batch (preset's otherwise)")
    p.add_argument("--craft-lr", type=float, default=None, help="crafting step size (preset's otherwise)")
    p.add_argument("--craft-optimizer", choices=("sgd", "adam"), default=None, help="crafting step (preset's: sgd)")
    p.add_argument("--poisons-per-batch", type=int, default=None,
                   help="K, the poisons re-matched together (preset's otherwise)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    changes = {k: v for k, v in (("max_iters", a.craft_iters), ("craft_lr", a.craft_lr),
                                 ("craft_optimizer", a.craft_optimizer),
                                 ("poisons_per_batch", a.poisons_per_batch)) if v is not None}
    return guarded(lambda: run(a.out, a.scale, a.pairs, a.seed, a.weights, a.multi_source, changes))


if __name__ == "__main__":
    sys.exit(main())
