"""One epoch of `clip train` and one validation pass, in open_clip_train's shape.

Gradient accumulation follows open_clip_train's `accum_freq`: the micro-batches' features are first
computed without gradients and cached; then each micro-batch is run again with gradients and scored
against the cached features of the others, so the contrastive negatives span the whole accumulated
batch and the summed gradient is that of one large batch (exactly: the temperature's gradient is
taken once, where open_clip's loop adds it accum_freq times). Under torchrun the loss is open_clip's
local loss with features gathered with their gradients, and DDP averages gradients across ranks: N
processes at batch B train like one process at batch N*B.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi.runtime import autocast

from .distributed import Ranks, gather, mean

FEATURES = ("image_features", "text_features")


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


@dataclass
class Trainer:
    """What an epoch needs: the step (and its DDP wrapper), loss, optimiser, scaler, lr schedule, and
    how to bring a batch to the device."""

    step: PairStep
    wrapped: nn.Module
    loss_fn: Callable
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Callable[[int], float]
    tokenize: Callable
    prepare: Callable[[torch.Tensor], torch.Tensor]
    ranks: Ranks
    precision: str
    grad_accum: int = 1


@dataclass
class EpochStats:
    losses: list[float] = field(default_factory=list)   # one per optimiser step (the accumulated batch's loss)
    micro_batches: int = 0
    pairs: int = 0                                      # over all ranks
    gstep: int = 0


def _forward_loss(t: Trainer, images, tokens, cached: dict | None = None, j: int = 0):
    with autocast(t.ranks.device, t.precision):
        out = t.wrapped(images, tokens)
        if cached:  # this micro-batch with gradients among the others' cached features
            out = {**out, **{k: torch.cat(cached[k][:j] + [out[k]] + cached[k][j + 1:]) for k in FEATURES}}
            if j < len(cached[FEATURES[0]]) - 1:
                # the temperature (and SigLIP's bias) takes its gradient from one micro-batch only: every
                # micro-batch's loss is the whole batch's, so summing them would count it accum times
                out.update({k: out[k].detach() for k in ("logit_scale", "logit_bias") if k in out})
        return t.loss_fn(**out)


def _apply(t: Trainer, gstep: int) -> None:
    t.schedule(gstep)
    t.scaler.step(t.opt)
    t.scaler.update()
    t.opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # open_clip's clamp: a temperature below 1/100 destabilises training
        t.step.clip.logit_scale.clamp_(0, math.log(100))


def train_one_epoch(t: Trainer, loader, n_batches: int, gstep: int, total: int, bar=None) -> EpochStats:
    """One pass over `loader` (`n_batches` micro-batches, the same on every rank); an optimiser step
    every `grad_accum` micro-batches and after the last one, until `total` steps."""
    st, device = EpochStats(gstep=gstep), t.ranks.device
    images_acc: list = []
    tokens_acc: list = []
    cached: dict[str, list] = {k: [] for k in FEATURES}
    for i, (x, texts) in enumerate(loader):
        x, tok = t.prepare(x), t.tokenize(texts).to(device, non_blocking=True)
        st.micro_batches += 1
        st.pairs += len(texts) * t.ranks.world
        last = (i + 1) % t.grad_accum == 0 or i + 1 == n_batches
        if t.grad_accum == 1:
            loss = _forward_loss(t, x, tok)
            t.scaler.scale(loss).backward()
        else:
            with torch.no_grad(), autocast(device, t.precision):
                out = t.wrapped(x, tok)
            for k in FEATURES:
                cached[k].append(out[k])
            images_acc.append(x)
            tokens_acc.append(tok)
            if not last:
                continue
            for j in range(len(images_acc)):
                sync = j == len(images_acc) - 1 or not hasattr(t.wrapped, "no_sync")
                with contextlib.nullcontext() if sync else t.wrapped.no_sync():  # DDP: one all-reduce per step
                    loss = _forward_loss(t, images_acc[j], tokens_acc[j], cached, j)
                    t.scaler.scale(loss).backward()
            images_acc, tokens_acc, cached = [], [], {k: [] for k in FEATURES}
        _apply(t, st.gstep)
        st.gstep += 1
        st.losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(st.losses[-20:]):.3f}")
        if st.gstep >= total:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return st


@torch.inference_mode()
def evaluate_pairs(step: PairStep, loss_fn, loader, prepare, tokenize, ranks: Ranks, precision: str,
                   group: int | None = None) -> dict:
    """Validation loss (mean over pairs of each group's loss) and retrieval recall over the whole
    validation set, one caption per image (this epoch's draw). The loader yields this rank's groups
    of `group` pairs (the contrastive batch; None: each loader batch) in forward-sized batches; each
    group's loss is scored on its features together. Rank 0 gathers every rank's share and returns
    the metrics, the other ranks return {}."""
    step.eval()
    img, txt, caps, total, n = [], [], [], 0.0, 0
    group_img: list[torch.Tensor] = []
    group_txt: list[torch.Tensor] = []
    extra: dict = {}

    def flush() -> float:  # the loss of the pending group, scored on its features together
        if not group_img:
            return 0.0
        i, t = torch.cat(group_img), torch.cat(group_txt)
        img.append(i.float().cpu())
        txt.append(t.float().cpu())
        group_img.clear()
        group_txt.clear()
        with autocast(ranks.device, precision):
            return float(loss_fn(image_features=i, text_features=t, **extra)) * len(i)

    for images, texts in loader:
        with autocast(ranks.device, precision):
            out = step(prepare(images), tokenize(texts).to(ranks.device))
        extra = {k: out[k] for k in ("logit_scale", "logit_bias") if k in out}
        caps += list(texts)
        group_img.append(out["image_features"])
        group_txt.append(out["text_features"])
        n += len(texts)
        if group is None or sum(len(x) for x in group_img) >= group:
            total += flush()
    total += flush()
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
    parts = gather(ranks, (cat(img), cat(txt), caps, total, n))
    if parts is None:
        return {}
    parts = [p for p in parts if p[4]]
    if not parts:
        return {}
    return _metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                    [c for p in parts for c in p[2]], sum(p[3] for p in parts) / sum(p[4] for p in parts))


def _metrics(i: torch.Tensor, t: torch.Tensor, caps: list[str], loss: float) -> dict:
    from .retrieval import recall_at_k, unique_texts

    texts, mine = unique_texts(list(enumerate(caps)), len(caps))  # a repeated caption is one text
    where: dict[str, int] = {}
    for j, c in enumerate(caps):
        where.setdefault(" ".join(c.split()).lower(), j)
    first = [where[u] for u in texts]
    return {"loss": loss, "recall": recall_at_k((i @ t[first].T).numpy(), mine, ks=(1, 5, 10))}


def epoch_loss(ranks: Ranks, losses: list[float]) -> float | None:
    """The epoch's training loss, the mean over its steps and over the ranks."""
    return mean(ranks, float(np.mean(losses))) if losses else None
