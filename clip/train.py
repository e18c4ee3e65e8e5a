"""`clip train` as a Python API: contrastive training of an open_clip model on image/caption pairs.

    metrics = train_clip(ClipTrainConfig(model="pathoclip-lite"), "captions.csv", "runs/pc", store="cohort.zarr")

The parts are open_clip's: the model and tokenizer, `ClipLoss` / `SigLipLoss` (local loss and
gather-with-grad under torchrun), `lock_image_tower` / `lock_text_tower`, grad checkpointing, and
open_clip_train's cosine schedule with warm-up. AdamW with open_clip's weight-decay groups (no decay
on gains, biases and the temperature). Validation is split by slide; each epoch reports the
validation loss and retrieval recall; the best epoch's weights are kept (early stop after
`patience` epochs without a better loss), and every epoch leaves a resumable state (clip.checkpoint).

Determinism: shuffling, caption draws and augmentations are seeded per epoch from `seed`, so a run
killed and resumed ends with the same weights as one that never stopped (up to float tolerance).

Locked image tower (LiT, the pathoclip-lite default): the frozen part's outputs do not change, so they
are computed once, without augmentation, and reused every epoch (for a timm tower, the trunk is frozen
and its projection head still trains); this is what makes CPU training take minutes. Under torchrun
each rank computes its share into RUN_DIR/cache and all ranks memory-map the whole.

The run has open_clip_train's shape: set-up (`setup_run`, `make_trainer`, `resume_progress`), one
epoch (`run_epoch` -> clip.epoch.train_one_epoch), evaluation (`validate`), the checkpoint and the
stop decision (`end_epoch`, `stop_reason`, on rank 0, then broadcast to every rank).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from wsi.errors import EncoderError, RunError
from wsi.runtime import atomic_write_json, package_version, resolve_precision, seed_everything

from .checkpoint import (CONFIG, WEIGHTS, check_resume, finished, load_state, save_state, save_weights, write_metrics,
                         write_open_clip_folder)
from .config import ClipTrainConfig
from .distributed import Ranks, barrier, broadcast, init_distributed
from .epoch import EpochStats, PairStep, Trainer, epoch_loss, evaluate_pairs, make_loss, train_one_epoch
from .loaders import (CachedPairs, RankBatches, cache_frozen, data_fingerprint, is_shards, pair_loader, shard_split,
                      to_uint8)

log = logging.getLogger(__name__)


# ---- the model's image path -----------------------------------------------------------------------
def frozen_image_part(clip_model) -> tuple[nn.Module | None, nn.Module]:
    """(the frozen front of the image tower whose outputs can be cached, the trainable rest).

    All of `visual` frozen -> (visual, Identity); a timm tower with a frozen trunk -> (trunk, head);
    otherwise (None, visual): nothing to cache."""
    visual = clip_model.visual
    if not any(p.requires_grad for p in visual.parameters()):
        return visual, nn.Identity()
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if trunk is not None and head is not None and not any(p.requires_grad for p in trunk.parameters()):
        return trunk, head
    return None, visual


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """open_clip_train's weight-decay groups: none on gains, biases, norms and the temperature."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


# ---- set-up ------------------------------------------------------------------------------------------
def _prepare_model(enc, cfg: ClipTrainConfig):
    from wsi.encoders.imagetext import OpenClipImageText

    if not isinstance(enc.model, OpenClipImageText):
        raise EncoderError(f"{cfg.model!r} is a {enc.spec.family} model: clip train trains open_clip models "
                           "(pathoclip-lite, ViT-B-16, ViT-L-14, QuiltNet, a run folder, ...); evaluate this one "
                           "with clip zeroshot / retrieve / probe")
    model, oc_cfg = enc.model.inner, json.loads(json.dumps(enc.model.open_clip_cfg))
    if cfg.loss == "siglip" and getattr(model, "logit_bias", None) is None:
        # SigLIP's initialisation (log-temperature log 10, bias -10); the rebuilt model needs the bias too
        model.logit_scale.data.fill_(math.log(10))
        model.logit_bias = nn.Parameter(torch.tensor(-10.0))
        oc_cfg["model_cfg"]["init_logit_bias"] = -10.0
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)  # BN kept as is: see frozen.eval()
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, oc_cfg


