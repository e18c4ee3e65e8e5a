"""Zero-shot tile classification with prompts, Patho-R1's protocol: a class's vector is the mean of the
L2-normalised text embeddings of every template x synonym, normalised again; a tile's class
probabilities are softmax(logit_scale * image @ W).

CLASSES.json (`read_classes`):

    {"classes": {"normal": ["normal tissue", "benign tissue"], "tumor": ["tumor", "carcinoma"]},
     "templates": ["an H&E image of {}.", "a histopathology tile showing {}."],
     "positive": "tumor"}

Class order is the file's order; "positive" (binary only) moves that class last.
Ground truth (`labels`, a per-tile array of the store) maps to classes as `wsi.tile_classes` says:
a class-index array (value k is the k-th class), or a binary fraction array (e.g. the tumour fraction
of `wsi labels`), positive when > 0.5. Scoring a fraction needs "positive": without it the file's
order alone would decide which class a fraction > 0.5 is, and {"tumor": ..., "normal": ...} would
invert every score. Tiles whose label is NaN are not scored.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from wsi.errors import LabelsError, PathmilError, StoreError
from wsi.store import TileStore
from wsi.tile_classes import class_indices, is_fraction

from .embedding import embed_tiles, model_device, place
from .results import model_identity


def class_vectors(enc, classes: dict[str, list[str]], templates: Sequence[str]) -> torch.Tensor:
    """(E, C) zero-shot weights, columns in the order of `classes`, on the encoder's device.

    open_clip's `build_zero_shot_classifier` averages the normalised embeddings of a class's texts and
    normalises the mean; each class is passed as one class name whose templates are all its template x
    synonym texts, so the mean runs over every (template, synonym) pair, as Patho-R1 (and CONCH) do,
    rather than over per-synonym means."""
    from open_clip import build_zero_shot_classifier

    cols = []
    for name, synonyms in classes.items():
        prompts = [(lambda _c, t=t, s=s: t.format(s)) for t in templates for s in synonyms]
        cols.append(build_zero_shot_classifier(enc, enc.tokenize, [name], prompts, num_classes_per_batch=None,
                                               device=model_device(enc)))
    return torch.cat(cols, dim=1).float()


def read_classes(path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """CLASSES.json -> (classes {name: [synonyms]}, templates), checked; LabelsError (one line) when not usable."""
    fix = ('expected {"classes": {"tumor": ["tumor", "carcinoma"], "normal": ["normal tissue"]}, '
           '"templates": ["an H&E image of {}."]}')
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LabelsError(f"{path}: cannot read the classes file ({type(e).__name__}: {e}); {fix}") from None
    classes, templates = (doc.get("classes"), doc.get("templates")) if isinstance(doc, dict) else (None, None)
    if not isinstance(classes, dict) or len(classes) < 2:
        raise LabelsError(f"{path}: 'classes' must map at least two class names to lists of synonyms; {fix}")
    for name, syn in classes.items():
        if isinstance(syn, str):
            syn = classes[name] = [syn]
        if not isinstance(syn, list) or not syn or not all(isinstance(s, str) and s.strip() for s in syn):
            raise LabelsError(f"{path}: class {name!r} needs a non-empty list of synonym strings; {fix}")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise LabelsError(f"{path}: 'templates' must be a non-empty list of strings; {fix}")
    bad = [t for t in templates if t.count("{}") != 1 or "{" in t.replace("{}", "", 1)]
    if bad:
        raise LabelsError(f"{path}: template {bad[0]!r} must hold exactly one {{}} (where the class name goes)")
    positive = doc.get("positive")
    if positive is not None:
        if len(classes) != 2 or positive not in classes:
            raise LabelsError(f"{path}: 'positive' must name one of exactly two classes, got {positive!r}")
        classes = {**{k: v for k, v in classes.items() if k != positive}, positive: classes[positive]}
    return {k: list(v) for k, v in classes.items()}, list(templates)


tile_targets = class_indices   # per-tile labels -> class indices (-1 unlabelled); see wsi.tile_classes


def read_positive(path: str | Path) -> str | None:
    """The "positive" class a CLASSES.json names (None when it names none); read_classes checks it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("positive") if isinstance(doc, dict) and isinstance(doc.get("positive"), str) else None


