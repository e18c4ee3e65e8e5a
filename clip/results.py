"""One machine-readable schema for the result files of `clip zeroshot`, `clip retrieve` and `clip probe`.

    {
      "schema": "pathmil.clip.result/1",
      "task": "zeroshot" | "retrieval" | "probe",
      "model": {"name": "pathoclip-lite", "weights": "<file, hub id, pathoclip:RUN_DIR or random-init>",
                "digest": "<Encoder.digest(): 16 hex digits, or null>"},
      "data": {"store": "<path or null>", "slides": ["<slide id>", ...], "n": <tiles or images scored>, ...},
      "config": {...the task's settings: classes and templates, ks, shots, seed, split...},
      "metrics": {...see below...},
      "created": "2025-01-01T12:00:00+00:00",
      "pathmil_version": "0.x"
    }

`zeroshot`, `retrieve` and `probe` return dicts with these "model", "data", "config" and "metrics"
keys, so `write_result(path, task, returned)` writes the file. Per task:
- zeroshot: data {"store", "slides", "n": tiles, "training_slides"}; config {"classes": {class:
  [synonyms]}, "templates", "labels", "run", "positive"}.
- retrieval: data {"store", "captions": CSV or null, "slides": slides of the tile images, "n":
  images, "n_texts", "training_slides"}; config {"ks"}.
- probe: model {"name": the embed encoder name, "weights", "digest": of the cached features};
  data {"store", "slides", "train_slides", "test_slides", "n": labelled tiles, "training_slides"};
  config {"labels", "shots", "n_subsets", "seed", "split": "given" | "seeded", "test_fraction",
  "split_seed", "by_patient"}.
"training_slides" (`clip.heldout`): {"run": the evaluated RUN_DIR or null, "excluded": the run's
training slides left out, "included": those kept with --include-training-slides}.

Metrics per task (every score is a fraction in [0, 1]; a value that is undefined, such as an AUC with
one class present, is null):
- zeroshot: {"n": tiles scored, "predicted": {class: tiles}}; with labels also "n_labelled",
  "accuracy", "balanced_accuracy", "auc" (binary: of the positive = last class; else macro one-vs-rest
  over the classes present) and "per_class": {class: {"n": true tiles, "predicted": tiles, "correct":
  tiles, "recall": fraction or null}}.
- retrieval: {"image_to_text": {"R@1": r, "R@5": r, ...}, "text_to_image": {...}, "mean_recall": mean
  of all R@k both ways (Patho-R1's summary), "n_images", "n_texts"}.
- probe: {"shots": {"<k>": {"accuracy": {"mean", "std", "values"}, "balanced_accuracy": {...}}},
  "skipped": {"<k>": reason}, "n_subsets", "seed", "n_train", "n_test", "classes": {class: {"train":
  tiles, "test": tiles}}}; std over the subsets, ddof 0.

Files are written atomically (`wsi.runtime.atomic_write_text`), as strict JSON (NaN becomes null).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsi.errors import PathmilError
from wsi.runtime import atomic_write_text, package_version

SCHEMA = "pathmil.clip.result/1"
TASKS = ("zeroshot", "retrieval", "probe")
KEYS = ("schema", "task", "model", "data", "config", "metrics", "created", "pathmil_version")


def jsonable(obj: Any) -> Any:
    """Plain JSON values from numpy scalars / arrays, tuples, paths; NaN and infinities become None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def model_identity(enc, name: str | None = None) -> dict[str, Any]:
    """{"name", "weights", "digest"} of a built Encoder; `name` overrides the spec's (e.g. the RUN_DIR)."""
    return {"name": name or enc.spec.name, "weights": enc.weights, "digest": enc.digest()}


def make_result(task: str, model: dict[str, Any], data: dict[str, Any], metrics: dict[str, Any],
                config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result document (see the module docstring), as plain JSON values."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return jsonable({"schema": SCHEMA, "task": task, "model": dict(model), "data": dict(data),
                     "config": dict(config or {}), "metrics": dict(metrics),
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "pathmil_version": package_version()})


def write_result(path: str | Path, task: str, result: dict[str, Any]) -> Path:
    """Write what `zeroshot`, `retrieve` or `probe` returned (its "model", "data", "config" and
    "metrics"; anything else, such as zero-shot's per-tile "probs", stays out) as a result file,
    atomically; returns its path. The parent folder is created."""
    missing = [k for k in ("model", "data", "metrics") if k not in result]
    if missing:
        raise ValueError(f"a {task} result needs {', '.join(missing)}")
    doc = make_result(task, result["model"], result["data"], result["metrics"], result.get("config"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_result(path: str | Path) -> dict[str, Any]:
    """A result file, checked against the schema; PathmilError (one line) when it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PathmilError(f"{path}: cannot read it as a JSON result file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise PathmilError(f"{path}: not a {SCHEMA} result file; write it with `clip zeroshot|retrieve|probe --out`")
    missing = [k for k in KEYS if k not in doc]
    if missing or doc["task"] not in TASKS:
        raise PathmilError(f"{path}: a damaged result file (missing {', '.join(missing) or 'a valid task'}); "
                           "run the evaluation again")
    return doc