@dataclass
class DataSplit:
    """The training / validation halves of a data set: positions in a captions CSV, or shard lists."""

    n_train: int
    n_val: int
    slides: list[str]
    val_groups: list[str]
    summary: str
    caps: Any = None
    train_pos: list[int] = field(default_factory=list)
    val_pos: list[int] = field(default_factory=list)
    train_shards: list[str] | None = None
    val_shards: list[str] | None = None


@dataclass
class Run:
    """A set-up run: what every epoch of every rank shares."""

    cfg: ClipTrainConfig
    out: Path
    ranks: Ranks
    enc: Any
    model: nn.Module
    head: nn.Module
    frozen: nn.Module | None
    precision: str
    workers: int
    tr_ds: Any
    va_ds: Any
    prep_train: Callable
    prep_val: Callable
    n_batches: int  # micro-batches per epoch, the same on every rank
    drop_last: bool
    resume: bool


@dataclass
class Progress:
    """How far the run is: the next epoch, the optimiser steps, the history, the best epoch and why it
    stopped. Decided on rank 0 and broadcast, so every rank holds the same."""

    epoch: int = 0
    gstep: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped: str = "epochs"


def split_data(cfg: ClipTrainConfig, data: Path, store: str | Path | None, data_root: str | Path | None = None,
               allow_remote: bool = False) -> DataSplit:
    """Slides (or whole shards) held out for validation; image files of a captions CSV under `data_root`,
    remote ones only with `allow_remote` (`read_captions`)."""
    from .data import read_captions, split_by_group

    if is_shards(data):
        tr, va, n_tr, n_va = shard_split(data, cfg.val_fraction)
        return DataSplit(n_tr, n_va, tr + va, va, f"{len(tr)} training and {len(va)} validation shards",
                         train_shards=tr, val_shards=va)
    caps = read_captions(data, store=store, data_root=data_root, allow_remote=allow_remote)
    train_pos, val_pos = split_by_group(caps, cfg.val_fraction, cfg.seed)
    if not train_pos:
        raise RunError(f"{data}: no training images left after the validation split; lower --val-fraction")
    return DataSplit(len(train_pos), len(val_pos), sorted({caps.group_of(i) for i in (*train_pos, *val_pos)}),
                     sorted({caps.group_of(i) for i in val_pos}), caps.summary(), caps, train_pos, val_pos)


def _record(cfg, enc, oc_cfg, data: Path, store, split: DataSplit, precision: str, workers: int,
            ranks: Ranks) -> dict:
    return {"model": cfg.model, "pretrained": cfg.pretrained, "settings": cfg.settings(),
            "runtime": {"device": str(ranks.device), "precision": precision, "num_workers": workers,
                        "processes": ranks.world},
            "model_spec": {"name": enc.spec.name, "input_size": enc.spec.input_size, "mean": list(enc.spec.mean),
                           "std": list(enc.spec.std), "weights": enc.weights},
            "tokenizer": f"open_clip:{oc_cfg['model_cfg'].get('text_cfg', {}).get('hf_tokenizer_name') or 'bpe'}",
            "transforms": {"train": "open_clip image_transform(is_train=True)", "eval": enc.transform_attrs()},
            "data": {"source": str(data.resolve()), "store": str(Path(store).resolve()) if store else None,
                     "fingerprint": data_fingerprint(data, Path(store) if store else None, split.slides),
                     "n_train_images": split.n_train, "n_val_images": split.n_val, "val_groups": split.val_groups,
                     "slides": split.slides if split.caps is not None else None},   # what evaluations leave out
            "pathmil_version": package_version()}


