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
and its projection head still trains); this is what makes CPU training take minutes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi.errors import EncoderError, RunError
from wsi.runtime import (atomic_write_json, autocast, dist_info, package_version, resolve_device, resolve_precision,
                         seed_everything)

from .checkpoint import CONFIG, WEIGHTS, check_resume, load_state, save_state, save_weights, write_open_clip_folder
from .config import ClipTrainConfig
from .loaders import CachedPairs, cache_frozen, data_fingerprint, is_shards, pair_loader, shard_split, to_uint8

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


class PairStep(nn.Module):
    """images (or cached image-tower outputs) + tokens -> what open_clip's losses take. Wrapped in DDP
    under torchrun, so gradients of everything trainable are synchronised."""

    def __init__(self, clip_model: nn.Module, image_head: nn.Module):
        super().__init__()
        self.clip, self.image_head = clip_model, image_head

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        img = F.normalize(self.image_head(images), dim=-1)
        txt = self.clip.encode_text(tokens, normalize=True)
        out = {"image_features": img, "text_features": txt, "logit_scale": self.clip.logit_scale.exp()}
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out


def make_loss(kind: str, rank: int, world: int):
    """open_clip's loss; under torchrun each process scores its own images against every text (local
    loss) with features gathered with their gradients."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world)
    return ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True, rank=rank, world_size=world)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """open_clip_train's weight-decay groups: none on gains, biases, norms and the temperature."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


# ---- validation ------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_pairs(step: PairStep, loss_fn, loader, prepare, tokenize, device, precision: str) -> dict:
    """Validation loss (mean over batches) and retrieval recall over the whole validation set, one
    caption per image (this epoch's draw)."""
    from .retrieval import recall_at_k, unique_texts

    step.eval()
    img, txt, caps, total, n = [], [], [], 0.0, 0
    for images, texts in loader:
        caps += list(texts)
        with autocast(device, precision):
            out = step(prepare(images), tokenize(texts).to(device))
            total += float(loss_fn(**out)) * len(texts)
        n += len(texts)
        img.append(out["image_features"].float().cpu())
        txt.append(out["text_features"].float().cpu())
    if not n:
        return {}
    i, t = torch.cat(img), torch.cat(txt)
    texts, mine = unique_texts(list(enumerate(caps)), len(caps))  # a repeated caption is one text
    where: dict[str, int] = {}
    for j, c in enumerate(caps):
        where.setdefault(" ".join(c.split()).lower(), j)
    first = [where[u] for u in texts]
    rec = recall_at_k((i @ t[first].T).numpy(), mine, ks=(1, 5, 10))
    return {"loss": total / n, "recall": rec}


