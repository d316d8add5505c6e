"""PNG figures: a run's trigger, clean vs poisoned examples and training curves; the defenses' figures (Neural
Cleanse triggers, STRIP entropies, ULP patterns and ROC curves)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _show(ax, img):
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * 255, 0, 255).astype(np.uint8)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_trigger(path: Path, pattern: np.ndarray, mask: np.ndarray) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    _show(axes[0], pattern)
    axes[0].set_title("pattern")
    _show(axes[1], mask)
    axes[1].set_title("mask")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_examples(path: Path, clean: np.ndarray, poisoned: np.ndarray, clean_labels, poisoned_labels,
                  class_names, n: int = 8) -> None:
    """Two rows: clean images with their labels, the same images poisoned with their new labels."""
    n = min(n, len(clean))
    if n == 0:
        return
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for i in range(n):
        _show(axes[0, i], clean[i])
        axes[0, i].set_title(str(class_names[clean_labels[i]])[:10], fontsize=8)
        _show(axes[1, i], poisoned[i])
        axes[1, i].set_title(str(class_names[poisoned_labels[i]])[:10], fontsize=8, color="crimson")
    axes[0, 0].set_ylabel("clean")
    axes[1, 0].set_ylabel("poisoned")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curves(path: Path, records: list[dict]) -> None:
    """Training loss and, where logged, clean accuracy and ASR against the step."""
    train = [r for r in records if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    series = (("clean_acc", "clean accuracy"), ("asr", "attack success rate"),  # BadNets-style runs
              ("main_acc", "main accuracy"), ("backdoor_acc", "backdoor accuracy"))  # blind runs
    for key, label in series:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("step")
    if axes[1].lines:
        axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_craft_trace(path: Path, trace: np.ndarray) -> None:
    """HTBA crafting: the mean matched squared feature distance per iteration, one line per batch of K poisons
    (NaN after a batch's early stop leaves a gap)."""
    trace = np.atleast_2d(np.asarray(trace, np.float64))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, row in enumerate(trace):
        ax.plot(np.arange(1, len(row) + 1), row, label=f"batch {i}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("squared feature distance")
    ax.set_title("poison to matched patched source (mean over K)", fontsize=9)
    if len(trace) <= 8:
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_trigger_grid(path, result, ncols: int | None = None) -> None:
    """Neural Cleanse: PNG grid of the reversed triggers (mask * pattern) per label (an NCResult), titled with
    the norm; flagged labels in red."""

    L = len(result.labels)
    ncols = ncols or min(L, 11 if L > 20 else 10)
    nrows = -(-L // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.25 * ncols, 1.45 * nrows), squeeze=False)
    flagged = set(result.flagged_labels)
    for ax in axes.ravel():
        ax.axis("off")
    for i, label in enumerate(result.labels):
        ax = axes.ravel()[i]
        fusion = result.masks[i][..., None] * result.patterns[i]
        img = np.clip(fusion * 255, 0, 255).astype(np.uint8)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{int(label)}: {result.norms[i]:.1f}", fontsize=7,
                     color="crimson" if int(label) in flagged else "black")
    fig.suptitle("Neural Cleanse: reversed triggers (mask x pattern), label: mask L1 norm", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_entropy_histogram(path, result, bins: int = 50) -> None:
    """STRIP (a StripResult): histogram of clean vs triggered entropies with the threshold (the figure of the STRIP paper)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    both = np.r_[result.clean_entropy, result.triggered_entropy]
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-6, bins + 1) if len(both) else bins
    ax.hist(result.clean_entropy, bins=edges, alpha=0.6, density=True, label=f"clean ({len(result.clean_entropy)})")
    if len(result.triggered_entropy):
        ax.hist(result.triggered_entropy, bins=edges, alpha=0.6, density=True,
                label=f"triggered ({len(result.triggered_entropy)})")
    ax.axvline(result.threshold, color="k", ls="--", lw=1, label=f"threshold (FRR {result.target_frr:.0%})")
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel("mean entropy of superimposed inputs (bits)")
    ax.set_ylabel("density")
    far = "n/a" if result.far is None else f"{result.far:.3f}"
    ax.set_title(f"STRIP, N={result.n_overlay}: FRR {result.frr:.3f}, FAR {far}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_patterns(path, result) -> None:
    """ULP (a ULPResult): the M learned litmus patterns."""
    z = result.patterns
    m = len(z)
    fig, axes = plt.subplots(1, m, figsize=(1.6 * m, 1.9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        img = z[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1)
        ax.set_title(f"z{i + 1}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"ULP patterns (M={m}, {result.config.pooling}, best epoch {result.best_epoch})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_roc(path, curves: dict) -> None:
    """ROC curves of model-level detectors: {label: (scores, is_poisoned)} on one plot."""
    from bdjax.defenses.metrics import roc_auc, roc_points

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for label, (scores, y) in curves.items():
        fpr, tpr = roc_points(scores, np.asarray(y, bool))
        auc = roc_auc(scores, np.asarray(y, bool))
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
