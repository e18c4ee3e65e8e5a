"""Training and cross-validation of a dual-level MIL model: the API behind `mil train`.

One fold: AdamW + cosine schedule over padded mini-batches, early stopping on the validation bag
loss, the best epoch's weights kept, then the test part scored. A run: every fold, then
RUN_DIR/metrics.json, roc.png, curves.png, predictions.csv, splits/ and fold_<k>/ (weights as
safetensors and the fold's results as JSON). A fold whose results are on disk is not trained again,
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsi.errors import RunError
from wsi.runtime import (atomic_write_json, deterministic, large_frees_to_os, package_version, resolve_device,
                         seed_everything)

from .batching import BagBatcher
from .checkpoint import check_resume, save_config, save_fold_model
from .cohort import Bag, Cohort, name_ids
from .config import TrainConfig, W2SConfig
from .metrics import bag_metrics, instance_metrics, plot_curves, plot_roc, summarize
from .models import create_model, get_spec
from .splits import Split, make_splits, write_splits
from .w2s import distill_loss, positive_logit, student_loss

__all__ = ["TrainConfig", "W2SConfig", "FoldResult", "train_cohort", "train_fold", "train_epoch", "evaluate",
           "run_config", "summarize_run"]

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    history: list[dict]
    test_ids: list[str]
    test_labels: list[int]
    test_probs: list[list[float]]
    metrics: dict[str, float]
    instance: dict[str, dict | None]   # {"student": {...}, "attention": {...}} or Nones

    def to_json(self) -> dict:
        return asdict(self)


def forward(model, x: torch.Tensor, mask: torch.Tensor, w2s: W2SConfig, feedback: bool):
    """The model's outputs and the instances its bag branch attended to. With feedback on, the
    instances the student confidently rejects are masked out of the bag branch first."""
    model.reject_below = w2s.reject_below if feedback else None
    model.min_keep = w2s.min_keep
    out = model(x, mask)
    return out, out.extras["attended"]


def batch_losses(model, out, attended, batch, cfg: TrainConfig, epoch: int, binary: bool) -> dict[str, torch.Tensor]:
    y = batch.y
    terms = {"bag": F.cross_entropy(out.bag_logits, y)}
    extra = model.extra_loss(out, y)
    if extra.requires_grad or extra.item() != 0:
        terms["extra"] = cfg.extra_weight * extra
    if binary:
        w = cfg.w2s
        ramp = w.ramp_at(epoch)
        terms["instance"] = w.instance_weight * student_loss(out.instance_logits, out.attention, batch.mask, y,
                                                              w.alpha_max * ramp, w.fp_rate)
        if ramp > 0 and w.distill_weight > 0:
            terms["distill"] = w.distill_weight * ramp * distill_loss(out.attention, out.instance_logits, attended, y)
    return terms


def train_epoch(model, batcher: BagBatcher, opt, sched, cfg: TrainConfig, epoch: int, binary: bool,
                device: torch.device) -> dict[str, float]:
    """One pass over the training bags; returns the mean of each loss term."""
    model.train()
    feedback = cfg.w2s.feedback_on(epoch)
    sums: dict[str, float] = {}
    for batch in batcher:
        x, mask = batch.x.to(device, non_blocking=True), batch.mask.to(device, non_blocking=True)
        batch.y, batch.mask = batch.y.to(device), mask
        out, attended = forward(model, x, mask, cfg.w2s, feedback)
        terms = batch_losses(model, out, attended, batch, cfg, epoch, binary)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() / len(batcher)
    return sums


@torch.no_grad()
def evaluate(model, bags: list[Bag], cfg: TrainConfig, device: torch.device, feedback: bool) -> dict[str, Any]:
    """Bag probabilities and loss, and per bag the student's instance probabilities and the attention
    relative to uniform (attention x attended count), in the order of `bags`."""
    model.eval()
    n = len(bags)
    probs: list = [None] * n
    inst: list = [None] * n
    att: list = [None] * n
    loss = 0.0
    for batch in BagBatcher(bags, cfg.batch_size, shuffle=False):
        x, mask, y = batch.x.to(device), batch.mask.to(device), batch.y.to(device)
        out, attended = forward(model, x, mask, cfg.w2s, feedback)
        loss += F.cross_entropy(out.bag_logits, y, reduction="sum").item()
        p = out.bag_logits.softmax(-1).cpu().numpy()
        if out.instance_logits.shape[-1] == 2:
            s = torch.sigmoid(positive_logit(out.instance_logits)).cpu().numpy()
        else:
            s = out.instance_logits.softmax(-1).amax(-1).cpu().numpy()
        a = (out.attention * attended.sum(1, keepdim=True)).cpu().numpy()
        for row, i in enumerate(batch.index):
            m = batch.mask[row].numpy()
            probs[i], inst[i], att[i] = p[row], s[row][m], a[row][m]
    return {"probs": np.stack(probs) if n else np.zeros((0, 2)), "loss": loss / max(n, 1),
            "instance": inst, "attention": att}


def _instance_eval(bags: list[Bag], ev: dict) -> dict[str, dict | None]:
    have = [i for i, b in enumerate(bags) if b.instance_labels is not None]
    if not have:
        return {"student": None, "attention": None}
    truth = np.concatenate([bags[i].instance_labels for i in have])
    return {"student": instance_metrics(truth, np.concatenate([ev["instance"][i] for i in have])),
            "attention": instance_metrics(truth, np.concatenate([ev["attention"][i] for i in have]))}


def train_fold(cohort: Cohort, split: Split, cfg: TrainConfig, *, progress: bool = True) -> tuple[Any, FoldResult]:
    """Train one fold; returns the model at its best validation epoch and the fold's test results.

    Deterministic torch kernels and glibc's return of large freed blocks apply inside this call only,
    not to the rest of the process."""
    cfg.validate()
    with deterministic(), large_frees_to_os():
        return _train_fold(cohort, split, cfg, progress)


def _train_fold(cohort: Cohort, split: Split, cfg: TrainConfig, progress: bool) -> tuple[Any, FoldResult]:
    from tqdm.auto import tqdm

    seed_everything(cfg.seed + split.fold)
    device = resolve_device(cfg.device)
    binary = len(cohort.class_names) == 2
    model = create_model(cfg.model, cohort.dim, len(cohort.class_names), **cfg.model_kwargs).to(device)
    train_bags = [cohort.bags[i] for i in split.train]
    val_bags = [cohort.bags[i] for i in split.val]
    batcher = BagBatcher(train_bags, cfg.batch_size, max_instances=cfg.max_instances, shuffle=True,
                         seed=cfg.seed + split.fold)
    if cfg.w2s.enabled:
        cfg = replace(cfg, w2s=cfg.w2s.scaled(len(batcher), cfg.epochs))
        log.debug("fold %d: w2s warm-up %d epochs, ramp %d", split.fold, cfg.w2s.warmup, cfg.w2s.ramp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(batcher)))
    history: list[dict] = []
    best_loss, best_state, best_epoch, stale = float("inf"), None, -1, 0
    bar = tqdm(range(cfg.epochs), desc=f"fold {split.fold}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        sums = train_epoch(model, batcher, opt, sched, cfg, epoch, binary, device)
        row = {"epoch": epoch, "train_loss": sum(sums.values()), **{f"loss_{k}": v for k, v in sums.items()}}
        if val_bags:
            ev = evaluate(model, val_bags, cfg, device, cfg.w2s.feedback_on(epoch))
            row["val_loss"] = ev["loss"]
            row["val_auc"] = bag_metrics(np.array([b.label for b in val_bags]), ev["probs"])["auc"]
        else:
            row["val_loss"], row["val_auc"] = row["train_loss"], float("nan")
        eligible = epoch >= cfg.first_eligible_epoch() or epoch == cfg.epochs - 1
        if eligible and row["val_loss"] < best_loss:   # a NaN loss is never better
            best_loss, best_epoch, stale = row["val_loss"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif eligible:
            stale += 1
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
        if stale >= cfg.patience:
            break
    if best_state is None:
        raise RunError(_no_best_epoch(split.fold, history, train_bags + val_bags, cfg, bool(val_bags)))
    for h in history:
        h["best"] = h["epoch"] == best_epoch
    model.load_state_dict(best_state)
    test_bags = [cohort.bags[i] for i in split.test]
    ev = evaluate(model, test_bags, cfg, device, cfg.w2s.feedback_on(best_epoch))
    labels = [b.label for b in test_bags]
    result = FoldResult(fold=split.fold, best_epoch=best_epoch, history=history,
                        test_ids=[b.slide_id for b in test_bags], test_labels=labels,
                        test_probs=ev["probs"].tolist(), metrics=bag_metrics(np.array(labels), ev["probs"]),
                        instance=_instance_eval(test_bags, ev) if binary else {"student": None, "attention": None})
    return model, result


def _no_best_epoch(fold: int, history: list[dict], bags: list[Bag], cfg: TrainConfig, has_val: bool) -> str:
    """Why a fold has no best epoch (every eligible validation loss was NaN or infinite), and what to do."""
    which = "validation" if has_val else "training (no validation part)"
    losses = ", ".join(f"{h['val_loss']:.3g}" for h in history[-3:])
    bad = [b.slide_id for b in bags if not np.isfinite(b.features).all()]
    feats = (f"re-embed the {len(bad)} of the fold's {len(bags)} training and validation slides whose features "
             f"hold NaN or infinite values ({name_ids(bad)})" if bad else "check the features")
    return (f"fold {fold}: no epoch gave a finite {which} loss (last: {losses}); the training diverged or the "
            f"inputs are broken: lower the learning rate (--lr, now {cfg.lr:g}) or {feats}")


def run_config(cohort: Cohort, cfg: TrainConfig, instance_labels: str | None) -> dict[str, Any]:
    """The RUN_DIR/config.json of a run: what `mil predict` needs to rebuild its models, the settings,
    and what the run was trained on (`data`: the labels CSV's and the features' digests)."""
    return {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "in_dim": cohort.dim,
            "n_classes": len(cohort.class_names), "class_names": cohort.class_names,
            "positive_class": cohort.positive_class, "encoder": cohort.encoder, "w2s": cfg.w2s.enabled,
            "w2s_params": cfg.w2s.to_dict(), "folds": cfg.folds, "instance_labels": instance_labels,
            "source": cohort.source, "seed": cfg.seed, "pathmil_version": package_version(),
            "train": {k: v for k, v in asdict(cfg).items() if k not in ("w2s", "model", "model_kwargs")},
            "data": cohort.fingerprint()}


def train_cohort(cohort: Cohort, cfg: TrainConfig, out_dir: str | Path, *, instance_labels: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Cross-validate `cfg.model` on `cohort`; write the run to `out_dir` and return metrics.json's content.
    A folder holding the same run (same settings, same labels and features) is resumed."""
    cfg.validate()
    if cfg.w2s.enabled and len(cohort.class_names) != 2:
        raise RunError(f"--w2s needs a binary task (a negative and a positive class); this cohort has "
                       f"{len(cohort.class_names)} classes: {', '.join(cohort.class_names)}")
    get_spec(cfg.model)  # unknown model: error listing the choices, before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(cohort, cfg, instance_labels)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{cfg_path}: not valid JSON ({e}); choose a new --out, or delete the folder") from None
        check_resume(out, old, config)
        config["run_id"], config["created"] = old.get("run_id"), old.get("created")
    else:
        config["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        config["run_id"] = f"{out.resolve().name}-{config['created']}"
    save_config(out, config)
    splits = make_splits(cohort, cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.seed)
    write_splits(cohort, splits, out)
    results: list[FoldResult] = []
    for split in splits:
        done = out / f"fold_{split.fold}" / "result.json"
        if done.exists() and (out / f"fold_{split.fold}" / "model.safetensors").exists():
            log.info("fold %d already trained; skipped (delete %s to redo it)", split.fold, done.parent)
            results.append(FoldResult(**json.loads(done.read_text())))
            continue
        model, res = train_fold(cohort, split, cfg, progress=progress)
        save_fold_model(out, split.fold, model.cpu())
        atomic_write_json(done, res.to_json())
        results.append(res)
        log.info("fold %d: best epoch %d, test bag AUC %.3f", split.fold, res.best_epoch, res.metrics["auc"])
    metrics = summarize_run(results, config)
    atomic_write_json(out / "metrics.json", metrics)
    _write_outputs(out, results, cohort, config)
    return metrics


def summarize_run(results: list[FoldResult], config: dict) -> dict[str, Any]:
    """metrics.json: bag metrics and instance metrics as {"mean", "std", "folds"}."""
    m: dict[str, Any] = {"model": config["model"], "w2s": config["w2s"], "positive_class": config["positive_class"],
                         "class_names": config["class_names"], "encoder": config["encoder"],
                         "folds": len(results), "run_id": config["run_id"]}
    for key in ("auc", "accuracy", "balanced_accuracy", "f1"):
        m[f"bag_{key}"] = summarize([r.metrics[key] for r in results])
    for who, suffix in (("student", ""), ("attention", "_attention")):
        for key in ("auc", "ap"):
            vals = [r.instance[who][key] if r.instance.get(who) else None for r in results]
            m[f"instance_{key}{suffix}"] = summarize(vals)
    m["best_epochs"] = [r.best_epoch for r in results]
    m["instance_labels"] = config.get("instance_labels")
    return m


def _write_outputs(out: Path, results: list[FoldResult], cohort: Cohort, config: dict) -> None:
    import csv

    title = f"{config['model']}{' + w2s' if config['w2s'] else ''}"
    if len(cohort.class_names) == 2:
        plot_roc([(np.array(r.test_labels), np.array(r.test_probs)[:, 1]) for r in results if r.test_probs],
                 out / "roc.png", f"{title}: test ROC per fold")
    plot_curves([r.history for r in results], out / "curves.png", title)
    patient = {b.slide_id: b.patient_id for b in cohort.bags}
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "fold", "label", "predicted", *[f"prob_{c}" for c in cohort.class_names]])
        for r in results:
            for sid, y, p in zip(r.test_ids, r.test_labels, r.test_probs):
                w.writerow([sid, patient.get(sid, sid), r.fold, cohort.class_names[y],
                            cohort.class_names[int(np.argmax(p))], *[f"{v:.6f}" for v in p]])
