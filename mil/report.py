"""What a `mil train` run leaves besides its models: metrics.json's summary over the folds
(`summarize_run`), and the ROC or confusion picture, the training curves and predictions.csv
(`write_outputs`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import plot_confusion, plot_curves, plot_roc, summarize

if TYPE_CHECKING:
    from .cohort import Cohort
    from .train import FoldResult


def summarize_run(results: list["FoldResult"], config: dict) -> dict[str, Any]:
    """metrics.json: bag metrics and instance metrics as {"mean", "std", "folds"}: the student's
    (instance_auc), the attention's (instance_auc_attention) and, when it ran, the inheritance
    baseline's (instance_auc_baseline, and its cost per fold in baseline_seconds)."""
    m: dict[str, Any] = {"model": config["model"], "w2s": config["w2s"], "positive_class": config["positive_class"],
                         "class_names": config["class_names"], "encoder": config["encoder"],
                         "folds": len(results), "run_id": config["run_id"]}
    for key in ("auc", "accuracy", "balanced_accuracy", "f1"):
        m[f"bag_{key}"] = summarize([r.metrics[key] for r in results])
    for who, suffix in (("student", ""), ("attention", "_attention"), ("baseline", "_baseline")):
        for key in ("auc", "ap"):
            vals = [r.instance[who][key] if r.instance.get(who) else None for r in results]
            m[f"instance_{key}{suffix}"] = summarize(vals)
    m["baseline_seconds"] = summarize([(r.instance.get("baseline") or {}).get("seconds") for r in results])
    names = config["class_names"]
    if len(names) > 2 and all("confusion" in r.metrics for r in results):   # (older runs' folds lack them)
        # bag_auc is the macro one-vs-rest AUC; per class: one-vs-rest AUC; confusion: summed over the
        # folds' test parts (rows: true class, columns: predicted), so it counts every tested slide once.
        m["bag_auc_average"] = "macro one-vs-rest"
        m["bag_auc_per_class"] = {c: summarize([r.metrics["auc_per_class"][i] for r in results])
                                  for i, c in enumerate(names)}
        m["confusion_matrix"] = np.sum([r.metrics["confusion"] for r in results], axis=0).astype(int).tolist()
    m["best_epochs"] = [r.best_epoch for r in results]
    if config.get("w2s"):
        # Per fold: whether the student's feedback (filtering, distillation) was kept, and if not, when and why.
        m["w2s_feedback"] = [bool((r.w2s or {}).get("feedback", True)) for r in results]
        m["w2s_backoff"] = [(r.w2s or {}).get("backoff") for r in results]
    m["instance_labels"] = config.get("instance_labels")
    return m


def write_outputs(out: Path, results: list["FoldResult"], cohort: "Cohort", config: dict) -> None:
    """roc.png (binary) or confusion.png, curves.png and predictions.csv into the run folder."""
    import csv

    title = f"{config['model']}{' + w2s' if config['w2s'] else ''}"
    if len(cohort.class_names) == 2:
        plot_roc([(np.array(r.test_labels), np.array(r.test_probs)[:, 1]) for r in results if r.test_probs],
                 out / "roc.png", f"{title}: test ROC per fold")
    elif all("confusion" in r.metrics for r in results):
        plot_confusion(np.sum([r.metrics["confusion"] for r in results], axis=0), cohort.class_names,
                       out / "confusion.png", f"{title}: test confusion, all folds")
    plot_curves([r.history for r in results], out / "curves.png", title)
    patient = {b.slide_id: b.patient_id for b in cohort.bags}
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "fold", "label", "predicted", *[f"prob_{c}" for c in cohort.class_names]])
        for r in results:
            for sid, y, p in zip(r.test_ids, r.test_labels, r.test_probs):
                w.writerow([sid, patient.get(sid, sid), r.fold, cohort.class_names[y],
                            cohort.class_names[int(np.argmax(p))], *[f"{v:.6f}" for v in p]])