def _datasets(cfg: ClipTrainConfig, enc, model, split: DataSplit, out: Path, ranks: Ranks, precision: str,
              workers: int, progress: bool) -> dict:
    """The training and validation datasets, how batches reach the device, and the batches per epoch."""
    from open_clip import image_transform

    from .data import PairDataset

    size, b, dev = enc.spec.input_size, cfg.batch_size, ranks.device
    frozen, head = frozen_image_part(model)
    to_dev = lambda x: x.to(dev, non_blocking=True)  # noqa: E731
    preprocess = lambda x: enc.preprocess(to_dev(x))  # noqa: E731
    train_tf = image_transform(size, is_train=True, mean=enc.spec.mean, std=enc.spec.std)
    if split.train_shards is not None:  # streamed: nothing cached, the frozen part (if any) runs every step
        from .shards import shard_pairs

        nw = max(1, workers)  # open_clip_train's rounding: equal full batches per worker and rank
        per_worker = math.ceil(math.ceil(split.n_train / (b * ranks.world)) / nw)
        tr = shard_pairs(split.train_shards, train_tf, seed=cfg.seed, epoch_samples=per_worker * b,
                         resample=len(split.train_shards) < ranks.world * nw)
        va = shard_pairs(split.val_shards, to_uint8(size), shuffle=0, seed=cfg.seed, split_by_node=False,
                         rank_batches=(_val_group(cfg, ranks), ranks.rank, ranks.world)) if split.val_shards else None
        return dict(tr_ds=tr, va_ds=va, head=model.visual, frozen=frozen, prep_train=to_dev, prep_val=preprocess,
                    n_batches=per_worker * nw, drop_last=False)
    pairs = lambda pos, tf: PairDataset(split.caps, pos, tf, seed=cfg.seed)  # noqa: E731
    if frozen is not None and cfg.lock_image:  # LiT: the frozen part runs once, not every epoch
        frozen.eval()
        parts = {what: cache_frozen(frozen, enc, pairs(pos, to_uint8(size)), dev, precision, b, workers,
                                    progress and ranks.main, what, out / "cache", ranks.world, ranks.rank)
                 for what, pos in (("train", split.train_pos), ("validation", split.val_pos))}
        barrier(ranks)  # every rank's part written
        tr = CachedPairs(parts["train"], pairs(split.train_pos, None))
        va = CachedPairs(parts["validation"], pairs(split.val_pos, None))
        prep_train = prep_val = to_dev
    else:
        tr, va = pairs(split.train_pos, train_tf), pairs(split.val_pos, to_uint8(size))
        head, prep_train, prep_val = model.visual, to_dev, preprocess
    drop = split.n_train > b * ranks.world
    return dict(tr_ds=tr, va_ds=va, head=head, frozen=frozen, prep_train=prep_train, prep_val=prep_val,
                n_batches=len(RankBatches(len(tr), b, ranks.world, ranks.rank, shuffle=True, drop_last=drop)),
                drop_last=drop)


def setup_run(cfg: ClipTrainConfig, data: Path, out: Path, store, progress: bool, data_root=None,
              allow_remote: bool = False) -> Run | dict:
    """Processes, model, data and the run folder; a finished run's metrics instead when nothing is left
    to do."""
    from .models import load_model

    ranks = init_distributed(cfg.device)
    seed_everything(cfg.seed)  # new parts (a text tower, a projection, SigLIP's bias) start the same each run
    enc = load_model(cfg.model, cfg.pretrained)
    cfg = cfg.resolved(enc.spec.train)
    precision = resolve_precision(ranks.device, cfg.precision, enc.spec.precision)
    workers = cfg.num_workers if cfg.num_workers is not None else (8 if ranks.device.type == "cuda" else 0)
    model, oc_cfg = _prepare_model(enc, cfg)
    split = split_data(cfg, data, store, data_root, allow_remote)
    record = _record(cfg, enc, oc_cfg, data, store, split, precision, workers, ranks)
    resume = check_resume(out, record)  # every rank: each one loads the last state to continue from
    barrier(ranks)  # every rank has read the folder before rank 0 writes this run's record
    if resume and finished(out, cfg):  # nothing left to do: no feature cache, no model moves
        m = json.loads((out / "metrics.json").read_text())
        log.info("%s: already trained (%s)", out, m["stopped"])
        return m if ranks.main else {}
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, record)
        write_open_clip_folder(out, oc_cfg, enc.spec, record["tokenizer"])
        log.info("%s: %d training / %d validation images; %s", data, split.n_train, split.n_val, split.summary)
    barrier(ranks)  # the folder exists before any rank writes its feature cache there
    model.to(ranks.device)
    parts = _datasets(cfg, enc, model, split, out, ranks, precision, workers, progress)
    return Run(cfg=cfg, out=out, ranks=ranks, enc=enc, model=model, precision=precision, workers=workers,
               resume=resume, **parts)


