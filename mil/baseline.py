"""The inheritance baseline of instance classification: every tile takes its slide's label.

An instance classifier (the same `InstanceStudent` architecture as a model's instance branch) is
trained on the training bags' instances, each labelled with its bag's label (positive: not the
negative class), as in mi-Net (Wang et al., "Revisiting multiple instance neural networks", Pattern
Recognition 2018) and the "naive" baseline of the MIL literature. It is the simplest instance model a
weak-to-strong correction has to beat: `mil train` reports its instance AUC next to the student's and
the attention's whenever tile labels are given.

Bounded cost: at most `max_instances` instances per call (half from each class's bags where they have
that many, sampled uniformly over the class's instances), a few epochs of AdamW, class-balanced loss
(each class's instances weigh half). Seeded, and run inside a forked RNG, so the caller's random
state (a fold's training) is the same with or without the baseline.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cohort import Bag
from .models.base import InstanceStudent

__all__ = ["fit_inheritance", "fold_baseline", "inheritance_scores", "sample_instances", "score_bags"]


def sample_instances(bags: Sequence[Bag], targets: Sequence[int], max_instances: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(X, y): instances of `bags`, each with its bag's target (0/1), at most `max_instances` in all,
    at most half of them from each class (a class with fewer gives all of its own, the other fills
    the rest). Each bag's features are read once."""
    targets = np.asarray(targets, np.int64)
    sizes = np.array([b.n_instances for b in bags], np.int64)
    total = {c: int(sizes[targets == c].sum()) for c in (0, 1)}
    half = max_instances // 2
    take = {c: min(total[c], half) for c in (0, 1)}
    for c in (0, 1):   # a small class leaves its unused share to the other
        take[c] = min(total[c], max_instances - take[1 - c])
    xs, ys = [], []
    for c in (0, 1):
        idx = np.flatnonzero(targets == c)
        if not take[c]:
            continue
        flat = np.sort(rng.choice(total[c], take[c], replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes[idx])])
        owner = np.searchsorted(starts, flat, side="right") - 1
        for o in np.unique(owner):
            rows = flat[owner == o] - starts[o]
            xs.append(np.asarray(bags[idx[o]].features[rows]))
            ys.append(np.full(len(rows), c, np.int64))
    if not xs:
        return np.zeros((0, bags[0].dim if bags else 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def fit_inheritance(x: np.ndarray, y: np.ndarray, *, seed: int = 0, device: str | torch.device = "cpu",
                    epochs: int = 4, min_steps: int = 100, batch_size: int = 512, lr: float = 1e-3,
                    weight_decay: float = 1e-4, hidden: int = 256, dropout: float = 0.25) -> InstanceStudent:
    """An `InstanceStudent` (2 logits: negative, positive) fitted to instances x (n, D) and their
    inherited labels y (n,) by class-balanced cross-entropy, for `epochs` passes but at least
    `min_steps` optimizer steps (a small cohort still gets trained); returned in eval mode on `device`."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = InstanceStudent(x.shape[1], 2, hidden, dropout).to(dev)
        counts = np.bincount(y, minlength=2).astype(np.float64)
        weight = torch.tensor([len(y) / (2 * c) if c else 0.0 for c in counts], dtype=torch.float32, device=dev)
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        per_epoch = max(1, math.ceil(len(y) / batch_size))
        epochs = max(epochs, math.ceil(min_steps / per_epoch))
        steps = epochs * per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(yt), generator=gen)
            for i in range(0, len(order), batch_size):
                sel = order[i:i + batch_size]
                xb = xt[sel].to(dev, torch.float32, non_blocking=True)
                loss = F.cross_entropy(model(xb), yt[sel].to(dev), weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def score_bags(model: InstanceStudent, bags: Sequence[Bag], chunk: int = 16384) -> list[np.ndarray]:
    """P(positive) of every instance of each bag, float32, in the order of `bags`."""
    dev = next(model.parameters()).device
    out = []
    for b in bags:
        f = b.features
        parts = [model(torch.as_tensor(np.asarray(f[i:i + chunk]), device=dev).float()).softmax(-1)[:, 1].cpu()
                 for i in range(0, len(f), chunk)]
        out.append(torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros(0, np.float32))
    return out


def inheritance_scores(train_bags: Sequence[Bag], eval_bags: Sequence[Bag], *, seed: int = 0,
                       device: str | torch.device = "cpu", negative: int = 0, epochs: int = 4,
                       max_instances: int = 100_000, **fit_kw) -> list[np.ndarray]:
    """Per bag of `eval_bags`, the inheritance baseline's P(positive) of each instance: a classifier
    trained on `train_bags`' instances labelled with their bag's label (positive: any class but
    `negative`). NaN scores when the training bags hold one class only (nothing to learn).
    `fit_kw`: `fit_inheritance`'s other keywords."""
    targets = [int(b.label != negative) for b in train_bags]
    if len(set(targets)) < 2:
        return [np.full(b.n_instances, np.nan, np.float32) for b in eval_bags]
    x, y = sample_instances(train_bags, targets, max_instances, np.random.default_rng(seed))
    model = fit_inheritance(x, y, seed=seed, device=device, epochs=epochs, **fit_kw)
    return score_bags(model, eval_bags)


def fold_baseline(train_bags: Sequence[Bag], test_bags: Sequence[Bag], *, enabled: bool = True, seed: int = 0,
                  device: str | torch.device = "cpu", negative: int = 0) -> dict | None:
    """What `mil train` reports for a fold: {"scores": the inheritance baseline's instance scores per test
    bag, "seconds": its cost}, when `enabled` and some test bag has tile labels; None otherwise."""
    if not enabled or not any(b.instance_labels is not None for b in test_bags):
        return None
    import time

    t0 = time.perf_counter()
    scores = inheritance_scores(train_bags, test_bags, seed=seed, device=device, negative=negative)
    return {"scores": scores, "seconds": time.perf_counter() - t0}
