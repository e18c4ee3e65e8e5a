"""Weak-to-strong pseudo-label correction between the bag branch and the instance branch.

The bag branch is the weak teacher for instances: in a positive bag its attention, min-max
normalised, is a soft and noisy instance label; every instance of a negative bag is a sure
negative. The instance branch (the student, a stronger MLP) learns from those labels with
Burns et al.'s auxiliary confidence loss: its target mixes the teacher's label with its own
hardened prediction, thresholded so that its positive rate on the instances where the teacher is
certain (those of negative bags: 0) matches the teacher's, with a weight that ramps up, so it can overrule the teacher where it is confident. Its corrected predictions
flow back: instances it confidently rejects are masked out of the bag branch's attention (during
training and at inference alike, so the bag branch sees the same kind of bag in both), and the
attention of positive bags is distilled towards the student's scores. The README gives the
equations; the notation below follows it.

Without `--w2s` the student is still trained, naively: it fits the teacher's labels as they are
(alpha = 0) and nothing flows back. That is the baseline the correction is measured against.
Binary tasks only: class index 0 is the negative class, 1 the positive.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import W2SConfig

__all__ = ["W2SConfig", "distill_loss", "hardened_student", "keep_mask", "positive_logit", "student_loss",
           "teacher_labels"]


def positive_logit(instance_logits: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) logits -> (B, N) logit of the positive class (log-odds against the negative)."""
    return instance_logits[..., 1] - instance_logits[..., 0]


def teacher_labels(attention: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft instance labels t (B, N): min-max normalised attention in positive bags, 0 in negative ones.

    A bag with one attended instance gives it label 1. Masked positions get 0."""
    a = attention.detach()
    big = torch.finfo(a.dtype).max
    lo = torch.where(mask, a, big).amin(dim=1, keepdim=True)
    hi = torch.where(mask, a, -big).amax(dim=1, keepdim=True)
    span = hi - lo
    t = torch.where(span > 0, (a - lo) / span.clamp_min(1e-12), torch.ones_like(a))
    t = t * mask * (y == 1).unsqueeze(1)
    return t


def hardened_student(p: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, fp_rate: float = 0.01) -> torch.Tensor:
    """f_hat (B, N): the student's own predictions on positive-bag instances, hardened at the threshold
    tau where its positive rate on the teacher's sure negatives (the negative bags' instances) matches
    the teacher's, 0, up to `fp_rate`. Without negative bags in the batch, tau = 0.5."""
    p = p.detach()
    negp = p[neg]
    if negp.numel():
        k = min(negp.numel(), max(1, math.ceil((1 - fp_rate) * negp.numel())))
        tau = negp.kthvalue(k).values   # torch.quantile refuses inputs over 16M elements
    else:
        tau = p.new_tensor(0.5)
    return ((p > tau) & pos).to(p.dtype)


def student_loss(instance_logits: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor,
                 y: torch.Tensor, alpha: float, fp_rate: float = 0.01) -> torch.Tensor:
    """L_I: the weak-to-strong confidence loss of the student (alpha = 0: it fits the teacher as is).

    Positive-bag instances: BCE(p, (1 - alpha) t + alpha f_hat). Negative-bag instances: BCE(p, 0).
    The two groups are averaged separately and summed, so neither dominates by bag size."""
    z = positive_logit(instance_logits)
    pos = mask & (y == 1).unsqueeze(1)
    neg = mask & (y == 0).unsqueeze(1)
    loss = z.new_zeros(())
    if pos.any():
        t = teacher_labels(attention, mask, y)
        if alpha > 0:
            f_hat = hardened_student(torch.sigmoid(z), pos, neg, fp_rate)
            t = (1 - alpha) * t + alpha * f_hat
        loss = loss + F.binary_cross_entropy_with_logits(z[pos], t[pos])
    if neg.any():
        loss = loss + F.binary_cross_entropy_with_logits(z[neg], torch.zeros_like(z[neg]))
    return loss


def keep_mask(instance_logits: torch.Tensor, mask: torch.Tensor, reject_below: float, min_keep: int) -> torch.Tensor:
    """Instances the bag branch may attend to: those the student does not confidently reject
    (p >= reject_below), and always at least the `min_keep` it scores highest in each bag."""
    p = torch.sigmoid(positive_logit(instance_logits.detach()))
    keep = mask & (p >= reject_below)
    k = min(min_keep, p.shape[1])
    if k > 0:
        top = torch.where(mask, p, torch.full_like(p, -1.0)).topk(k, dim=1).indices
        forced = torch.zeros_like(mask).scatter_(1, top, True) & mask
        keep = keep | forced
    return keep


def distill_loss(attention: torch.Tensor, instance_logits: torch.Tensor, attended: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """L_D = KL(q || a) over positive bags, q = the student's probabilities normalised over the
    attended instances: the bag branch is pulled towards where the corrected student sees tumour."""
    pos_bags = y == 1
    if not pos_bags.any():
        return attention.new_zeros(())
    p = torch.sigmoid(positive_logit(instance_logits.detach())) * attended
    q = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    a = attention.clamp_min(1e-12)
    kl = torch.where(attended & (q > 0), q * (torch.log(q.clamp_min(1e-12)) - torch.log(a)), torch.zeros_like(q))
    return kl.sum(dim=1)[pos_bags].mean()
