"""Figures: ROC curves, reliability diagrams and training curves, as PNG files (matplotlib without pyplot:
no global state, no GUI backend)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrdx.atomic import atomic_path
from cxrdx.metrics import reliability

if TYPE_CHECKING:
    from cxrdx.rundir import EpochRow


def _grid(n: int, width: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(4, max(1, n))
    rows = -(-n // cols)
    w, h = width * cols, width * rows
    fig = Figure(figsize=(w, h))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    # fixed margins in inches: constrained layout would double the drawing time
    fig.subplots_adjust(left=0.55 / w, right=1 - 0.1 / w, bottom=0.5 / h, top=1 - 0.3 / h, wspace=0.3, hspace=0.35)
    return fig, axes


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def roc_figure(y: np.ndarray, probs: Mapping[str, np.ndarray], names: Sequence[str], path: str | Path) -> Path:
    """One panel per finding, one ROC curve per model, AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y, dtype=np.float64)
    fig, axes = _grid(len(names))
    for k, (ax, name) in enumerate(zip(axes, names)):
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        labelled = ~np.isnan(y[:, k])  # NaN: an image the dataset does not label for this finding
        yk = y[labelled, k]
        both = 0 < yk.sum() < len(yk)
        for model, p in probs.items():
            if both:
                fpr, tpr, _ = roc_curve(yk, p[labelled, k])
                ax.plot(fpr, tpr, lw=1.2, label=f"{model} ({roc_auc_score(yk, p[labelled, k]):.3f})")
        why = "not labelled" if not labelled.any() else "one class only"
        ax.set_title(name if both else f"{name} (no AUROC: {why})", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("1 - specificity", fontsize=8), ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        if both:
            ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def reliability_figure(y: np.ndarray, probs: np.ndarray, names: Sequence[str], path: str | Path, n_bins: int = 10) -> Path:
    """Per finding: observed positive fraction against mean predicted probability per bin, with the ECE."""
    from cxrdx.metrics import expected_calibration_error

    y, probs = np.asarray(y), np.asarray(probs)
    ece = expected_calibration_error(y, probs, n_bins)
    fig, axes = _grid(len(names), width=2.8)
    for k, (ax, name) in enumerate(zip(axes, names)):
        labelled = ~np.isnan(y[:, k].astype(np.float64))  # NaN: not labelled for this finding
        curve = reliability(y[labelled, k], probs[labelled, k], n_bins)
        filled = curve["count"] > 0
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.bar(
            curve["low"], curve["count"] / max(1, int(labelled.sum())), width=1 / n_bins, align="edge", color="0.9", label="share of images"
        )
        ax.plot(curve.loc[filled, "mean_prob"], curve.loc[filled, "frac_pos"], "o-", ms=3, lw=1.2, label="positive fraction")
        ax.set_title(f"{name} (ECE {ece[k]:.3f})", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability", fontsize=8), ax.set_ylabel("observed positive fraction", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def plot_curves(rows: Sequence[EpochRow], path: str | Path) -> Path:
    """Loss and mean-AUROC curves per epoch, raw and EMA weights."""
    from matplotlib.figure import Figure

    epochs = [r.epoch for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_auc = fig.subplots(1, 2)
    columns = [r.to_dict() for r in rows]
    present = lambda key: any(c.get(key) is not None for c in columns)  # noqa: E731
    for ax, metric, extra in ((ax_loss, "loss", (("train_loss", "train"),)), (ax_auc, "mean_auroc", ())):
        series = [*extra, (f"raw_val_{metric}", "val (raw)"), (f"ema_val_{metric}", "val (EMA)")]
        if not present(f"raw_val_{metric}"):  # rows of earlier versions: val_* were the raw weights
            series.insert(len(extra), (f"val_{metric}", "val"))
        for key, label in series:
            if present(key):
                ax.plot(epochs, [c.get(key) for c in columns], marker="o", label=label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(xlabel="epoch", ylabel="loss per image", title="Loss")
    ax_auc.set(xlabel="epoch", ylabel="mean AUROC", title="Validation mean AUROC")
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def draw(plot: Callable[..., Path], *args: Any) -> bytes:
    """A figure function of this module (which writes a PNG to its last argument) rendered to bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return plot(*args, Path(tmp) / "figure.png").read_bytes()
