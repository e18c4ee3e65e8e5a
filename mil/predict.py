"""`mil predict`: a trained run's tile scores and attention, written back into the tile store.

For every slide with complete features of the run's encoder, each fold's model scores the whole
bag (bounded memory: per-instance layers run in chunks) and the folds are averaged:
`slides/<id>/predictions/<name>/instance_score` (the student's positive-class probability, or for
multi-class runs the probability of the predicted bag class) and `attention` (relative to uniform:
1 = the attention every tile would get if it were spread evenly), with the bag probabilities in
the attrs. One slide that fails is reported and skipped.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def predict_bag(models: list, feats, positive: int | None) -> dict[str, Any]:
    """Fold-averaged bag probabilities (C,), instance scores (N,) and relative attention (N,)."""
    import torch

    bag, inst, att = [], [], []
    for model in models:
        out = model.predict_bag(feats)
        p = out.bag_logits.softmax(-1)[0]
        bag.append(p)
        probs = out.instance_logits[0].softmax(-1)
        inst.append(probs[:, positive] if positive is not None else probs[:, int(p.argmax())])
        n_att = out.extras["attended"][0].sum()
        att.append(out.attention[0] * n_att)
    mean = lambda xs: torch.stack(xs).mean(0).float().cpu().numpy()  # noqa: E731
    return {"bag_probs": mean(bag), "instance_score": mean(inst), "attention": mean(att)}


def predict_store(store, run_dir: str | Path, *, slides: list[str] | None = None, name: str | None = None,
                  device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Score the store's slides with every fold of `run_dir`; write predictions/<name> (default: the run
    folder's name). Returns one row per slide: slide_id, status, bag_prob_positive, predicted_class,
    n_tiles, error."""
    import torch
    from tqdm.auto import tqdm

    from wsi.store import StoreError, TileStore, validate_slide_id

    from .checkpoint import load_run
    from .train import resolve_device

    run_dir = Path(run_dir)
    name = name or run_dir.resolve().name
    try:
        validate_slide_id(name)
    except ValueError:
        raise ValueError(f"prediction name {name!r} is not usable in the store; pass --name with letters, "
                         "digits, '.', '_' or '-'") from None
    dev = resolve_device(device)
    config, models = load_run(run_dir, device=str(dev))
    store = store if isinstance(store, TileStore) else TileStore(store)
    encoder, classes = config["encoder"], config["class_names"]
    positive = 1 if len(classes) == 2 else None
    ids = slides or [s for s in store.slide_ids() if store.status(s) == "complete"]
    attrs = {"run_id": config.get("run_id"), "run_dir": str(run_dir.resolve()), "model": config["model"],
             "encoder": encoder, "class_names": classes, "positive_class": config.get("positive_class"),
             "folds": len(models), "w2s": config.get("w2s", False)}
    rows = []
    for sid in tqdm(ids, desc=f"predict {name}", unit="slide", disable=not progress):
        row: dict[str, Any] = {"slide_id": sid, "status": "predicted", "n_tiles": 0, "error": None,
                               "bag_prob_positive": None, "predicted_class": None}
        try:
            if not store.has_features(sid, encoder):
                row.update(status="skipped", error=f"no complete features for {encoder!r}")
                rows.append(row)
                continue
            feats = store.features(sid, encoder)
            if feats.shape[1] != config["in_dim"]:
                raise ValueError(f"features of {encoder!r} are {feats.shape[1]}-d but the run was trained on "
                                 f"{config['in_dim']}-d ones; embed with the run's encoder")
            with torch.inference_mode():
                res = predict_bag(models, torch.from_numpy(feats).to(dev), positive)
            pred = classes[int(np.argmax(res["bag_probs"]))]
            store.write_predictions(sid, name, {"instance_score": res["instance_score"], "attention": res["attention"]},
                                    {**attrs, "bag_probs": [float(v) for v in res["bag_probs"]], "predicted_class": pred,
                                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            row.update(n_tiles=len(feats), predicted_class=pred,
                       bag_prob_positive=float(res["bag_probs"][positive]) if positive is not None else None)
        except (StoreError, ValueError, OSError, RuntimeError) as e:
            row.update(status="failed", error=str(e))
            log.error("%s: %s", sid, e)
        rows.append(row)
    return rows