# ---- the run ------------------------------------------------------------------------------------------
def _setup_distributed(device) -> tuple[int, int]:
    rank, world, _ = dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


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


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax[0].plot(ep, [h["val"].get("loss", np.nan) for h in history], "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="contrastive loss", title="loss")
    ax[0].legend()
    for key, lab in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        ax[1].plot(ep, [h["val"].get("recall", {}).get(key, {}).get("R@5", np.nan) for h in history], "o-",
                   label=f"R@5 {lab}")
    ax[1].set(xlabel="epoch", ylabel="recall", title="validation retrieval", ylim=(0, 1.02))
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_clip(cfg: ClipTrainConfig, data: str | Path, out: str | Path, *, store: str | Path | None = None,
               progress: bool = True, data_root: str | Path | None = None, allow_remote: bool = False) -> dict:
    """Train `cfg.model` on the pairs of `data` (a captions CSV: store tiles with `store`, or image
    files under `data_root`, remote ones only with `allow_remote`: `read_captions`) into RUN_DIR `out`;
    resumes a run left there with the same settings and data. Returns metrics.json's content."""
    from open_clip import image_transform
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from .data import PairDataset, read_captions, split_by_group
    from .models import load_model

    t_start = time.perf_counter()
    out, data = Path(out), Path(data)
    device = resolve_device(cfg.device)
    rank, world = _setup_distributed(device)
    seed_everything(cfg.seed)  # new parts (a text tower, a projection, SigLIP's bias) start the same each run
    enc = load_model(cfg.model, cfg.pretrained)
    cfg = cfg.resolved(enc.spec.train)
    precision = resolve_precision(device, cfg.precision, enc.spec.precision)
    workers = cfg.num_workers if cfg.num_workers is not None else (8 if device.type == "cuda" else 0)
    model, oc_cfg = _prepare_model(enc, cfg)

    shards = shard_split(data, cfg.val_fraction) if is_shards(data) else None
    if shards is None:
        caps = read_captions(data, store=store, data_root=data_root, allow_remote=allow_remote)
        train_pos, val_pos = split_by_group(caps, cfg.val_fraction, cfg.seed)
        if not train_pos:
            raise RunError(f"{data}: no training images left after the validation split; lower --val-fraction")
        slides = sorted({caps.group_of(i) for i in (*train_pos, *val_pos)})
        n_train, n_val = len(train_pos), len(val_pos)
        val_groups = sorted({caps.group_of(i) for i in val_pos})
        summary = caps.summary()
    else:
        slides, n_train, n_val = shards[0] + shards[1], shards[2], shards[3]
        val_groups, summary = shards[1], f"{len(shards[0])} training and {len(shards[1])} validation shards"
    record = {"model": cfg.model, "pretrained": cfg.pretrained, "settings": cfg.settings(),
              "model_spec": {"name": enc.spec.name, "input_size": enc.spec.input_size, "mean": list(enc.spec.mean),
                             "std": list(enc.spec.std), "weights": enc.weights},
              "tokenizer": f"open_clip:{oc_cfg['model_cfg'].get('text_cfg', {}).get('hf_tokenizer_name') or 'bpe'}",
              "transforms": {"train": "open_clip image_transform(is_train=True)", "eval": enc.transform_attrs()},
              "data": {"source": str(data.resolve()), "store": str(Path(store).resolve()) if store else None,
                       "fingerprint": data_fingerprint(data, Path(store) if store else None, slides),
                       "n_train_images": n_train, "n_val_images": n_val, "val_groups": val_groups,
                       "slides": slides if shards is None else None},   # what evaluations leave out
              "pathmil_version": package_version()}
    resume = check_resume(out, record)  # every rank: each one loads the last state to continue from
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # before rank 0 writes the record of this run
    if resume and world == 1 and _finished(out, cfg):  # nothing left to do: no feature cache, no model moves
        log.info("%s: already trained (%s)", out, json.loads((out / "metrics.json").read_text())["stopped"])
        return json.loads((out / "metrics.json").read_text())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, record)
        write_open_clip_folder(out, oc_cfg, enc.spec, record["tokenizer"])
        log.info("%s: %d training / %d validation images; %s", data, n_train, n_val, summary)

    frozen, head = frozen_image_part(model)
    size = enc.spec.input_size
    eval_pairs = lambda pos: PairDataset(caps, pos, to_uint8(size), seed=cfg.seed)  # noqa: E731
    model.to(device)
    if shards is not None:  # streamed: nothing cached, the frozen part (if any) runs every step
        from .shards import shard_pairs

        train_tf = image_transform(size, is_train=True, mean=enc.spec.mean, std=enc.spec.std)
        tr_ds = shard_pairs(shards[0], train_tf, seed=cfg.seed)
        va_ds = shard_pairs(shards[1], to_uint8(size), shuffle=0, seed=cfg.seed) if shards[1] else None
        step = PairStep(model, model.visual)
        prep_train = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        prep_val = lambda x: enc.preprocess(x.to(device, non_blocking=True))  # noqa: E731
    elif frozen is not None and cfg.lock_image:  # LiT: the frozen part runs once, not every epoch
        frozen.eval()
        tr_ds = CachedPairs(cache_frozen(frozen, enc, eval_pairs(train_pos), device, precision, cfg.batch_size,
                                      workers, progress and rank == 0, "train"), eval_pairs(train_pos))
        va_ds = CachedPairs(cache_frozen(frozen, enc, eval_pairs(val_pos), device, precision, cfg.batch_size,
                                      workers, progress and rank == 0, "validation"), eval_pairs(val_pos))
        step = PairStep(model, head)
        prep_train = prep_val = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    else:
        train_tf = image_transform(size, is_train=True, mean=enc.spec.mean, std=enc.spec.std)
        tr_ds, va_ds = PairDataset(caps, train_pos, train_tf, seed=cfg.seed), eval_pairs(val_pos)
        step = PairStep(model, model.visual)
        prep_train = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        prep_val = lambda x: enc.preprocess(x.to(device, non_blocking=True))  # noqa: E731
    step.to(device)
    trainable = step
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trainable = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = make_loss(cfg.loss, rank, world)
    opt = torch.optim.AdamW(param_groups(step, cfg.wd), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    per_epoch = max(1, math.ceil(n_train / (cfg.batch_size * world) / cfg.grad_accum))
    total = min(cfg.epochs * per_epoch, cfg.max_steps or 1 << 62)
    schedule = cosine_lr(opt, cfg.lr, min(cfg.warmup, max(total - 1, 1)), total)
    tokenize = enc.tokenize

    history: list[dict] = []
    start, gstep, best, stopped = 0, 0, None, "epochs"
    if resume:
        meta = load_state(out, step, opt, scaler)
        if meta:
            start, gstep, history, best = meta["epoch"] + 1, meta["step"], meta["history"], meta["best"]
            log.info("%s: resuming after epoch %d (step %d)", out, meta["epoch"], gstep)
            if meta.get("stopped"):
                start, stopped = cfg.epochs, meta["stopped"]
    n_seen = 0
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)
        tr_ds.set_epoch(epoch)
        if va_ds is not None:
            va_ds.set_epoch(0)  # the same validation captions every epoch
        loader = pair_loader(tr_ds, cfg.batch_size, True, cfg.seed, epoch, workers, n_train > cfg.batch_size * world,
                         world, rank)
        try:
            n_batches = len(loader)
        except TypeError:  # an iterable of shards: no length
            n_batches = None
        trainable.train()
        if frozen is not None and not isinstance(tr_ds, CachedPairs):
            frozen.eval()  # a locked tower's BatchNorm keeps its statistics
        t0, t_start, losses, n_seen_epoch = time.perf_counter(), time.time(), [], 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress or rank != 0,
                   leave=False)
        for i, (x, texts) in enumerate(bar):
            with autocast(device, precision):
                res = trainable(prep_train(x), tokenize(texts).to(device, non_blocking=True))
                loss = loss_fn(**res)
            scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
            n_seen += len(texts)
            n_seen_epoch += len(texts) * world
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == n_batches:
                schedule(gstep)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():  # open_clip's clamp: a temperature below 1/100 destabilises training
                    model.logit_scale.clamp_(0, math.log(100))
                gstep += 1
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                if gstep >= total:
                    stopped = "max_steps" if cfg.max_steps and gstep >= cfg.max_steps else stopped
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds, n_steps = time.perf_counter() - t0, len(losses)
        if rank != 0:
            if gstep >= total:
                break
            continue
        val = {} if va_ds is None else evaluate_pairs(
            step, make_loss(cfg.loss, 0, 1), pair_loader(va_ds, cfg.batch_size, False, cfg.seed, 0, workers, False, 1, 0),
            prep_val, tokenize, device, precision)
        history.append({"epoch": epoch + 1, "step": gstep, "train_loss": float(np.mean(losses)) if losses else None,
                        "val": val, "seconds": round(time.perf_counter() - t0, 2),
                        "train_seconds": round(train_seconds, 3), "batches": n_steps,
                        "t_start": t_start, "t_end": t_start + train_seconds,
                        "pairs_per_s": round(n_steps and n_seen_epoch / train_seconds, 1),
                        "lr": opt.param_groups[-1]["lr"]})
        score = val.get("loss", history[-1]["train_loss"])
        if best is None or score < best["loss"]:
            best = {"epoch": epoch + 1, "loss": score, "val": val}
            save_weights(out / WEIGHTS, model)
        log.info("epoch %d: train loss %.4f, validation loss %s, R@5 image→text %s", epoch + 1,
                 history[-1]["train_loss"] or float("nan"), f"{val['loss']:.4f}" if val else "-",
                 f"{val['recall']['image_to_text']['R@5']:.3f}" if val else "-")
        if gstep >= total:
            pass
        elif epoch + 1 - best["epoch"] >= cfg.patience and epoch + 1 < cfg.epochs:
            stopped = f"early stop: no better validation loss for {cfg.patience} epochs"
        save_state(out, step, opt, scaler, {"epoch": epoch, "step": gstep, "history": history, "best": best,
                                            "stopped": None if stopped == "epochs" else stopped})
        _write_metrics(out, history, best, stopped, cfg)
        if stopped != "epochs" or gstep >= total:
            break
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    metrics = _write_metrics(out, history, best, stopped, cfg) if rank == 0 else {}
    if rank == 0:
        metrics["seconds_this_process"] = round(time.perf_counter() - t_start, 1)
        metrics["pairs_per_s"] = round(n_seen / max(time.perf_counter() - t_start, 1e-9), 1)
    return metrics


def _finished(out: Path, cfg: ClipTrainConfig) -> bool:
    from .checkpoint import STATE_JSON

    try:
        meta = json.loads((out / STATE_JSON).read_text())
        json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("stopped")) or meta["epoch"] + 1 >= cfg.epochs or (
        cfg.max_steps is not None and meta["step"] >= cfg.max_steps)


def _write_metrics(out: Path, history: list[dict], best: dict | None, stopped: str, cfg: ClipTrainConfig) -> dict:
    m = {"history": history, "best_epoch": best and best["epoch"], "best": best, "stopped": stopped,
         "settings": asdict(cfg)}
    atomic_write_json(out / "metrics.json", m)
    if history:
        _plot_curves(history, out / "curves.png")
    return m
