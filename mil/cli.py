"""`mil`: train dual-level MIL models on a store (or CLAM/TRIDENT h5), predict, draw heatmaps.

Every command is a thin layer over the Python API (`mil.cohort`, `mil.train`, `mil.predict`,
`mil.heatmap`); torch is imported only by the commands that need it. The `mil train` options are made
from the TrainConfig and W2SConfig dataclasses (`wsi.cli_common.add_config_options`), so each default
is written once. Errors a user can cause (PathmilError) end as one line and exit status 2
(`wsi.cli_common.run_command`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from wsi.cli_common import (add_config_options, command_parser, config_from_args, format_table, registry_help,
                            run_command)

log = logging.getLogger("mil")


def _fmt(s: dict | None) -> str:
    return "-" if not s else f"{s['mean']:.3f} ± {s['std']:.3f}"


def metrics_rows(metrics: list[dict]) -> str:
    """Bag and instance metrics of one or more runs, one row per run."""
    rows = [("model", "w2s", "bag AUC", "bag bal.acc", "inst AUC (student)", "inst AUC (attention)",
             "inst AUC (baseline)", "inst AP (student)")]
    for m in metrics:
        rows.append((m["model"], "yes" if m["w2s"] else "no", _fmt(m["bag_auc"]), _fmt(m["bag_balanced_accuracy"]),
                     _fmt(m["instance_auc"]), _fmt(m["instance_auc_attention"]),
                     _fmt(m.get("instance_auc_baseline")), _fmt(m["instance_ap"])))
    return format_table(rows)


def _cmd_train(a: argparse.Namespace) -> int:
    from wsi.errors import CohortError

    from .cohort import load_cohort
    from .config import DataConfig, TrainConfig, W2SConfig
    from .train import train_cohort

    if (a.store is None) == (a.h5_dir is None):
        raise CohortError("give exactly one of --store STORE or --h5-dir DIR")
    cfg = config_from_args(TrainConfig, a, w2s=config_from_args(W2SConfig, a, prefix=W2S_PREFIX))
    data = config_from_args(DataConfig, a)
    cohort = load_cohort(a.labels, store=a.store, h5_dir=a.h5_dir, encoder=a.encoder,
                         instance_labels=a.instance_labels, classes=a.classes.split(",") if a.classes else None,
                         positive=a.positive, progress=not a.quiet, cache_gb=data.cache_gb)
    log.info("%d slides, classes %s (positive: %s), %d-d features of %s", len(cohort.bags),
             cohort.class_names, cohort.positive_class, cohort.dim, cohort.encoder)
    metrics = train_cohort(cohort, cfg, a.out, instance_labels=a.instance_labels, progress=not a.quiet, data=data)
    print(metrics_rows([metrics]))
    if metrics.get("instance_auc_baseline"):
        cost = metrics.get("baseline_seconds") or {}
        print("inst AUC (baseline): an instance classifier trained on the slide label given to every tile (the "
              f"inheritance baseline; {cost.get('mean', float('nan')):.1f} s per fold; --no-baseline skips it)")
    offs = [(k, b[-1]) for k, b in enumerate(metrics.get("w2s_backoff") or []) if b]
    if offs:
        print("w2s feedback backed off (it hurt the validation bag loss): " + "; ".join(
            f"fold {k}: {b['turned_off']} off at epoch {b['epoch']}" for k, b in offs))
    figure = "roc.png" if len(cohort.class_names) == 2 else "confusion.png"
    print(f"run written to {a.out} (metrics.json, {figure}, curves.png, predictions.csv, fold_*/)")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from .predict import predict_store

    rows = predict_store(a.store, a.run, slides=a.slides, name=a.name, device=a.device, progress=not a.quiet)
    table = [("slide", "status", "tiles", "p(positive)", "predicted")]
    for r in rows:
        p = r.get("bag_prob_positive")
        table.append((r["slide_id"], r["status"], r.get("n_tiles") or "-", "-" if p is None else f"{p:.3f}",
                      r.get("predicted_class") or r.get("error") or "-"))
    print(format_table(table))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _cmd_heatmap(a: argparse.Namespace) -> int:
    from wsi.errors import PathmilError
    from wsi.store import TileStore

    from .heatmap import write_heatmap
    from .predict import prediction_name

    run = prediction_name(a.run, a.name)   # the name `mil predict` gave them
    store = TileStore.open(a.store, readonly=True)   # a missing store: one error, not one per slide
    failed = 0
    for sid in a.slide:
        try:
            for p in write_heatmap(store, sid, a.out, run=run, max_side=a.max_side):
                print(p)
        except (PathmilError, ValueError, OSError) as e:   # one slide's problem does not stop the others
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


def _json_object(text: str) -> dict:
    """--model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e}); e.g. --model-kwargs '{{\"dropout\": 0.1}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{text!r} is not a JSON object; e.g. --model-kwargs '{{\"dropout\": 0.1}}'")
    return value


def _model_names() -> str:
    from .models import list_models

    return ", ".join(s.name for s in list_models())


_RegistryHelp = registry_help(models=_model_names)


W2S_PREFIX = "w2s-"   # option --w2s-<field>, dest w2s_<field>
W2S_NAMES = {"alpha_max": "--w2s-alpha", "reject_below": "--w2s-reject"}   # shorter names, as before


def build_parser() -> argparse.ArgumentParser:
    from .config import DataConfig, TrainConfig, W2SConfig

    p, sub = command_parser("mil", "Dual-level multiple-instance learning on a tile store.")

    t = sub.add_parser("train", help="cross-validate a MIL model on slide labels", formatter_class=_RegistryHelp,
                       description="Train on slide labels alone; with --w2s the bag and instance branches correct "
                                   "each other's pseudo-labels. Writes RUN_DIR/metrics.json, roc.png, curves.png, "
                                   "predictions.csv, splits/ and fold_<k>/model.safetensors.")
    src = t.add_argument_group("data")
    src.add_argument("--store", default=None, help="the tile store holding features/<encoder>")
    src.add_argument("--h5-dir", type=Path, default=None, help="a CLAM (h5_files/) or TRIDENT (features_<enc>/) folder")
    src.add_argument("--labels", type=Path, required=True, help="CSV: slide_id,label[,patient_id][,split]")
    src.add_argument("--encoder", required=True, help="which features to use (as given to `wsi embed`)")
    src.add_argument("--instance-labels", default=None,
                     help="tile labels to score instances against (`wsi labels --name`)")
    src.add_argument("--classes", default=None, help="class names in index order, comma-separated (default: sorted, "
                                                     "a negative-sounding name first)")
    src.add_argument("--positive", default=None, help="the positive class of a binary task")
    add_config_options(src, DataConfig)
    add_config_options(t.add_argument_group("training"), TrainConfig, types={"model_kwargs": _json_object},
                       help={"model": "the MIL model: one of {models} (see `mil models`)"})
    w = t.add_argument_group("weak-to-strong correction")
    # TrainConfig's default W2SConfig is off: --w2s turns it on (the dataclass default is the knobs' only home).
    w.add_argument("--w2s", dest="w2s_enabled", action="store_true", default=TrainConfig().w2s.enabled,
                   help="weak-to-strong pseudo-label correction between the branches")
    add_config_options(w, W2SConfig, prefix=W2S_PREFIX, skip=("enabled",), names=W2S_NAMES)
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
