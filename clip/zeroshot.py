"""Zero-shot tile classification with prompts, Patho-R1's protocol: a class's vector is the mean of the
L2-normalised text embeddings of every template x synonym, normalised again; a tile's class
probabilities are softmax(logit_scale * image @ W).

CLASSES.json (`read_classes`):

    {"classes": {"normal": ["normal tissue", "benign tissue"], "tumor": ["tumor", "carcinoma"]},
     "templates": ["an H&E image of {}.", "a histopathology tile showing {}."],
     "positive": "tumor"}

Class order is the file's order; "positive" (optional, binary only) moves that class last.
Ground truth (`labels`, a per-tile array of the store) maps to classes so:
- a class-index array (every value an integer): value k is the k-th class;
- a binary fraction array (values in [0, 1], e.g. the tumour fraction of `wsi labels`): positive when
  > 0.5, and the positive class is the LAST of exactly two classes (the first is the negative one).
Tiles whose label is NaN are not scored.
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


def tile_targets(values: np.ndarray, n_classes: int | None, where: str) -> np.ndarray:
    """Per-tile labels -> int64 class indices, -1 where unlabelled (NaN). Integer values are class
    indices; fractions in [0, 1] are binary (1 when > 0.5). `where` names the array in errors."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    y = np.full(len(v), -1, np.int64)
    if not ok.any():
        return y
    if np.all(v[ok] == np.round(v[ok])):
        y[ok] = v[ok].astype(np.int64)
        if y[ok].min() < 0 or (n_classes is not None and y[ok].max() >= n_classes):
            raise LabelsError(f"{where}: class indices {int(y[ok].min())}..{int(y[ok].max())} do not fit the "
                              f"{n_classes} classes; list one class per index in CLASSES.json")
    elif v[ok].min() >= 0 and v[ok].max() <= 1:
        if n_classes not in (None, 2):
            raise LabelsError(f"{where}: binary fraction labels need exactly 2 classes (negative first, "
                              f"positive last), not {n_classes}")
        y[ok] = (v[ok] > 0.5).astype(np.int64)
    else:
        raise LabelsError(f"{where}: labels are neither class indices nor fractions in [0, 1]; "
                          "pass an integer class array or a binary fraction label")
    return y


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


def zeroshot(enc, store: TileStore | str | Path, classes: dict[str, list[str]], templates: Sequence[str],
             slides: Sequence[str] | None = None, labels: str | None = None, run: str | None = None,
             batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Zero-shot class probabilities of every tile of `slides` (default: the store's complete slides).

    run: also write them to `predictions/<run>` of each slide: "probs" (N, C), "predicted" (N,) class
    index and, for two classes, "instance_score" (N,) the probability of the last (positive) class;
    attrs: class_names, positive_class, model, weights, templates, created.
    labels: a per-tile labels array of the store (see the module docstring) -> accuracy, balanced
    accuracy, AUC and per-class counts under "metrics".
    Returns {"model", "data", "config", "metrics"} (`clip.results`: `write_result` writes them) and
    "probs": {slide_id: (N, C) float32 array}, columns in the order of `classes`."""
    from tqdm.auto import tqdm

    if run is not None:
        from wsi.store.meta import validate_name

        try:
            validate_name(run, "prediction")
        except ValueError:
            raise PathmilError(f"prediction name {run!r} is not usable in the store; use letters, digits, "
                               "'.', '_' or '-' (starting with a letter or digit)") from None
    if not isinstance(store, TileStore):
        store = TileStore.open(store, readonly=run is None)
    ids = list(slides) if slides else store.complete_ids()
    names = list(classes)
    truth = {}
    if labels is not None:  # every slide's labels checked before any model time is spent
        for sid in ids:
            vals = store[sid].labels(labels)
            if vals is None:
                raise StoreError(f"{store.path}: slide {sid!r} has no labels {labels!r}; make them with "
                                 f"`wsi labels {store.path} --name {labels}` or leave the slide out")
            truth[sid] = tile_targets(vals, len(names), f"{store.path}: labels {labels!r} of slide {sid!r}")
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
    return {"model": model_identity(enc), "data": {"store": str(store.path), "slides": ids, "n": metrics["n"]},
            "config": {"classes": classes, "templates": list(templates), "labels": labels, "run": run},
            "metrics": metrics, "probs": probs}
