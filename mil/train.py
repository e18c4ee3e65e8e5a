"""Training and cross-validation of a dual-level MIL model: the API behind `mil train`.

One fold: AdamW + cosine schedule over padded mini-batches, early stopping on the validation bag
loss, the best epoch's weights kept, then the test part scored. A run: every fold, then
RUN_DIR/metrics.json, roc.png (binary) or confusion.png (more classes), curves.png, predictions.csv,
splits/ and fold_<k>/ (weights as safetensors and the fold's results as JSON). A fold whose results
are on disk is not trained again, so an interrupted run resumes where it stopped.
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
from wsi.runtime import (atomic_write_json, autocast, deterministic, large_frees_to_os, package_version,
                         resolve_device, resolve_precision, seed_everything)

from .baseline import fold_baseline
from .batching import BagBatcher
from .checkpoint import check_resume, finished_folds, read_run_config, save_config, save_fold_model
from .cohort import Bag, Cohort, LazyFeatures, name_ids
from .backoff import Shadow, feedback_hurts
from .config import DataConfig, TrainConfig, W2SConfig
from .labels import negative_class
from .metrics import bag_metrics, class_metrics, instance_metrics
from .report import summarize_run, write_outputs
from .models import create_model, get_spec
from .splits import Split, make_splits, write_splits
from .w2s import class_loss, distill_loss, positive_logit, student_loss

__all__ = ["TrainConfig", "W2SConfig", "DataConfig", "FoldResult", "train_cohort", "train_fold", "train_epoch",
           "evaluate", "negative_index", "run_config", "summarize_run", "train_precision"]

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
    # --w2s only: {"feedback": filtering at inference, "distillation", "evidence": {...},
    #              "backoff": [{"epoch", "turned_off", "reason", ...}] or None}
    w2s: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def train_precision(device: torch.device, precision: str = "auto") -> str:
    """The autocast precision of training and evaluation: "auto" is bf16 on a GPU that supports it and
    fp32 elsewhere (on a CPU bf16 autocast is slower than fp32; fp16 would need loss scaling)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_precision(device, precision, "bf16" if bf16 else "fp32")


def negative_index(class_names: list[str], cfg: TrainConfig) -> int | None:
    """Index of the sure-negative class (`labels.negative_class`: binary 0; more classes: --negative-class
    or the one negative-sounding name), None on pure subtyping."""
    name = negative_class(class_names, cfg.negative_class, where="the cohort")
    return None if name is None else class_names.index(name)


def forward(model, x: torch.Tensor, mask: torch.Tensor, w2s: W2SConfig, feedback: bool):
    """The model's outputs and the instances its bag branch attended to. With feedback on, the
    instances the student confidently rejects are masked out of the bag branch first."""
    model.reject_below = w2s.reject_below if feedback else None
    model.min_keep = w2s.min_keep
    out = model(x, mask)
    return out, out.extras["attended"]


def batch_losses(model, out, attended, batch, cfg: TrainConfig, epoch: int, binary: bool,
                 feedback: bool = True, negative: int | None = 0) -> dict[str, torch.Tensor]:
    """The loss terms of one batch. The student learns "not the negative class" (`student_loss`, with
    the correction under --w2s) when the task has a negative class (`negative`, its index; binary: 0),
    and, with more than two classes, which class (`class_loss`)."""
    y = batch.y
    terms = {"bag": F.cross_entropy(out.bag_logits, y)}
    extra = model.extra_loss(out, y)
    if extra.requires_grad or extra.item() != 0:
        terms["extra"] = cfg.extra_weight * extra
    w = cfg.w2s
    ev = batch.aux.to(y.device) if w.enabled and batch.aux is not None else None
    if binary or negative is not None:
        neg = 0 if binary else negative
        yb = y if binary else (y != neg).long()    # positive bags: any class but the negative one
        ramp = w.ramp_at(epoch)
        terms["instance"] = w.instance_weight * student_loss(out.instance_logits, out.attention, batch.mask, yb,
                                                              w.alpha_max * ramp, w.fp_rate, ev, neg)
        if feedback and ramp > 0 and w.distill_weight > 0:
            terms["distill"] = w.distill_weight * ramp * distill_loss(out.attention, out.instance_logits, attended,
                                                                      yb, neg)
    if not binary:
        terms["class"] = w.instance_weight * class_loss(out.instance_logits, out.attention, batch.mask, y,
                                                        negative, ev)
    return terms