def make_trainer(run: Run) -> tuple[Trainer, int]:
    """The step (wrapped in DDP under torchrun), open_clip's loss, AdamW, the scaler and open_clip_train's
    cosine schedule over the run's total steps; (trainer, total steps)."""
    from open_clip_train.scheduler import cosine_lr

    cfg, ranks = run.cfg, run.ranks
    step = PairStep(run.model, run.head).to(ranks.device)
    wrapped: nn.Module = step
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(step, device_ids=[ranks.device.index] if ranks.device.type == "cuda"
                                          else None)
    opt = torch.optim.AdamW(param_groups(step, cfg.wd), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    total = min(cfg.epochs * math.ceil(run.n_batches / cfg.grad_accum), cfg.max_steps or 1 << 62)
    schedule = cosine_lr(opt, cfg.lr, min(cfg.warmup, max(total - 1, 1)), total)
    return Trainer(step, wrapped, make_loss(cfg.loss, ranks.rank, ranks.world), opt,
                   torch.amp.GradScaler(ranks.device.type, enabled=run.precision == "fp16"), schedule,
                   run.enc.tokenize, run.prep_train, ranks, run.precision, cfg.grad_accum), total


def resume_progress(run: Run, t: Trainer) -> Progress:
    """The last epoch's state when the run continues (every rank loads it), else a fresh start."""
    meta = load_state(run.out, t.step, t.opt, t.scaler) if run.resume else None
    if not meta:
        return Progress()
    log.info("%s: resuming after epoch %d (step %d)", run.out, meta["epoch"], meta["step"])
    return Progress(meta["epoch"] + 1, meta["step"], meta["history"], meta["best"], meta.get("stopped") or "epochs")


def run_epoch(run: Run, t: Trainer, p: Progress, epoch: int, total: int, progress: bool) -> EpochStats:
    """One epoch's batches, seeded by (seed, epoch), through `train_one_epoch`."""
    cfg, ranks = run.cfg, run.ranks
    torch.manual_seed(cfg.seed * 1000 + epoch)
    run.tr_ds.set_epoch(epoch)
    loader = pair_loader(run.tr_ds, cfg.batch_size, True, cfg.seed, epoch, run.workers, run.drop_last, ranks.world,
                         ranks.rank)
    t.wrapped.train()
    if run.frozen is not None and not isinstance(run.tr_ds, CachedPairs):
        run.frozen.eval()  # a locked tower's BatchNorm keeps its statistics
    with tqdm(total=min(math.ceil(run.n_batches / cfg.grad_accum), total - p.gstep), desc=f"epoch {epoch + 1}/"
              f"{cfg.epochs}", unit="step", disable=not progress or not ranks.main, leave=False) as bar:
        return train_one_epoch(t, loader, run.n_batches, p.gstep, total, bar)


def validate(run: Run, t: Trainer) -> dict:
    """The validation metrics on rank 0 ({} elsewhere, and without a validation set)."""
    cfg, ranks = run.cfg, run.ranks
    if run.va_ds is None:
        return {}
    run.va_ds.set_epoch(0)  # the same validation captions every epoch
    loader = pair_loader(run.va_ds, cfg.batch_size, False, cfg.seed, 0, run.workers, False, ranks.world, ranks.rank,
                         group=_val_group(cfg, ranks))
    return evaluate_pairs(t.step, make_loss(cfg.loss, 0, 1), loader, run.prep_val, t.tokenize, ranks, run.precision,
                          _val_group(cfg, ranks))


def _val_group(cfg: ClipTrainConfig, ranks: Ranks) -> int:
    """The validation loss is scored on batches of the contrastive batch the run trains with (batch x
    processes x accumulation), so it does not change with how that batch is spread."""
    return cfg.batch_size * ranks.world * cfg.grad_accum


def stop_reason(cfg: ClipTrainConfig, p: Progress, epoch: int, total: int) -> str:
    """Why the run stops after `epoch` ("epochs": it goes on, or ends with its last epoch)."""
    if p.gstep >= total:
        return "max_steps" if cfg.max_steps and p.gstep >= cfg.max_steps else p.stopped
    if epoch + 1 - p.best["epoch"] >= cfg.patience and epoch + 1 < cfg.epochs:
        return f"early stop: no better validation loss for {cfg.patience} epochs"
    return p.stopped


def end_epoch(run: Run, t: Trainer, p: Progress, epoch: int, st: EpochStats, train_loss: float | None, val: dict,
              times: tuple[float, float, float], total: int) -> None:
    """Rank 0: the epoch's history entry, the best weights, the stop decision and the checkpoint."""
    cfg, out = run.cfg, run.out
    t0, wall0, train_seconds = times
    p.gstep = st.gstep
    p.history.append({"epoch": epoch + 1, "step": p.gstep, "train_loss": train_loss, "val": val,
                      "seconds": round(time.perf_counter() - t0, 2), "train_seconds": round(train_seconds, 3),
                      "batches": st.micro_batches, "t_start": wall0, "t_end": wall0 + train_seconds,
                      "pairs_per_s": round(st.micro_batches and st.pairs / train_seconds, 1),
                      "lr": t.opt.param_groups[-1]["lr"]})
    score = val.get("loss", train_loss)
    if p.best is None or score < p.best["loss"]:
        p.best = {"epoch": epoch + 1, "loss": score, "val": val}
        save_weights(out / WEIGHTS, run.model)
    log.info("epoch %d: train loss %.4f, validation loss %s, R@5 image→text %s", epoch + 1,
             train_loss or float("nan"), f"{val['loss']:.4f}" if val else "-",
             f"{val['recall']['image_to_text']['R@5']:.3f}" if val else "-")
    p.stopped = stop_reason(cfg, p, epoch, total)
    p.epoch = epoch + 1
    save_state(out, t.step, t.opt, t.scaler, {"epoch": epoch, "step": p.gstep, "history": p.history, "best": p.best,
                                              "stopped": None if p.stopped == "epochs" else p.stopped})
    write_metrics(out, p.history, p.best, p.stopped, cfg)


def train_clip(cfg: ClipTrainConfig, data: str | Path, out: str | Path, *, store: str | Path | None = None,
               progress: bool = True, data_root: str | Path | None = None, allow_remote: bool = False) -> dict:
    """Train `cfg.model` on the pairs of `data` (a captions CSV: store tiles with `store`, or image
    files under `data_root`, remote ones only with `allow_remote`; or a folder of shards) into RUN_DIR `out`; resumes a run left there with the same settings
    and data. Returns metrics.json's content (on rank 0; {} on the other ranks)."""
    t_start = time.perf_counter()
    run = setup_run(cfg, Path(data), Path(out), store, progress, data_root, allow_remote)
    if isinstance(run, dict):
        return run
    trainer, total = make_trainer(run)
    p, ranks, n_seen = resume_progress(run, trainer), run.ranks, 0
    for epoch in range(p.epoch, run.cfg.epochs):
        if p.stopped != "epochs" or p.gstep >= total:
            break
        t0, wall0 = time.perf_counter(), time.time()
        st = run_epoch(run, trainer, p, epoch, total, progress)
        train_seconds = time.perf_counter() - t0
        n_seen += st.pairs // ranks.world
        train_loss = epoch_loss(ranks, st.losses)
        val = validate(run, trainer)
        if ranks.main:
            end_epoch(run, trainer, p, epoch, st, train_loss, val, (t0, wall0, train_seconds), total)
        p = broadcast(ranks, p)  # every rank takes rank 0's decision: none waits in a collective alone
    barrier(ranks)
    if not ranks.main:
        return {}
    shutil.rmtree(run.out / "cache", ignore_errors=True)
    metrics = write_metrics(run.out, p.history, p.best, p.stopped, run.cfg)
    metrics["seconds_this_process"] = round(time.perf_counter() - t_start, 1)
    metrics["pairs_per_s"] = round(n_seen / max(time.perf_counter() - t_start, 1e-9), 1)
    return metrics
