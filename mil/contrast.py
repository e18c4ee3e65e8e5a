"""Discriminative negative-bag evidence: a calibrated, iteratively refined linear contrast of
positive-bag instances against negative-bag instances (mi-SVM style).

The k-NN evidence (`mil.w2s.negative_evidence`) asks whether an instance's neighbourhood in feature
space is enriched in positive bags; a tumour that is a small shift of a common normal tissue has
normal neighbours there and looks explained. A linear contrast sees the shift: fitted on positive-bag
instances (label 1) against negative-bag instances (label 0), its score grows along the directions
only positive bags contain. Tissue is spatially coherent, so each tile is described by the mean of
its features over its tile neighbourhood (its own and its 8 neighbours' at `radius` 1): the noise of
one tile averages out, a shift shared by a tumour region does not. Calibrated on negative bags left
out of the fit, an instance is unexplained by the negatives only when it scores above what they
score. Refined as mi-SVM refines its labels (Andrews, Tsochantaridis & Hofmann, NIPS 2002):
positive-bag instances that score like negatives leave the positive class, and negative-bag
instances that still score like positives (a confounder that occurs in both classes) weigh more, so
the direction turns away from what negative bags also hold.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["contrast_evidence", "neighbourhood_mean"]


def neighbourhood_mean(features: np.ndarray, coords: np.ndarray | None, radius: int = 1) -> np.ndarray:
    """(N, D) mean of each tile's features over the tiles of its bag within `radius` grid steps
    (Chebyshev; the grid step is the smallest spacing of the coords). Without coords, or radius 0,
    the features themselves."""
    f = np.asarray(features, np.float32)
    if coords is None or radius <= 0 or len(f) < 2:
        return f
    c = np.asarray(coords, np.int64)
    steps = [np.diff(np.unique(c[:, j])) for j in range(2)]
    step = min((int(s[s > 0].min()) for s in steps if (s > 0).any()), default=0)
    if step <= 0:
        return f
    g = (c - c.min(0)) // step
    h, w = int(g[:, 1].max()) + 1, int(g[:, 0].max()) + 1
    slot = np.full((h + 2 * radius, w + 2 * radius), -1, np.int64)
    slot[g[:, 1] + radius, g[:, 0] + radius] = np.arange(len(f))
    total, count = np.zeros_like(f), np.zeros(len(f), np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            j = slot[g[:, 1] + radius + dy, g[:, 0] + radius + dx]
            ok = j >= 0
            total[ok] += f[j[ok]]
            count[ok] += 1
    return total / count[:, None]


def _fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float, init: torch.Tensor | None) -> torch.Tensor:
    """Weighted L2-regularised logistic regression (L-BFGS, weights summing to 1); (D + 1,), bias last."""
    theta = (init.clone() if init is not None else x.new_zeros(x.shape[1] + 1)).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=100, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ theta[:-1] + theta[-1]
        loss = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() + l2 * theta[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _sample(features: list, coords: list, bags: list[int], m: int, radius: int,
            rng: np.random.Generator, tiles: bool = False) -> np.ndarray:
    """Up to m instances drawn uniformly across `bags`, as neighbourhood means (with `tiles`, also
    as the tiles alone, stacked after them)."""
    sizes = np.array([len(features[b]) for b in bags])
    flat = np.sort(rng.choice(int(sizes.sum()), min(m, int(sizes.sum())), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(starts, flat, side="right") - 1
    rows = [(o, flat[owner == o] - starts[o]) for o in np.unique(owner)]
    out = np.concatenate([neighbourhood_mean(features[bags[o]], coords[bags[o]], radius)[r] for o, r in rows])
    if tiles and radius > 0:
        alone = np.concatenate([np.asarray(features[bags[o]][r], np.float32) for o, r in rows])
        out = np.concatenate([out, alone])
    return out


@torch.no_grad()
def contrast_evidence(features: list, labels: list[int], coords: list | None = None, *, radius: int = 1,
                      rounds: int = 3, max_refs: int = 16384, quantile: float = 0.99, l2: float = 1e-3,
                      seed: int = 0, chunk: int = 8192, device: str | torch.device = "cpu") -> tuple[list, dict]:
    """Per-instance evidence e in [0, 1] that a positive bag's instance is not explained by the negative
    bags (0 for every instance of a negative bag), from a calibrated linear contrast; and a summary.

    x is an instance's neighbourhood mean (`neighbourhood_mean`, `radius`; coords[i] the bag's tile
    corners, None: the features as they are). The negative bags are split in two (seeded, by bag): a
    fitting half and a calibration half. Up to `max_refs` instances of the positive bags (P), of the
    fitting half (N) and half as many of the calibration half (C) are sampled and standardised on P
    and N; N's instances enter the fit twice, as neighbourhood means and as single tiles, so a tissue
    the negative bags hold scattered is negative also where it lies dense (a confounder gathered at
    a tumour margin has the single-tile score of its scattered twins in negative bags). Round 0 fits a class-balanced logistic regression s(x) = w.x + b of P (label 1) against N
    (label 0), the inheritance classifier; the calibration half gives the null: s0 = the `quantile` of
    s over C, T = (s0 - median_C s) / 4. Each later round keeps as positives only the instances of P
    with s > s0 (the others join the negatives), gives the instances of N with s > s0 together as much
    weight as the rest of N (hard negatives: what negative bags hold must stay below s0), refits from
    the last weights and recalibrates on C. Finally e(x) = sigmoid((s(x) - s0) / T) on every instance
    of a positive bag. C never enters a fit, so s0 is an honest null. Cost: `rounds` L-BFGS fits on
    at most 2 `max_refs` rows, then one pass over the positive bags."""
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    labels = [int(y) for y in labels]
    coords = coords if coords is not None else [None] * len(features)
    out = [np.zeros(len(f), np.float32) for f in features]
    pos = [i for i, y in enumerate(labels) if y == 1 and len(features[i])]
    neg = [i for i, y in enumerate(labels) if y == 0 and len(features[i])]
    if not pos or len(neg) < 2:
        return out, {"computed": False, "kind": "contrast"}
    neg = [neg[i] for i in rng.permutation(len(neg))]
    cal, fit = neg[:len(neg) // 2], neg[len(neg) // 2:]

    def take(bags, m, tiles=False):
        return torch.from_numpy(_sample(features, coords, bags, m, radius, rng, tiles)).to(dev)

    xp, xn, xc = take(pos, max_refs), take(fit, max_refs, True), take(cal, max(1, max_refs // 2))
    both = torch.cat([xp, xn])
    mu, sd = both.mean(0), both.std(0).clamp_min(1e-6)
    xp, xn, xc = ((t - mu) / sd for t in (xp, xn, xc))
    x = torch.cat([xp, xn])
    theta, history = None, []
    keep = torch.ones(len(xp), device=dev)                # positive-bag instances still in the positive class
    hard = torch.zeros(len(xn), dtype=torch.bool, device=dev)
    for r in range(max(1, rounds)):
        # class-balanced: the positive class and the negative class weigh 1/2 each; within the negatives,
        # the hard ones (N above s0) weigh together as much as all of N
        wneg = torch.cat([1 - keep, torch.ones(len(xn), device=dev) + hard.float() * len(xn) / max(int(hard.sum()), 1)])
        w = torch.cat([keep * 0.5 / keep.sum().clamp_min(1.0), torch.zeros(len(xn), device=dev)]) \
            + wneg * 0.5 / wneg.sum().clamp_min(1e-12)
        y = torch.cat([keep, torch.zeros(len(xn), device=dev)])
        with torch.enable_grad():
            theta = _fit(x, y, w, l2, theta)
        sc = xc @ theta[:-1] + theta[-1]
        s0 = torch.quantile(sc, quantile).item()
        temp = max((s0 - sc.median().item()) / 4, 1e-4)
        sp, sn = xp @ theta[:-1] + theta[-1], xn @ theta[:-1] + theta[-1]
        history.append({"round": r, "s0": s0, "kept_positives": int(keep.sum().item()),
                        "share_above": float((sp > s0).float().mean().item()),
                        "hard_negatives": float((sn > s0).float().mean().item())})
        if not (sp > s0).any():
            break
        keep, hard = (sp > s0).float(), sn > s0
    w_, b_ = (theta[:-1] / sd).cpu(), (theta[-1] - (mu / sd) @ theta[:-1]).item()
    n_pos, high = 0, 0
    for i in pos:
        f = neighbourhood_mean(features[i], coords[i], radius)
        s = np.concatenate([(torch.from_numpy(f[j:j + chunk]) @ w_).numpy() for j in range(0, len(f), chunk)]) + b_
        e = (1 / (1 + np.exp(-np.clip((s - s0) / temp, -60, 60)))).astype(np.float32)
        out[i] = e
        n_pos += len(e)
        high += int((e > 0.5).sum())
    info = {"computed": True, "kind": "contrast", "rounds": history, "s0": s0, "temperature": temp,
            "fit_bags": len(fit), "calibration_bags": len(cal), "refs_positive": len(xp), "refs_negative": len(xn),
            "null": len(xc), "positive_instances": n_pos, "share_above_half": high / max(n_pos, 1)}
    return out, info
