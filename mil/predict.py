"""`mil predict`: a trained run's tile scores and attention, written back into the tile store.

For every slide with complete features of the run's encoder, each fold's model scores the whole
bag (bounded memory: per-instance layers run in chunks) and the folds are averaged into
`slides/<id>/predictions/<name>/`:

    instance_score  (N,) float32  the student's positive-class probability (multi-class runs: the
                                  probability of the class predicted for the bag)
    attention       (N,) float32  attention * N: 1 = what every tile would get if attention were
                                  spread evenly (so the mean over the slide is 1; tiles a --w2s run
                                  leaves out of the bag branch get 0)
    class_scores    (N, C) float32  multi-class runs only: the student's probability of each class,
                                  columns in the order of the attrs' `class_names` (rows sum to 1)

with the bag probabilities (`bag_probs`, one per class, in `class_names` order), predicted class and the
run's identity in the group's attrs. Binary runs write exactly the first two arrays. A slide
without features is skipped and one that fails is reported; neither stops the others.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def positive_index(config: dict[str, Any]) -> int | None:
    """Index of the positive class in a binary run (1 unless config names another); None if multi-class."""
    classes = config.get("class_names") or []
    if int(config.get("n_classes", len(classes))) != 2:
        return None
    pos = config.get("positive_class")
    return classes.index(pos) if pos in classes else 1


def predict_bag(models: list, feats, positive: int | None) -> dict[str, np.ndarray]:
    """Fold-averaged bag probabilities (C,), instance scores (N,) and relative attention (N,) of one
    bag `feats` (N, D) tensor; multi-class (`positive` None): also `class_scores` (N, C)."""
    import torch

    bag, inst, att = [], [], []
    n = feats.shape[0]
    for model in models:
        out = model.predict_bag(feats)
        bag.append(out.bag_logits[0].float().softmax(-1))
        inst.append(out.instance_logits[0].float().softmax(-1))   # (N, C)
        att.append(out.attention[0].float() * n)
    bag_probs = torch.stack(bag).mean(0)
    # Multi-class: every fold scores the same class, the one the averaged bag probabilities predict.
    col = positive if positive is not None else int(bag_probs.argmax())
    score = torch.stack([p[:, col] for p in inst]).mean(0)
    as_np = lambda t: t.cpu().numpy().astype(np.float32)  # noqa: E731
    res = {"bag_probs": as_np(bag_probs), "instance_score": as_np(score), "attention": as_np(torch.stack(att).mean(0))}
    if positive is None:
        res["class_scores"] = as_np(torch.stack(inst).mean(0))
    return res


def prediction_name(run_dir: str | Path, name: str | None = None) -> str:
    """The store name of a run's predictions: `name`, else the run folder's name, taken after resolving
    the path (`--run .` names the current folder, not "")."""
    return name or Path(run_dir).resolve().name


def predict_store(store, run_dir: str | Path, *, slides: list[str] | None = None, name: str | None = None,
                  device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Score the store's slides (default: every complete one) with every fold of `run_dir` and write
    `predictions/<name>` (default name: the run folder's name). `store` is a TileStore or the path of
    an existing one (a missing store is a StoreError; nothing is created). Returns one row per slide:
    slide_id, status (predicted | skipped | failed), bag_prob_positive, predicted_class, n_tiles, error."""
    from wsi.runtime import large_frees_to_os

    # Large bags run in chunks whose freed buffers glibc would otherwise keep: returned to the OS,
    # within this call only.
    with large_frees_to_os():
        return _predict_store(store, Path(run_dir), slides, name, device, progress)


def _predict_store(store, run_dir: Path, slides: list[str] | None, name: str | None, device: str,
                   progress: bool) -> list[dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm

    from wsi.errors import PathmilError, RunError
    from wsi.runtime import resolve_device
    from wsi.store import COMPLETE, TileStore, validate_name

    from .checkpoint import load_run

    name = prediction_name(run_dir, name)
    try:
        validate_name(name, "prediction")
    except ValueError:
        raise RunError(f"prediction name {name!r} is not usable in the store; pass --name with letters, "
                       "digits, '.', '_' or '-' (starting with a letter or digit)") from None
    store = store if isinstance(store, TileStore) else TileStore.open(store)
    dev = resolve_device(device)
    config, models = load_run(run_dir, device=str(dev))
    encoder, classes = config["encoder"], list(config["class_names"])
    positive = positive_index(config)
    if positive is None and config.get("negative_class") in classes:   # "not tumour" for --w2s filtering
        for m in models:
            m.negative_index = classes.index(config["negative_class"])
    ids = list(slides) if slides else store.complete_ids()
    attrs = {"run_id": config.get("run_id"), "run_dir": str(run_dir.resolve()), "model": config["model"],
             "encoder": encoder, "class_names": classes, "positive_class": config.get("positive_class"),
             "folds": len(models), "w2s": bool(config.get("w2s", False))}
    rows = []
    for sid in tqdm(ids, desc=f"predict {name}", unit="slide", disable=not progress):
        row: dict[str, Any] = {"slide_id": sid, "status": "predicted", "bag_prob_positive": None,
                               "predicted_class": None, "n_tiles": 0, "error": None}
        rows.append(row)
        try:
            status = store.status(sid)
            view = store[sid] if status is not None else None
            skip = ("not in the store" if view is None else
                    f"slide status is {status!r}, not complete" if status != COMPLETE else
                    None if view.has_features(encoder) else
                    f"no complete features for {encoder!r} (run `wsi embed {store.path} --encoder {encoder}`)")
            if skip:
                row.update(status="skipped", error=skip)
                log.warning("%s: skipped, %s", sid, skip)
                continue
            feats = view.features(encoder, dtype=np.float32)
            if feats.ndim != 2 or feats.shape[1] != config["in_dim"]:
                raise RunError(f"features {encoder!r} are {feats.shape[-1]}-d but run {run_dir} was trained on "
                               f"{config['in_dim']}-d ones: an encoder mismatch; embed with the run's encoder")
            if len(feats) == 0:
                raise RunError("no tiles to score")
            res = predict_bag(models, torch.from_numpy(feats).to(dev), positive)
            pred = classes[int(np.argmax(res["bag_probs"]))]
            arrays = {k: res[k] for k in ("instance_score", "attention", "class_scores") if k in res}
            view.write_predictions(name, arrays,
                                   {**attrs, "bag_probs": [float(v) for v in res["bag_probs"]],
                                    "predicted_class": pred,
                                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            row.update(n_tiles=len(feats), predicted_class=pred,
                       bag_prob_positive=float(res["bag_probs"][positive]) if positive is not None else None)
        except (PathmilError, ValueError, OSError, RuntimeError) as e:
            row.update(status="failed", error=str(e))
            log.error("%s: %s", sid, e)
    return rows
