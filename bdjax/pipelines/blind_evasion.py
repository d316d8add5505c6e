"""Blind backdoors against defences (seeds/004 'Evading known defenses'): per evaded defence, the blind model's
main accuracy drop, its backdoor accuracy, and what bdjax's defences say about it.

Rows (`rows`):
- none: the blind model without evasion, the baseline every defence gets to inspect;
- neural_cleanse: trained with the Neural Cleanse evasion task (blind.evasion=neural_cleanse);
- gradient_shaping: the defender trains with per-example clipping + Gaussian noise (DP-SGD), both the clean
  reference and the blind model (the attacker's loss is unchanged; the verdict is whether the backdoor survived).
Every blind model is inspected by all four defences through bdjax.pipelines.defend: Neural Cleanse (is the
backdoor label flagged?), STRIP (share of synthesised test inputs rejected at the FRR), and the two data filters.
A blind attack poisons no training data, so Spectral Signatures and Activation Clustering are given a PROBE set:
the clean training set plus `probe_fraction` of synthesised copies labelled with the backdoor label, as if those
inputs had been in the data; their verdict is whether they would have removed them (TPR >= 0.5).

Folders: OUT/clean, OUT/clean_shaped, OUT/rows/<row>/ (fit run folder, nc_triggers.png, strip_entropy.png,
row.json). OUT/summary.json (`rows`), OUT/table.md, OUT/evasion.png.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bdjax import runtime
from bdjax.attacks import PoisonedSet
from bdjax.attacks.blind import BlindConfig, backdoor_test_set, blind_accuracies, make_blind, synthesize_uint8
from bdjax.config import DataConfig, TrainConfig, matches_saved, raise_failed, to_dict
from bdjax.defenses.gradient_shaping import shaped_grad_fn
from bdjax.defenses.neural_cleanse import NCConfig
from bdjax.errors import ConfigError
from bdjax.models import get_model
from bdjax.pipelines.blind import accuracy_columns, load_data, train_model
from bdjax.pipelines.defend import DefenseSettings, run_defenses
from bdjax.results import RunDir, write_json
from bdjax.train import classification_loss

ROWS = ("none", "neural_cleanse", "gradient_shaping")


@dataclasses.dataclass(frozen=True)
class EvasionExperimentConfig:
    experiment: str = "blind_evasion"
    seed: int = 0
    rows: tuple[str, ...] = ROWS
    shaping_clip: float = 1.0  # gradient shaping's per-example clip norm S
    shaping_noise: float = 0.1  # its noise multiplier sigma
    probe_fraction: float = 0.05  # synthesised copies added to the training set for the data filters
    strip_detects: float = 0.5  # STRIP 'detects' when it rejects at least this share of synthesised inputs
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    blind: BlindConfig = dataclasses.field(default_factory=BlindConfig)
    defense: DefenseSettings = dataclasses.field(default_factory=lambda: DefenseSettings(
        nc=NCConfig(batch_size=32, steps_per_check=10, max_checks=100), nc_images=1000))
    task: str = "classify"  # (load_data's field; the evasion experiment needs a constant backdoor label)
    # finetune: theta trained with `train`, every row's models (blind, and the shaped clean reference) fine-tune it
    # with `finetune` (the seed's evasion rows fine-tune an ImageNet model); scratch: every model from scratch
    mode: str = "finetune"
    finetune: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        epochs=1, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant"))

    def validate(self) -> "EvasionExperimentConfig":
        bad = [r for r in self.rows if r not in ROWS]
        raise_failed([
            (not bad and len(self.rows) >= 1, "rows", " | ".join(ROWS), self.rows),
            (self.shaping_clip > 0, "shaping_clip", "> 0", self.shaping_clip),
            (self.shaping_noise >= 0, "shaping_noise", ">= 0", self.shaping_noise),
            (0 < self.probe_fraction < 1, "probe_fraction", "in (0, 1)", self.probe_fraction),
            (self.task == "classify", "task", "classify", self.task),
            (self.mode in ("scratch", "finetune"), "mode", "scratch or finetune", self.mode),
            *self.finetune.checks("finetune."),
            (self.blind.label == "constant", "blind.label", "constant (defences look for one backdoor label)",
             self.blind.label),
            *self.train.checks(), *self.blind.checks(),
        ])
        self.defense.nc.validate()
        return self


class _Inspected:
    """What bdjax.pipelines.defend.run_defenses reads from an attack result, for a blind model."""

    def __init__(self, model, state, ds, probe: PoisonedSet, x_bd, y_bd, target: int):
        self.model, self.state, self.data, self.poisoned = model, state, ds, probe
        self.x_asr, self.y_asr, self.summary = x_bd, y_bd, {"target": target}


def probe_set(ds, attack, fraction: float, target: int, seed: int) -> PoisonedSet:
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(ds.y_train != target)
    chosen = np.sort(rng.choice(eligible, max(1, int(round(fraction * len(ds.y_train)))), replace=False))
    x_syn = synthesize_uint8(attack.synthesizer, ds.x_train[chosen], seed)
    x = np.concatenate([ds.x_train, x_syn])
    y = np.concatenate([ds.y_train, np.full(len(chosen), target)]).astype(np.int32)
    mask = np.r_[np.zeros(len(ds.y_train), bool), np.ones(len(chosen), bool)]
    return PoisonedSet(x, y, mask, np.concatenate([ds.y_train, ds.y_train[chosen]]).astype(np.int32))


def verdicts(sections: dict, cfg: EvasionExperimentConfig) -> dict:
    nc, st, sp, ac = (sections[k] for k in ("neural_cleanse", "strip", "spectral_signatures", "activation_clustering"))
    return {"neural_cleanse": bool(nc["target_flagged"]),
            "strip": bool(st["far"] is not None and 1.0 - st["far"] >= cfg.strip_detects),
            "spectral_signatures": bool(sp["tpr"] >= 0.5),
            "activation_clustering": bool(cfg.blind.target in ac["flagged_labels"])}


def write_table(path: Path, rows: list[dict], title: str) -> None:
    lines = [f"# {title}", "", "| Evaded defence | Main (drop) | Backdoor | Own verdict | NC flags target | "
             "STRIP rejects | SS TPR | AC flags target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["defences"]
        lines.append(f"| {r['evaded']} | {100 * r['main_acc_blind']:.2f} ({-100 * r['main_acc_drop']:+.2f}) | "
                     f"{100 * r['backdoor_acc_blind']:.2f} | {r['verdict']} | {d['neural_cleanse']['target_flagged']} "
                     f"(index {d['neural_cleanse']['target_anomaly_index']:.2f}) | {1 - d['strip']['far']:.2f} | "
                     f"{d['spectral_signatures']['tpr']:.2f} | {r['verdicts']['activation_clustering']} |")
    lines += ["", "Main (drop) = the blind model's main accuracy and its change against the clean model trained with "
              "the same recipe (for gradient shaping: the clean model trained with gradient shaping). Own verdict: "
              "what the evaded defence concludes (none: -; gradient shaping: whether the backdoor survived, backdoor "
              "accuracy >= 0.5)."]
    path.write_text("\n".join(lines) + "\n")


def save_figure(path: Path, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, r in zip(axes[0], rows):
        nc = r["defences"]["neural_cleanse"]
        ax.bar(range(len(nc["norms"])), nc["norms"], color=["crimson" if i == r["target"] else "#888"
                                                            for i in range(len(nc["norms"]))])
        ax.set_title(f"{r['evaded']}: NC mask L1 per label", fontsize=8)
        ax.set_xlabel("label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: EvasionExperimentConfig, out) -> dict:
    t0 = time.time()
    cfg.validate()
    out = Path(out)
    run_dir = RunDir(out)
    previous = run_dir.read_config()
    if previous is not None and (out / "clean").exists() and not matches_saved(previous, cfg):
        raise ConfigError(f"{out} already holds an evasion run with a different config; use another --out")
    run_dir.write_config(to_dict(cfg))
    ds = load_data(cfg)
    model = get_model(cfg.train.model, ds.num_classes, **cfg.train.model_kwargs())
    target, B = cfg.blind.target, cfg.train.batch_size
    blinds = {"none": dataclasses.replace(cfg.blind, evasion="none"),
              "neural_cleanse": dataclasses.replace(cfg.blind, evasion="neural_cleanse"),
              "gradient_shaping": dataclasses.replace(cfg.blind, evasion="none", shaping_clip=cfg.shaping_clip,
                                                      shaping_noise=cfg.shaping_noise)}
    attacks = {r: make_blind(model, blinds[r], ds.image_shape, ds.num_classes, B) for r in cfg.rows}
    probe_attack = attacks[cfg.rows[0]]
    x_bd, y_bd = backdoor_test_set(ds.x_test, ds.y_test, probe_attack.synthesizer, probe_attack.label_fn, cfg.seed + 1)
    probe = probe_set(ds, probe_attack, cfg.probe_fraction, target, cfg.seed)

    theta = train_model(model, ds, cfg.train, out / "clean", seed=cfg.seed, eval_attack=probe_attack,
                        desc="clean theta")
    recipe, init = (cfg.finetune, theta.variables) if cfg.mode == "finetune" else (cfg.train, None)
    references = {}

    def reference(shaped: bool):
        """The clean model each row is compared with: trained with the row's recipe, without the attack."""
        if shaped not in references:
            if shaped:
                grad_fn = shaped_grad_fn(classification_loss(model), cfg.shaping_clip, cfg.shaping_noise)
                references[shaped] = train_model(model, ds, recipe, out / "clean_shaped", seed=cfg.seed, init=init,
                                                 grad_fn=grad_fn, eval_attack=probe_attack, desc="clean (shaped)")
            elif cfg.mode == "finetune":
                references[shaped] = train_model(model, ds, recipe, out / "clean_finetune", seed=cfg.seed, init=init,
                                                 eval_attack=probe_attack, desc="clean fine-tune")
            else:
                references[shaped] = theta
        return references[shaped]

    rows = []
    for row, attack in attacks.items():
        row_dir = out / "rows" / row
        done = row_dir / "row.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        t_row = time.time()
        ref = reference(row == "gradient_shaping")
        state = train_model(model, ds, recipe, row_dir, seed=cfg.seed, attack=attack, init=init, desc=f"blind ({row})")
        acc_ref = blind_accuracies(model, ref.variables, ds.x_test, ds.y_test, x_bd, y_bd)
        acc = blind_accuracies(model, state.variables, ds.x_test, ds.y_test, x_bd, y_bd)
        sections = run_defenses(_Inspected(model, state, ds, probe, x_bd, y_bd, target), RunDir(row_dir), cfg.defense)
        v = verdicts(sections, cfg)
        own = {"none": "-", "neural_cleanse": "flagged" if v["neural_cleanse"] else "not flagged",
               "gradient_shaping": "backdoor survived" if acc["backdoor_acc"] >= 0.5 else "backdoor suppressed"}[row]
        r = {"evaded": row, "target": target, "synthesizer": cfg.blind.synthesizer, "balancing": cfg.blind.balancing,
             **accuracy_columns(acc_ref, acc), "verdict": own, "verdicts": v, "defences": sections,
             "wall_s": time.time() - t_row}
        write_json(done, r)
        rows.append(r)
        print(f"[{row}] main {r['main_acc_clean']:.4f} -> {r['main_acc_blind']:.4f}, backdoor "
              f"{r['backdoor_acc_blind']:.4f}, verdicts {v}", flush=True)

    write_table(out / "table.md", rows, f"Blind backdoor vs defences on {ds.name} ({cfg.train.model})")
    save_figure(run_dir.figure("evasion.png"), rows)
    head = rows[0]
    summary = {"experiment": cfg.experiment, "dataset": ds.name, "seed": cfg.seed, "model": cfg.train.model,
               "clean_acc": head["main_acc_blind"], "asr": head["backdoor_acc_blind"],
               "rows": [{k: v for k, v in r.items() if k != "defences"} | {"defences": _brief(r["defences"])}
                        for r in rows],
               "wall_s": time.time() - t0, "device": runtime.device_summary()}
    summary = run_dir.write_summary(summary)
    print(f"results in {out}/ (summary.json, table.md, evasion.png, rows/*)")
    return summary


def _brief(sections: dict) -> dict:
    keep = {"neural_cleanse": ("norms", "anomaly_index", "flagged_labels", "target_anomaly_index", "target_flagged"),
            "strip": ("frr", "far", "auc"), "spectral_signatures": ("tpr", "fpr", "auc", "poison_left"),
            "activation_clustering": ("tpr", "fpr", "flagged_labels")}
    return {k: {f: sections[k][f] for f in fields} for k, fields in keep.items()}
