"""`mil`: train dual-level MIL models on a store (or CLAM/TRIDENT h5), predict, draw heatmaps.

Every command is a thin layer over the Python API (`mil.data`, `mil.train`, `mil.predict`,
`mil.heatmap`); imports are deferred to the command that needs them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from wsi.cli_common import command_parser, format_table, run_command

log = logging.getLogger("mil")


def _fmt(s: dict | None) -> str:
    return "-" if not s else f"{s['mean']:.3f} ± {s['std']:.3f}"


def metrics_rows(metrics: list[dict]) -> str:
    """Bag and instance metrics of one or more runs, one row per run."""
    rows = [("model", "w2s", "bag AUC", "bag bal.acc", "inst AUC (student)", "inst AUC (attention)", "inst AP (student)")]
    for m in metrics:
        rows.append((m["model"], "yes" if m["w2s"] else "no", _fmt(m["bag_auc"]), _fmt(m["bag_balanced_accuracy"]),
                     _fmt(m["instance_auc"]), _fmt(m["instance_auc_attention"]), _fmt(m["instance_ap"])))
    return format_table(rows)


def _cmd_train(a: argparse.Namespace) -> int:
    from .data import load_cohort
    from .train import TrainConfig, train_cohort
    from .w2s import W2SConfig

    if (a.store is None) == (a.h5_dir is None):
        log.error("give exactly one of --store STORE or --h5-dir DIR")
        return 2
    try:
        kwargs = json.loads(a.model_kwargs) if a.model_kwargs else {}
    except json.JSONDecodeError as e:
        log.error("--model-kwargs is not JSON (%s); e.g. --model-kwargs '{\"dropout\": 0.1}'", e)
        return 2
    w2s = W2SConfig(enabled=a.w2s, alpha_max=a.w2s_alpha, warmup=a.w2s_warmup, ramp=a.w2s_ramp,
                    reject_below=a.w2s_reject)
    cfg = TrainConfig(model=a.model, model_kwargs=kwargs, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      weight_decay=a.weight_decay, patience=a.patience, max_instances=a.max_instances, seed=a.seed,
                      device=a.device, folds=a.folds, val_fraction=a.val_fraction, w2s=w2s)
    try:
        cohort = load_cohort(a.labels, store=a.store, h5_dir=a.h5_dir, encoder=a.encoder,
                             instance_labels=a.instance_labels, classes=a.classes.split(",") if a.classes else None,
                             positive=a.positive, progress=not a.quiet)
        log.info("%d slides, classes %s (positive: %s), %d-d features of %s", len(cohort.bags),
                 cohort.class_names, cohort.positive_class, cohort.dim, cohort.encoder)
        metrics = train_cohort(cohort, cfg, a.out, instance_labels=a.instance_labels, progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    print(metrics_rows([metrics]))
    print(f"run written to {a.out} (metrics.json, roc.png, curves.png, predictions.csv, fold_*/)")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from wsi.store import StoreError

    from .predict import predict_store

    try:
        rows = predict_store(a.store, a.run, slides=a.slides, name=a.name, device=a.device, progress=not a.quiet)
    except (StoreError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    table = [("slide", "status", "tiles", "p(positive)", "predicted")]
    for r in rows:
        p = r.get("bag_prob_positive")
        table.append((r["slide_id"], r["status"], r.get("n_tiles") or "-", "-" if p is None else f"{p:.3f}",
                      r.get("predicted_class") or r.get("error") or "-"))
    print(format_table(table))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _cmd_heatmap(a: argparse.Namespace) -> int:
    from wsi.store import StoreError

    from .heatmap import write_heatmap

    run = a.name or Path(a.run).name
    failed = 0
    for sid in a.slide:
        try:
            for p in write_heatmap(a.store, sid, a.out, run=run, max_side=a.max_side):
                print(p)
        except (StoreError, ValueError, OSError) as e:
            log.error("%s", e)
            failed += 1
    return 1 if failed else 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models import list_models

    specs = list_models()
    if a.json:
        print(json.dumps([{"name": s.name, "paper": s.paper, "url": s.url, "license": s.license,
                           "description": s.description, "defaults": s.defaults, "w2s_filter": s.w2s_filter}
                          for s in specs], indent=1))
        return 0
    print(format_table([("name", "license", "paper")] + [(s.name, s.license, s.paper) for s in specs]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p, sub = command_parser("mil", "Dual-level multiple-instance learning on a tile store.")

    t = sub.add_parser("train", help="cross-validate a MIL model on slide labels",
                       description="Train on slide labels alone; with --w2s the bag and instance branches correct "
                                   "each other's pseudo-labels. Writes RUN_DIR/metrics.json, roc.png, curves.png, "
                                   "predictions.csv, splits/ and fold_<k>/model.safetensors.")
    src = t.add_argument_group("data")
    src.add_argument("--store", default=None, help="the tile store holding features/<encoder>")
    src.add_argument("--h5-dir", type=Path, default=None, help="a CLAM (h5_files/) or TRIDENT (features_<enc>/) folder")
    src.add_argument("--labels", type=Path, required=True, help="CSV: slide_id,label[,patient_id][,split]")
    src.add_argument("--encoder", required=True, help="which features to use (as given to `wsi embed`)")
    src.add_argument("--instance-labels", default=None, help="tile labels to score instances against (`wsi labels --name`)")
    src.add_argument("--classes", default=None, help="class names in index order, comma-separated (default: sorted, "
                                                     "a negative-sounding name first)")
    src.add_argument("--positive", default=None, help="the positive class of a binary task")
    t.add_argument("--model", default="abmil", help="abmil | clam-sb | dsmil | transmil (see `mil models`)")
    t.add_argument("--model-kwargs", default=None, help="JSON of model hyper-parameters, e.g. '{\"dropout\": 0.1}'")
    t.add_argument("--w2s", action="store_true", help="weak-to-strong pseudo-label correction between the branches")
    t.add_argument("--w2s-alpha", type=float, default=0.75, help="weight of the student's own hardened labels, ramped")
    t.add_argument("--w2s-warmup", type=int, default=3, help="epochs before any correction")
    t.add_argument("--w2s-ramp", type=int, default=5, help="epochs over which the correction ramps up")
    t.add_argument("--w2s-reject", type=float, default=0.1, help="student probability under which instances leave "
                                                                "the bag branch's attention")
    t.add_argument("--folds", type=int, default=5, help="patient-level stratified folds (ignored with a CSV split column)")
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--patience", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=4, help="bags per step (padded, bucketed by size)")
    t.add_argument("--max-instances", type=int, default=None, help="subsample bags larger than this while training")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--out", type=Path, required=True, help="the run folder")
    t.set_defaults(func=_cmd_train)

    pr = sub.add_parser("predict", help="per-tile scores and attention of a run, into the store",
                        description="Writes slides/<id>/predictions/<run> (instance_score, attention; fold average).")
    pr.add_argument("--store", required=True)
    pr.add_argument("--run", type=Path, required=True, help="a `mil train` run folder")
    pr.add_argument("--name", default=None, help="prediction name in the store (default: the run folder's name)")
    pr.add_argument("--slides", nargs="+", default=None, help="only these slide ids")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_cmd_predict)

    h = sub.add_parser("heatmap", help="PNG heatmaps and QuPath GeoJSON of a slide's predictions")
    h.add_argument("--store", required=True)
    h.add_argument("--run", required=True, help="the run folder (or, with --name, any path)")
    h.add_argument("--name", default=None, help="prediction name in the store (default: the run folder's name)")
    h.add_argument("--slide", nargs="+", action="extend", required=True, help="slide id(s); repeatable")
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--max-side", type=int, default=2000, help="long side of the PNG in px")
    h.set_defaults(func=_cmd_heatmap)

    m = sub.add_parser("models", help="the MIL model registry")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