def train_epoch(model, batcher: BagBatcher, opt, sched, cfg: TrainConfig, epoch: int, binary: bool,
                device: torch.device, backed_off: bool = False, shadow: Shadow | None = None,
                distill: bool | None = None, negative: int | None = 0) -> dict[str, float]:
    """One pass over the training bags; returns the mean of each loss term. `backed_off`: the
    student no longer filters the bag branch's instances; `distill` (default: not backed_off): it
    still distils into the attention. `shadow`: a feedback-free twin of the bag branch trained on the
    same batches. `negative`: index of the sure-negative class of a multi-class task (None: none)."""
    model.train()
    feedback = cfg.w2s.feedback_on(epoch) and not backed_off
    distill = (not backed_off) if distill is None else distill
    precision = train_precision(device, cfg.precision)
    sums: dict[str, float] = {}
    for batch in batcher:
        batch = batch.to(device, non_blocking=True)   # from pinned memory on a GPU: overlaps the last step
        with autocast(device, precision):
            out, attended = forward(model, batch.x, batch.mask, cfg.w2s, feedback)
            terms = batch_losses(model, out, attended, batch, cfg, epoch, binary, distill, negative)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if shadow is not None:
            with autocast(device, precision):
                shadow.step(batch.x, batch.mask, batch.y, cfg)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() / len(batcher)
    return sums