def _auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUC of the last class; else macro one-vs-rest over the classes present (None: < 2 present)."""
    from wsi.metrics import macro_auc

    auc = macro_auc(y, probs)
    return None if np.isnan(auc) else auc


def zeroshot_metrics(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC and per-class counts of probabilities (N, C) against class
    indices (N,), labelled tiles only (y >= 0)."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    keep = y >= 0
    y, probs = y[keep], probs[keep]
    pred = probs.argmax(1)
    per_class = {}
    for c, name in enumerate(class_names):
        n, correct = int((y == c).sum()), int(((y == c) & (pred == c)).sum())
        per_class[name] = {"n": n, "predicted": int((pred == c).sum()), "correct": correct,
                           "recall": correct / n if n else None}
    if not len(y):
        return {"n_labelled": 0, "accuracy": None, "balanced_accuracy": None, "auc": None, "per_class": per_class}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's note on classes predicted but absent from y
        bal = balanced_accuracy_score(y, pred)
    return {"n_labelled": int(len(y)), "accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(bal),
            "auc": _auc(y, probs), "per_class": per_class}


def _binary_order(classes: dict[str, list[str]], positive: str | None, fractions: bool, where: str
                  ) -> dict[str, list[str]]:
    """`classes` with `positive` last; fraction labels without a positive class are refused."""
    if positive is not None:
        if len(classes) != 2 or positive not in classes:
            raise LabelsError(f"{where}: 'positive' must name one of exactly two classes "
                              f"({', '.join(classes)}), got {positive!r}")
        return {**{k: v for k, v in classes.items() if k != positive}, positive: classes[positive]}
    if fractions and len(classes) == 2:   # other counts: class_indices says fractions need two classes
        raise LabelsError(f"{where}: the labels are fractions, so one of the classes ({', '.join(classes)}) must be "
                          f'named positive; add "positive": "<the class a fraction > 0.5 is>" to the classes file')
    return classes


def _check_name(store: TileStore, run: str, ids: Sequence[str], overwrite: bool) -> None:
    from wsi.store.meta import validate_name

    try:
        validate_name(run, "prediction")
    except ValueError:
        raise PathmilError(f"prediction name {run!r} is not usable in the store; use letters, digits, "
                           "'.', '_' or '-' (starting with a letter or digit)") from None
    taken = [s for s in ids if run in store[s].prediction_names()]
    if taken and not overwrite:
        raise StoreError(f"{store.path}: slide {taken[0]!r} already has predictions {run!r} ({len(taken)} slides); "
                         "pass --overwrite to replace them, or another --name")


def zeroshot(enc, store: TileStore | str | Path, classes: dict[str, list[str]], templates: Sequence[str],
             slides: Sequence[str] | None = None, labels: str | None = None, run: str | None = None,
             batch_size: int = 64, device: str = "auto", progress: bool = True, *, positive: str | None = None,
             classes_file: str | Path | None = None, overwrite: bool = False,
             include_training: bool = False) -> dict[str, Any]:
    """Zero-shot class probabilities of every tile of `slides` (default: the store's complete slides),
    less the slides the model's run was trained on (`clip.heldout`; `include_training` keeps them).

    positive: the positive class of two (moved last); needed to score fraction labels.
    classes_file: where `classes` came from, for messages.
    run: also write them to `predictions/<run>` of each slide: "probs" (N, C), "predicted" (N,) class
    index and, for two classes, "instance_score" (N,) the probability of the last (positive) class;
    attrs: class_names, positive_class, model, weights, templates, created. Predictions a slide
    already has under that name are replaced only with `overwrite`.
    labels: a per-tile labels array of the store (see the module docstring) -> accuracy, balanced
    accuracy, AUC and per-class counts under "metrics".
    Returns {"model", "data", "config", "metrics"} (`clip.results`: `write_result` writes them) and
    "probs": {slide_id: (N, C) float32 array}, columns in the order of `classes`."""
    from tqdm.auto import tqdm

    from .heldout import leave_out_training

    if not isinstance(store, TileStore):
        store = TileStore.open(store, readonly=run is None)
    asked = list(slides) if slides else store.complete_ids()
    ids, held = leave_out_training(enc, asked, include_training)
    if not ids:
        raise PathmilError(f"{store.path}: every slide asked for was a training slide of {held['run']}; pass "
                           "held-out slides with --slides, or --include-training-slides")
    if run is not None:
        _check_name(store, run, ids, overwrite)
    values = {}
    if labels is not None:  # every slide's labels checked before any model time is spent
        for sid in ids:
            values[sid] = store[sid].labels(labels)
            if values[sid] is None:
                raise StoreError(f"{store.path}: slide {sid!r} has no labels {labels!r}; make them with "
                                 f"`wsi labels {store.path} --name {labels}` or leave the slide out")
    fractions = any(is_fraction(v) for v in values.values())
    classes = _binary_order(classes, positive, fractions, str(classes_file or "CLASSES.json"))
    names = list(classes)
    truth = {sid: tile_targets(v, len(names), f"{store.path}: labels {labels!r} of slide {sid!r}")
             for sid, v in values.items()}
    dev = place(enc, device)
    with torch.inference_mode():
        w = class_vectors(enc, classes, templates).cpu().numpy()
        scale = float(enc.logit_scale)
    attrs = {"task": "zeroshot", "class_names": names, "positive_class": names[-1] if len(names) == 2 else None,
             "model": enc.spec.name, "weights": enc.weights, "templates": list(templates),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    probs: dict[str, np.ndarray] = {}
    for sid in tqdm(ids, desc="zero-shot", unit="slide", disable=not progress):
        n = store[sid].n_tiles
        p = np.zeros((0, len(names)), np.float32)
        if n:
            img = embed_tiles(enc, store, [(sid, i) for i in range(n)], batch_size, dev, progress=False)
            p = torch.softmax(torch.from_numpy(scale * img @ w), dim=1).numpy().astype(np.float32)
        probs[sid] = p
        if run is not None:
            arrays = {"probs": p, "predicted": p.argmax(1)}
            if len(names) == 2:
                arrays["instance_score"] = p[:, 1]
            store[sid].write_predictions(run, arrays, attrs)
    all_p = np.concatenate([probs[s] for s in ids]) if ids else np.zeros((0, len(names)), np.float32)
    pred = all_p.argmax(1) if len(all_p) else np.zeros(0, np.int64)
    metrics: dict[str, Any] = {"n": int(len(all_p)),
                               "predicted": {c: int((pred == k).sum()) for k, c in enumerate(names)}}
    if labels is not None:
        y = np.concatenate([truth[s] for s in ids]) if ids else np.zeros(0, np.int64)
        metrics.update(zeroshot_metrics(y, all_p, names))
    return {"model": model_identity(enc), "data": {"store": str(store.path), "slides": ids, "n": metrics["n"],
                                                   "training_slides": held},
            "config": {"classes": classes, "templates": list(templates), "labels": labels, "run": run,
                       "positive": names[-1] if len(names) == 2 and (positive or fractions) else None},
            "metrics": metrics, "probs": probs}
