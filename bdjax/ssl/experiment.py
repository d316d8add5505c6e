"""The SSL backdoor experiment (Saha et al. 2022, seeds/000's table): pretrain a clean and a backdoored model
(target-category images half patched), evaluate both linearly on 1% / 10% of the labels, on clean and on patched
validation images. Every pretraining is resumable (OUT/<method>/<clean|backdoored>/checkpoints)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from bdjax import runtime
from bdjax.config import TrainConfig, changed_fields
from bdjax.data import load_dataset
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.results import RunDir, write_json
from bdjax.ssl import byol, jigsaw, linear_eval as L, moco, poison, rotnet
from bdjax.ssl.pretraining import METHODS, pretrain

MODELS = ("clean", "backdoored")
# Settings that only evaluate finished pretrainings: a rerun with other values reuses the checkpoints
EVALUATION_ONLY = ("linear", "fractions", "label_draws", "knn_every")


@dataclasses.dataclass(frozen=True)
class SSLExperimentConfig:
    method: str = "moco"
    seed: int = 0
    dataset: str = "cifar10"
    n_train: int | None = None  # pretraining subset (None = all)
    n_val: int | None = None
    backbone: str = "resnet18"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    train: TrainConfig = TrainConfig(model="resnet18", epochs=200, batch_size=256, lr=0.06, weight_decay=1e-4,
                                     schedule="cosine", checkpoint_every=1)
    moco: moco.MocoConfig = moco.MocoConfig()
    byol: byol.ByolConfig = byol.ByolConfig()
    rotnet: rotnet.RotNetConfig = rotnet.RotNetConfig()
    jigsaw: jigsaw.JigsawConfig = jigsaw.JigsawConfig()
    poison: poison.PoisonConfig = poison.PoisonConfig()
    linear: L.LinearEvalConfig = L.LinearEvalConfig()
    fractions: tuple[float, ...] = (0.01, 0.1)
    knn_every: int = 0  # epochs between kNN monitor records (0 = off)
    label_draws: int = 1  # labelled subsets per fraction, each with its own linear head: rows hold their mean

    def validate(self, num_classes: int = 10) -> "SSLExperimentConfig":
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must be labelled fractions in (0, 1], got {self.fractions}")
        if self.label_draws < 1:
            raise ConfigError(f"label_draws must be >= 1 (labelled subsets per fraction), got {self.label_draws}")
        self.poison.validate(num_classes)
        self.linear.validate()
        return self

    def method_cfg(self):
        return getattr(self, self.method)


def _subset(rng, n_all: int, n: int | None) -> np.ndarray:
    return np.sort(rng.choice(n_all, n, replace=False)) if n is not None and n < n_all else np.arange(n_all)


def check_resumable(out: RunDir, cfg: SSLExperimentConfig) -> None:
    """Refuse an output folder whose checkpoints other pretraining settings made: resuming would continue them
    under the new settings (or reuse finished ones) while config.json says otherwise. Evaluation-only settings
    (EVALUATION_ONLY) may change: the pretrainings are reused and only the evaluation runs again."""
    previous = out.read_config()
    made = [m for m in MODELS if any((out.path / m / "checkpoints").glob("*"))]
    if previous is None or not made:
        return
    other_methods = tuple(m for m in METHODS if m != cfg.method)  # their sections do not touch this pretraining
    changed = changed_fields(previous, cfg, ignore=EVALUATION_ONLY + other_methods)
    if changed:
        raise ConfigError(f"{out.path} holds {' and '.join(made)} pretraining checkpoints made with other settings "
                          f"({', '.join(changed[:6])}); use another --out, or delete that folder to pretrain again")


def run(cfg: SSLExperimentConfig, out: str | Path) -> dict:
    t0 = time.time()
    ds = load_dataset(cfg.dataset)
    cfg.validate(ds.num_classes)
    out = RunDir(Path(out) / cfg.method)
    check_resumable(out, cfg)
    out.write_config(dataclasses.asdict(cfg))
    rng = np.random.default_rng(cfg.seed)
    tr, va = _subset(rng, len(ds.x_train), cfg.n_train), _subset(rng, len(ds.x_test), cfg.n_val)
    x_tr, y_tr, x_va, y_va = ds.x_train[tr], ds.y_train[tr], ds.x_test[va], ds.y_test[va]
    trigger = poison.load_trigger(cfg.poison, ds.image_shape[-1])
    k_poison, k_val = jax.random.split(jax.random.key(cfg.seed))
    x_poisoned, poisoned = poison.poison_target_category(k_poison, x_tr, y_tr, cfg.poison, trigger)
    # patched validation: the non-target images, each with the trigger at a random place (as the paper)
    keep = y_va != cfg.poison.target
    x_patched, y_patched = poison.paste_random(k_val, x_va[keep], trigger), y_va[keep]

    n_classes = 4 if cfg.method == "rotnet" else ds.num_classes
    backbone = get_model(cfg.backbone, n_classes, widths=cfg.widths, stage_sizes=cfg.stage_sizes)
    monitor = None
    if cfg.knn_every:
        bank = _subset(rng, len(x_tr), min(len(x_tr), 5000))
        probe = rng.choice(len(x_patched), min(len(x_patched), 2000), replace=False)  # a cheap attack monitor
        monitor = lambda model, st: L.knn_monitor(model, x_tr[bank], y_tr[bank], x_va, y_va, ds.num_classes,
                                                  x_patched=x_patched[probe], target=cfg.poison.target)(st)
    rows = []
    for name, x in (("clean", x_tr), ("backdoored", x_poisoned)):
        model, state = pretrain(cfg.method, backbone, cfg.train, x, seed=cfg.seed, method_cfg=cfg.method_cfg(),
                                run=RunDir(out.path / name), eval_fn=monitor, eval_every=cfg.knn_every or 1,
                                desc=f"{cfg.method}/{name}")
        variables = state.variables
        f_tr, f_va, f_pa = (L.extract_features(model, variables, a) for a in (x_tr, x_va, x_patched))
        for frac in cfg.fractions:
            m = L.evaluate_linear(f_tr, y_tr, f_va, y_va, f_pa, y_patched, fraction=frac, target=cfg.poison.target,
                                  num_classes=ds.num_classes, cfg=cfg.linear, seed=cfg.seed, draws=cfg.label_draws)
            rows.append({"method": cfg.method, "model": name, "fraction": frac, **m})
    summary = summarise(cfg, rows, n_poisoned=len(poisoned), n_patched=len(y_patched), wall_s=time.time() - t0)
    (out.path / "table.md").write_text(table(rows))
    return out.write_summary(summary)


def fp_ratio(rows, fraction) -> float | None:
    by = {r["model"]: r for r in rows if r["fraction"] == fraction}
    clean, bad = by["clean"]["patched_fp"], by["backdoored"]["patched_fp"]
    return bad / max(clean, 1)


def summarise(cfg, rows, *, n_poisoned: int, n_patched: int, wall_s: float) -> dict:
    first = cfg.fractions[0]
    bad = next(r for r in rows if r["model"] == "backdoored" and r["fraction"] == first)
    return {"experiment": "ssl_backdoor_cifar10", "dataset": cfg.dataset, "seed": cfg.seed, "method": cfg.method,
            "clean_acc": bad["clean_acc"], "asr": bad["patched_fp"] / max(n_patched, 1),  # patched -> target
            "wall_s": wall_s, "device": runtime.device_summary(), "rows": rows, "n_poisoned": n_poisoned,
            "n_patched": n_patched, "patched_fp_ratio": {str(f): fp_ratio(rows, f) for f in cfg.fractions}}


def table(rows) -> str:
    """seeds/000's layout: one line per (method, fraction); clean model then backdoored, clean then patched data."""
    head = ("| Method | labels | Clean model: clean Acc | FP | patched Acc | FP | Backdoored model: clean Acc | FP "
            "| patched Acc | FP |\n|" + "---|" * 10 + "\n")
    lines = []
    fp = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # a mean over label draws, or a count
    for frac in sorted({r["fraction"] for r in rows}):
        by = {r["model"]: r for r in rows if r["fraction"] == frac}
        cells = [f"{by[m]['clean_acc'] * 100:.1f} | {fp(by[m]['clean_fp'])} | {by[m]['patched_acc'] * 100:.1f} | "
                 f"{fp(by[m]['patched_fp'])}" for m in MODELS]
        lines.append(f"| {rows[0]['method']} | {frac:g} | {cells[0]} | {cells[1]} |")
    return head + "\n".join(lines) + "\n"