@torch.no_grad()
def evaluate(model, bags: list[Bag], cfg: TrainConfig, device: torch.device, feedback: bool, *,
             loader: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bag probabilities and loss, and per bag the student's instance probabilities and the attention
    relative to uniform (attention x attended count), in the order of `bags`. `loader`: BagBatcher's
    DataLoader keywords (`DataConfig.loader`)."""
    model.eval()
    n = len(bags)
    probs: list = [None] * n
    inst: list = [None] * n
    att: list = [None] * n
    loss = 0.0
    precision = train_precision(device, cfg.precision)
    for batch in BagBatcher(bags, cfg.batch_size, shuffle=False, **(loader or {})):
        on = batch.to(device, non_blocking=True)
        with autocast(device, precision):
            out, attended = forward(model, on.x, on.mask, cfg.w2s, feedback)
        logits, inst_logits = out.bag_logits.float(), out.instance_logits.float()
        loss += F.cross_entropy(logits, on.y, reduction="sum").item()
        p = logits.softmax(-1).cpu().numpy()
        if inst_logits.shape[-1] == 2:
            s = torch.sigmoid(positive_logit(inst_logits)).cpu().numpy()
        else:
            s = inst_logits.softmax(-1).amax(-1).cpu().numpy()
        a = (out.attention.float() * attended.sum(1, keepdim=True)).cpu().numpy()
        for row, i in enumerate(batch.index):
            m = batch.mask[row].numpy()
            probs[i], inst[i], att[i] = p[row], s[row][m], a[row][m]
    return {"probs": np.stack(probs) if n else np.zeros((0, 2)), "loss": loss / max(n, 1),
            "instance": inst, "attention": att}


def _instance_eval(bags: list[Bag], ev: dict, baseline: dict | None = None) -> dict[str, dict | None]:
    """Instance AUC / AP of the student and the attention (and of the inheritance baseline's scores,
    `baseline`: {"scores": per bag, "seconds"}) on the bags with tile labels."""
    have = [i for i, b in enumerate(bags) if b.instance_labels is not None]
    if not have:
        return {"student": None, "attention": None}
    truth = np.concatenate([bags[i].instance_labels for i in have])
    out = {"student": instance_metrics(truth, np.concatenate([ev["instance"][i] for i in have])),
           "attention": instance_metrics(truth, np.concatenate([ev["attention"][i] for i in have]))}
    if baseline is not None:
        m = instance_metrics(truth, np.concatenate([baseline["scores"][i] for i in have]))
        out["baseline"] = None if m is None else {**m, "seconds": baseline["seconds"]}
    return out


def train_fold(cohort: Cohort, split: Split, cfg: TrainConfig, *, progress: bool = True,
               data: DataConfig | None = None) -> tuple[Any, FoldResult]:
    """Train one fold; returns the model at its best validation epoch and the fold's test results.
    `data`: how batches are fed (DataLoader workers, prefetch); it changes no result.

    Deterministic torch kernels and glibc's return of large freed blocks apply inside this call only,
    not to the rest of the process."""
    cfg.validate()
    with deterministic(), large_frees_to_os():
        return _train_fold(cohort, split, cfg, progress, data)


def _train_fold(cohort: Cohort, split: Split, cfg: TrainConfig, progress: bool,
                data: DataConfig | None) -> tuple[Any, FoldResult]:
    from tqdm.auto import tqdm

    seed_everything(cfg.seed + split.fold)
    device = resolve_device(cfg.device)
    loader = (data or DataConfig()).loader(device)
    binary = len(cohort.class_names) == 2
    negative = negative_index(cohort.class_names, cfg)
    model = create_model(cfg.model, cohort.dim, len(cohort.class_names), **cfg.model_kwargs).to(device)
    model.negative_index = negative or 0
    train_bags = [cohort.bags[i] for i in split.train]
    val_bags = [cohort.bags[i] for i in split.val]
    w2s_on = cfg.w2s.enabled and negative is not None
    evidence, ev_info = None, None
    if w2s_on and cfg.w2s.evidence:
        from .w2s import fold_evidence

        bag_targets = [int(b.label != negative) for b in train_bags]
        evidence, ev_info = fold_evidence(train_bags, bag_targets, cfg.w2s, seed=cfg.seed + split.fold, device=device)
        log.info("fold %d: negative-bag evidence (%s): %.1f%% of positive-bag instances above 1/2", split.fold,
                 ev_info.get("used"), 100 * ev_info.get("share_above_half", 0))
        if not ev_info["computed"]:
            evidence = None
        elif cfg.w2s.prefit_steps and "contrast" in ev_info:   # a subtle shift takes many instance-level steps
            from .w2s import prefit_student

            ev_info["prefit"] = prefit_student(model.student, [LazyFeatures(b) for b in train_bags], evidence,
                                               bag_targets,
                                               steps=cfg.w2s.prefit_steps, seed=cfg.seed + split.fold,
                                               negative=negative or 0, device=device)
    batcher = BagBatcher(train_bags, cfg.batch_size, max_instances=cfg.max_instances, shuffle=True,
                         seed=cfg.seed + split.fold, aux=evidence, **loader)
    if cfg.w2s.enabled:
        cfg = replace(cfg, w2s=cfg.w2s.scaled(len(batcher), cfg.epochs))
        log.debug("fold %d: w2s warm-up %d epochs, ramp %d", split.fold, cfg.w2s.warmup, cfg.w2s.ramp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(batcher)))
    history: list[dict] = []
    # With --w2s and a validation part, a feedback-free twin of the bag branch (`Shadow`) trains
    # alongside; each epoch with feedback, the validation bag loss of the model (with its filtering) is
    # compared with the twin's. Worse by more than backoff_tol for backoff_patience epochs in a row:
    # the feedback backs off, in two steps: first the filtering (the twin's bag branch replaces the
    # model's, distillation goes on), then, if distillation alone still hurts, the distillation too
    # (the twin's weights again, no feedback at all for the rest of the run and at inference).
    # Two candidates for the best epoch: with feedback as trained (`used`) and without any (`plain`:
    # the twin's, then the backed-off model's).
    shadow = Shadow.of(model, cfg, cfg.epochs * len(batcher)) if w2s_on and val_bags else None
    best = {"used": [float("inf"), None, -1], "plain": [float("inf"), None, -1]}
    stale, bad_epochs, backoffs = 0, 0, []
    filtering, distilling = cfg.w2s.enabled, cfg.w2s.enabled and cfg.w2s.distill_weight > 0
    can_filter = getattr(model, "w2s_filter", True)
    bar = tqdm(range(cfg.epochs), desc=f"fold {split.fold}", unit="epoch", disable=not progress, leave=False)
    labels_val = np.array([b.label for b in val_bags])
    state = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    for epoch in bar:
        sums = train_epoch(model, batcher, opt, sched, cfg, epoch, binary, device, backed_off=not filtering,
                           shadow=shadow, distill=distilling, negative=negative)
        row = {"epoch": epoch, "train_loss": sum(sums.values()), **{f"loss_{k}": v for k, v in sums.items()}}
        feedback = cfg.w2s.feedback_on(epoch) and (filtering or distilling)
        plain_model = shadow.model if shadow is not None else model
        if val_bags:
            ev = evaluate(model, val_bags, cfg, device, feedback and filtering, loader=loader)
            row["val_loss"] = ev["loss"]
            row["val_auc"] = bag_metrics(labels_val, ev["probs"])["auc"]
            plain = (evaluate(plain_model, val_bags, cfg, device, False, loader=loader)["loss"] if shadow is not None
                     else ev["loss"])
        else:
            row["val_loss"], row["val_auc"] = row["train_loss"], float("nan")
            plain = row["val_loss"]
        if shadow is not None:
            row["val_loss_plain"] = plain
        plain_ok = epoch >= cfg.min_epochs or epoch == cfg.epochs - 1
        if plain_ok and plain < best["plain"][0]:
            best["plain"] = [plain, state(plain_model), epoch]
        if shadow is not None and feedback:
            reason = feedback_hurts(row["val_loss"], plain, cfg.w2s.backoff_tol + cfg.w2s.backoff_rel * plain)
            bad_epochs = bad_epochs + 1 if reason else 0
            if reason and bad_epochs >= cfg.w2s.backoff_patience:
                partial = filtering and can_filter and distilling
                what = "filtering" if partial else "all feedback"
                backoffs.append({"epoch": epoch, "turned_off": what, "reason": reason,
                                 "val_loss_feedback": row["val_loss"], "val_loss_plain": plain})
                log.warning("fold %d: w2s %s turned off at epoch %d (%s); the bag branch goes on from its "
                            "feedback-free twin%s", split.fold, what, epoch, reason,
                            ", with distillation only" if partial else ", without feedback")
                model.bag.load_state_dict(shadow.model.bag.state_dict())
                for p_ in model.bag.parameters():     # fresh AdamW moments for the adopted weights
                    opt.state.pop(p_, None)
                filtering, bad_epochs, stale = False, 0, 0
                best["used"] = [float("inf"), None, -1]   # states trained with filtering no longer count
                if not partial:
                    distilling, shadow = False, None
        backed_off = not (filtering or distilling) and cfg.w2s.enabled
        eligible = epoch >= cfg.first_eligible_epoch() or epoch == cfg.epochs - 1
        if not backed_off and eligible and row["val_loss"] < best["used"][0]:   # a NaN loss is never better
            best["used"], stale = [row["val_loss"], state(model), epoch], 0
        elif backed_off and best["plain"][2] == epoch:
            stale = 0
        elif eligible or backed_off:
            stale += 1
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
        if stale >= cfg.patience:
            break
    backed_off = cfg.w2s.enabled and not (filtering or distilling)
    if cfg.w2s.enabled and not backed_off and best["used"][1] is None:
        backed_off = True   # no eligible epoch after a partial back-off: fall back to the twin's best
    best_loss, best_state, best_epoch = best["plain"] if backed_off else best["used"]
    if best_state is None:
        raise RunError(_no_best_epoch(split.fold, history, train_bags + val_bags, cfg, bool(val_bags)))
    for h in history:
        h["best"] = h["epoch"] == best_epoch
    model.load_state_dict(best_state)
    test_bags = [cohort.bags[i] for i in split.test]
    infer_feedback = cfg.w2s.enabled and not backed_off and filtering and cfg.w2s.feedback_on(best_epoch)
    ev = evaluate(model, test_bags, cfg, device, infer_feedback, loader=loader)
    labels = [b.label for b in test_bags]
    metrics = bag_metrics(np.array(labels), ev["probs"])
    if not binary:   # per-class AUC and the confusion matrix; a binary fold's metrics stay as they were
        metrics.update(class_metrics(np.array(labels), ev["probs"].reshape(len(labels), -1)))
    w2s_info = None
    if cfg.w2s.enabled:
        w2s_info = {"feedback": infer_feedback, "distillation": distilling and not backed_off,
                    "backoff": backoffs or None, "evidence": ev_info}
    result = FoldResult(fold=split.fold, best_epoch=best_epoch, history=history,
                        test_ids=[b.slide_id for b in test_bags], test_labels=labels,
                        test_probs=ev["probs"].tolist(), metrics=metrics,
                        instance=(_instance_eval(test_bags, ev, fold_baseline(train_bags, test_bags, enabled=cfg.baseline, seed=cfg.seed, device=device))
                                  if binary else {"student": None, "attention": None}),
                        w2s=w2s_info)
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
            "positive_class": cohort.positive_class,
            "negative_class": negative_class(cohort.class_names, cfg.negative_class, where="the cohort"),
            "encoder": cohort.encoder, "w2s": cfg.w2s.enabled,
            "w2s_params": cfg.w2s.to_dict(), "folds": cfg.folds, "instance_labels": instance_labels,
            "source": cohort.source, "seed": cfg.seed, "pathmil_version": package_version(),
            "train": {k: v for k, v in asdict(cfg).items() if k not in ("w2s", "model", "model_kwargs")},
            "data": cohort.fingerprint()}


def train_cohort(cohort: Cohort, cfg: TrainConfig, out_dir: str | Path, *, instance_labels: str | None = None,
                 progress: bool = True, data: DataConfig | None = None) -> dict[str, Any]:
    """Cross-validate `cfg.model` on `cohort`; write the run to `out_dir` and return metrics.json's content.
    A folder holding the same run (same settings, same labels and features) is resumed. `data`: how
    batches are fed (DataLoader workers, prefetch; the cache is the cohort's, `load_cohort(cache_gb=)`)."""
    cfg.validate()
    if negative_index(cohort.class_names, cfg) is None and cfg.w2s.enabled:
        raise RunError(f"--w2s needs a negative class (a binary task, or normal tissue among the classes): classes "
                       f"{', '.join(cohort.class_names)} are pure subtyping, with no bags of sure negatives to "
                       "calibrate the correction on; train without --w2s, or name the normal class with "
                       "--negative-class")
    get_spec(cfg.model)  # unknown model: error listing the choices, before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(cohort, cfg, instance_labels)
    cfg_path = out / "config.json"
    old = read_run_config(cfg_path) if cfg_path.exists() else None
    if old is not None and finished_folds(out):
        check_resume(out, old, config)
        config["run_id"], config["created"] = old.get("run_id"), old.get("created")
    else:
        # A run that stopped before finishing any fold (a wrong --device, say) left nothing to keep: the
        # folder is started afresh, under any settings, rather than refusing the corrected command.
        if old is not None:
            log.info("%s: no fold of the earlier run finished; starting the run afresh", out)
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
        model, res = train_fold(cohort, split, cfg, progress=progress, data=data)
        save_fold_model(out, split.fold, model.cpu())
        atomic_write_json(done, res.to_json())
        results.append(res)
        log.info("fold %d: best epoch %d, test bag AUC %.3f", split.fold, res.best_epoch, res.metrics["auc"])
    metrics = summarize_run(results, config)
    atomic_write_json(out / "metrics.json", metrics)
    write_outputs(out, results, cohort, config)
    return metrics
