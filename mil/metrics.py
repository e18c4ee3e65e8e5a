"""Bag- and instance-level metrics, their mean ± std over folds, and the ROC / training-curve figures."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from wsi.metrics import binary_auc, class_aucs, macro_auc

POSITIVE_FRACTION = 0.5  # a tile is positive when more than half of it is annotated (wsi/annotations.py)


def bag_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (binary, or macro one-vs-rest; `wsi.metrics.macro_auc`), accuracy, balanced accuracy and F1
    (binary: of the positive class; else macro) of bag probabilities (n, C) against labels (n,). AUC is
    NaN with one class present (a validation part with one class), without warnings."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y = np.asarray(y)
    pred = probs.argmax(1)
    binary = probs.shape[1] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sklearn's one-class notes; the values are still defined
        bal = balanced_accuracy_score(y, pred)
    return {"auc": macro_auc(y, probs), "accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(bal),
            "f1": float(f1_score(y, pred, average="binary" if binary else "macro", zero_division=0))}


def per_class_auc(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest AUC of each class c (`wsi.metrics.class_aucs`): probs[:, c] of bags of class c against
    all others (NaN when class c, or every other class, is absent); their mean is the macro AUC."""
    return class_aucs(y, probs)


def class_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, list]:
    """Multi-class extras of bag probabilities (n, C) against labels (n,): per-class one-vs-rest AUC
    and the confusion matrix (rows: true class, columns: predicted; counts of bags)."""
    from sklearn.metrics import confusion_matrix

    n_classes = probs.shape[1]
    cm = confusion_matrix(np.asarray(y), probs.argmax(1), labels=list(range(n_classes))) if len(y) else \
        np.zeros((n_classes, n_classes), np.int64)
    return {"auc_per_class": per_class_auc(y, probs), "confusion": cm.astype(int).tolist()}


def plot_confusion(matrix: np.ndarray, class_names: list[str], out: str | Path, title: str) -> Path:
    """The confusion matrix (rows: true, columns: predicted) as counts, shaded by each row's share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 1.8), dpi=120)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted class", ylabel="true class", title=title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def instance_metrics(fractions: np.ndarray, scores: np.ndarray) -> dict[str, float] | None:
    """AUC and average precision of instance scores against tile labels (annotated fraction > 0.5);
    None when only one kind of tile is present."""
    from sklearn.metrics import average_precision_score

    truth = np.asarray(fractions) > POSITIVE_FRACTION
    if truth.all() or not truth.any():
        return None
    return {"auc": binary_auc(truth, scores), "ap": float(average_precision_score(truth, scores))}


def summarize(values: list[float | None]) -> dict | None:
    """{"mean", "std", "folds"} over folds (std over folds, ddof 0); None when no fold has a value."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
            "folds": [None if v is None or not np.isfinite(v) else float(v) for v in values]}


def plot_roc(folds: list[tuple[np.ndarray, np.ndarray]], out: str | Path, title: str) -> Path:
    """One ROC curve per fold (labels, positive-class probabilities) with its AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for k, (y, p) in enumerate(folds):
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.5, label=f"fold {k}: AUC {binary_auc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def plot_curves(histories: list[list[dict]], out: str | Path, title: str) -> Path:
    """Training loss, validation loss and validation bag AUC per epoch, one line per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for k, hist in enumerate(histories):
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["train_loss"] for h in hist], label=f"fold {k}")
        axes[1].plot(ep, [h["val_loss"] for h in hist], label=f"fold {k}")
        axes[2].plot(ep, [h["val_auc"] for h in hist], label=f"fold {k}")
        best = [h["epoch"] for h in hist if h.get("best")]
        if best:
            axes[1].axvline(best[-1], color=axes[1].lines[-1].get_color(), ls=":", lw=1)
    for ax, name in zip(axes, ("training loss", "validation bag loss", "validation bag AUC")):
        ax.set(xlabel="epoch", title=name)
    axes[2].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
