"""Matplotlib figures written as PNG into run folders (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, auc  # noqa: E402

from .metrics import roc_points  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # a reader (the web app) never sees half a PNG
    return path


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy against epoch, train and validation (the paper's Fig 8)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_roc(y_true, prob, path: Path, title: str = "ROC (validation)", auc_interval=None) -> Path:
    """ROC curve of the positive class (the paper's Fig 9); ``auc_interval``: (low, high) of AUC's
    95 % bootstrap interval (``metrics.bootstrap_ci``), written under the curve when given."""
    fpr, tpr = roc_points(y_true, prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    disp = RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=auc(fpr, tpr)).plot(ax=ax)
    # sklearn's legend rounds to two decimals, which shows a validation AUC of 0.995 as "1.00"
    disp.line_.set_label(f"AUC = {disp.roc_auc:.3f}")
    ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    if auc_interval is not None:
        ax.text(0.97, 0.2, f"AUC 95 % interval over these images:\n{auc_interval[0]:.3f} to {auc_interval[1]:.3f}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_confusion(y_true, y_pred, classes, path: Path, title: str = "Confusion matrix (validation)") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(np.asarray(y_true), np.asarray(y_pred), labels=list(range(len(classes))),
                                            display_labels=list(classes), ax=ax, colorbar=False)
    ax.set_title(title)
    return _save(fig, path)
