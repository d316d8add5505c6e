"""All four defenses against one attacked model: the second half of `bdjax demo`.

`run_defenses(attack, run_dir, settings)` takes a `BadNetsResult` (the trained model, its poisoned training set
and the triggered test set) and returns one JSON-ready section per defense, with the shared vocabulary of
bdjax.defenses.metrics:

- data filters (spectral_signatures, activation_clustering): tpr, fpr, auc, poison_removed, poison_left,
  clean_removed, n_removed (activation clustering also names its flagged_labels);
- input filter (strip): frr, far, auc, threshold;
- model inspector (neural_cleanse): norms, anomaly_index, flagged_labels, target_anomaly_index, target_flagged.

Figures: nc_triggers.png (the reversed trigger of every label) and strip_entropy.png.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from bdjax.config import ExperimentConfig, raise_failed
from bdjax.defenses.activation_clustering import ACConfig, activation_clustering
from bdjax.defenses.features import check_layer, extract_features
from bdjax.defenses.neural_cleanse import NCConfig, neural_cleanse, save_trigger_grid
from bdjax.defenses.spectral import SpectralConfig, spectral_filter
from bdjax.defenses.strip import StripConfig, run_strip, save_entropy_histogram
from bdjax.errors import ConfigError
from bdjax.pipelines import nc_fields  # noqa: F401  (NCConfig's field docs)

MAX_EPS = 0.66  # 1.5 * eps must stay below a whole class
FILTER_KEYS = ("tpr", "fpr", "auc", "poison_removed", "poison_left", "clean_removed")


@dataclasses.dataclass(frozen=True)
class DefenseSettings:
    layer: str = "penultimate"  # representation used by spectral signatures and activation clustering
    seed: int = 0  # the defenses' random draws, Neural Cleanse's included (the commands pass the run's seed)
    spectral: SpectralConfig = dataclasses.field(default_factory=SpectralConfig)  # Spectral Signatures
    ac: ACConfig = dataclasses.field(default_factory=ACConfig)  # Activation Clustering
    strip: StripConfig = dataclasses.field(default_factory=StripConfig)
    strip_inputs: int = 200  # clean and triggered test inputs STRIP scores, each
    nc: NCConfig = dataclasses.field(default_factory=NCConfig)  # Neural Cleanse
    nc_images: int = 1000  # clean test images Neural Cleanse optimises on

    DERIVED = {"nc.seed": "seed"}  # one seed for all four defenses
    RENAMED = {"spectral_eps": "spectral.eps", "ac_size_threshold": "ac.size_threshold",
               "strip_overlays": "strip.n_overlay", "strip_frr": "strip.frr"}

    def validate(self) -> "DefenseSettings":
        e = self.spectral.eps
        raise_failed([
            (self.layer.strip() != "", "defend.layer", "a layer name (e.g. penultimate)", self.layer),
            (e is None or 0 < e <= MAX_EPS, "defend.spectral.eps", f"in (0, {MAX_EPS}] or none (the true eps)", e),
            (self.strip_inputs >= 2, "defend.strip_inputs", ">= 2 (the threshold needs two clean inputs)",
             self.strip_inputs),
            (self.nc_images >= self.nc.batch_size, "defend.nc_images", f">= defend.nc.batch_size ({self.nc.batch_size})",
             self.nc_images),
        ])
        self.spectral.validate(), self.ac.validate(), self.strip.validate(), self.nc.validate()
        return self


@dataclasses.dataclass(frozen=True)
class DefendConfig(ExperimentConfig):
    """`bdjax defend`: a BadNets run (the ExperimentConfig fields) and the four defenses on it (`defend`)."""

    experiment: str = "defend"  # the run's name, recorded in summary.json
    defend: DefenseSettings = dataclasses.field(default_factory=DefenseSettings)  # the four defenses

    DERIVED = {"defend.seed": "seed"}

    def validate(self) -> "DefendConfig":
        super().validate()
        self.defend.validate()
        return self

    def attack_config(self) -> ExperimentConfig:
        """The BadNets part alone: what the run folder's config.json holds and its checkpoints are resumed by (a
        change of defense settings reruns the defenses on the same model)."""
        return ExperimentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ExperimentConfig)})

    def settings(self) -> DefenseSettings:
        d = self.defend
        return dataclasses.replace(d, seed=self.seed, nc=dataclasses.replace(d.nc, seed=self.seed))


def _true_eps(y: np.ndarray, poison_mask: np.ndarray, target: int) -> float:
    clean_target = int(((y == target) & ~poison_mask).sum())
    return float(poison_mask.sum()) / max(clean_target, 1)


def _spectral(reps, p, target, s: DefenseSettings) -> dict:
    eps = s.spectral.eps if s.spectral.eps is not None else min(_true_eps(p.y, p.mask, target), MAX_EPS)
    r = spectral_filter(reps, p.y, **{**s.spectral.kwargs(), "eps": eps}, seed=s.seed, poison_mask=p.mask)
    return {"eps": eps, "n_removed": int(r.removed.sum()), **{k: r.metrics[k] for k in FILTER_KEYS}}


def _activation_clustering(reps, p, s: DefenseSettings) -> dict:
    r = activation_clustering(reps, p.y, **s.ac.kwargs(), seed=s.seed, poison_mask=p.mask)
    return {"n_removed": int(r.removed.sum()), "flagged_labels": r.flagged_labels,
            **{k: r.metrics[k] for k in FILTER_KEYS}}


def _strip(attack, run_dir, s: DefenseSettings) -> dict:
    p, ds = attack.poisoned, attack.data
    rng = np.random.default_rng(s.seed)
    n = min(s.strip_inputs, len(ds.x_test), len(attack.x_asr))
    x_clean = ds.x_test[rng.permutation(len(ds.x_test))[:n]]
    x_trig = attack.x_asr[rng.permutation(len(attack.x_asr))[:n]]
    # Overlays come from clean training images, as in the official notebook (disjoint from the test inputs).
    x_pool = p.x[~p.mask]
    r = run_strip(attack.model, attack.state.variables, x_clean, x_trig, x_pool, **s.strip.kwargs(), seed=s.seed)
    save_entropy_histogram(run_dir.figure("strip_entropy.png"), r)
    out = r.summary()
    return {k: out[k] for k in ("frr", "far", "auc", "threshold", "n_overlay", "n_clean", "n_triggered")}


def _neural_cleanse(attack, run_dir, target, s: DefenseSettings) -> dict:
    ds = attack.data
    x = ds.x_test[np.random.default_rng(s.seed).permutation(len(ds.x_test))[:s.nc_images]]
    r = neural_cleanse(attack.model, attack.state.variables, x, ds.num_classes,
                       config=dataclasses.replace(s.nc, seed=s.seed))
    save_trigger_grid(run_dir.figure("nc_triggers.png"), r)
    i = int(np.flatnonzero(r.labels == target)[0])
    return {"norms": r.norms.tolist(), "anomaly_index": r.anomaly_index.tolist(), "flagged_labels": r.flagged_labels,
            "target_anomaly_index": float(r.anomaly_index[i]), "target_flagged": target in r.flagged_labels,
            "steps": r.steps}


def run_defenses(attack, run_dir, settings: DefenseSettings = DefenseSettings()) -> dict:
    """{defense name: its result section, with `wall_s`} for a BadNets all-to-one attack result."""
    if attack.x_asr is None or attack.summary.get("target") is None:
        raise ConfigError("the defenses need a backdoored model: run them after a BadNets attack, not attack.kind=none")
    settings.validate()
    target = int(attack.summary["target"])
    check_layer(attack.model, attack.data.image_shape, settings.layer)
    reps = extract_features(attack.model, attack.state.variables, attack.poisoned.x, settings.layer)
    steps = {
        "spectral_signatures": lambda: _spectral(reps, attack.poisoned, target, settings),
        "activation_clustering": lambda: _activation_clustering(reps, attack.poisoned, settings),
        "strip": lambda: _strip(attack, run_dir, settings),
        "neural_cleanse": lambda: _neural_cleanse(attack, run_dir, target, settings),
    }
    sections = {}
    for name, step in steps.items():
        t0 = time.time()
        sections[name] = {**step(), "wall_s": time.time() - t0}
    return sections


def headline(sections: dict) -> dict:
    """One line per defense for the terminal."""
    sp, ac, st, nc = (sections[k] for k in ("spectral_signatures", "activation_clustering", "strip", "neural_cleanse"))
    out = {
        "spectral_signatures": {k: sp[k] for k in ("tpr", "fpr", "poison_left")},
        "activation_clustering": {k: ac[k] for k in ("tpr", "fpr", "poison_left")},
        "strip": {k: st[k] for k in ("frr", "far", "auc")},
        "neural_cleanse": {k: nc[k] for k in ("flagged_labels", "target_anomaly_index")},
    }
    if "ulp" in sections:  # the model-level detector over the demo's zoo: test AUC per method and M
        out["ulp"] = {f"{r['method']} M={r['M']}": round(r["auc"], 3) for r in sections["ulp"]["rows"]}
    return out
