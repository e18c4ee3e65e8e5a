"""Weak-to-strong pseudo-label correction between the bag branch and the instance branch.

The bag branch is the weak teacher for instances: in a positive bag its attention, min-max
normalised, is a soft and noisy instance label; every instance of a negative bag is a sure
negative. The instance branch (the student, a stronger MLP) learns from those labels with
Burns et al.'s auxiliary confidence loss: its target mixes the teacher's label with its own
hardened prediction, thresholded so that its positive rate on the instances where the teacher is
certain (those of negative bags: 0) matches the teacher's, with a weight that ramps up, so it can
overrule the teacher where it is confident. Its corrected predictions
flow back: instances it confidently rejects are masked out of the bag branch's attention (during
training and at inference alike, so the bag branch sees the same kind of bag in both), and the
attention of positive bags is distilled towards the student's scores. The README gives the
equations; the notation below follows it.

Negative-bag evidence (`negative_evidence`): tumour never occurs in a negative bag; a confounder
(inflammation at the tumour margin, a benign mimic) does. So an instance of a positive bag whose
nearest neighbours among the negative bags' instances are as close as those among the other positive
bags' cannot be tumour: the negative-bag constraint of mi-SVM (Andrews, Tsochantaridis & Hofmann,
NIPS 2002), as a k-nearest-neighbour score calibrated on the negative bags themselves. It gates the
teacher's labels and the student's hardened labels, so the teacher cannot hand a confounder to the
student, and it vouches for instances the attention overlooked.

Discriminative evidence (`mil.contrast.contrast_evidence`): a subtle tumour, a small shift of a common
normal tissue, has normal nearest neighbours and escapes the k-NN evidence; a calibrated linear contrast
of positive- against negative-bag tiles sees the shift. `fold_evidence` computes the kind `W2SConfig.
evidence_kind` names; "both" takes the larger of the two per instance (an instance is explained only
when both say so).

Back-off: filtering and distillation feed the student back into the bag branch; `mil/train.py` keeps
them only while they do not hurt the validation bag loss (see `W2SConfig.backoff_tol`).

Without `--w2s` the student is still trained, naively: it fits the teacher's labels as they are
(alpha = 0) and nothing flows back. That is the baseline the correction is measured against.
Binary tasks: class index 0 is the negative class, 1 the positive. Multi-class tasks with a negative
class (normal / LUAD / LUSC): the student is one C-way classifier whose P(not negative) is "tumour"
(`positive_logit(..., negative=)`), corrected exactly as above with the negative class's bags as the
sure negatives; which positive class a tumour instance belongs to is taught by `class_loss` from the
attention of the bags of that class. Pure subtyping (no negative class) has no sure negatives to
calibrate on: `mil.train` refuses `--w2s` there, and `class_loss` alone trains the student.
"""
from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F

from .config import W2SConfig

__all__ = ["W2SConfig", "class_loss", "distill_loss", "fold_evidence", "hardened_student", "keep_mask",
           "negative_evidence", "prefit_student",
           "positive_logit", "student_loss", "teacher_labels"]


def positive_logit(instance_logits: torch.Tensor, negative: int = 0) -> torch.Tensor:
    """(B, N, C) logits -> (B, N) log-odds of "not the negative class" (C = 2: the positive class's
    logit minus the negative's; C > 2: logsumexp of the other classes' logits minus the negative's)."""
    if instance_logits.shape[-1] == 2:
        return instance_logits[..., 1 - negative] - instance_logits[..., negative]
    others = [c for c in range(instance_logits.shape[-1]) if c != negative]
    return instance_logits[..., others].logsumexp(-1) - instance_logits[..., negative]


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
                 y: torch.Tensor, alpha: float, fp_rate: float = 0.01,
                 evidence: torch.Tensor | None = None, negative: int = 0) -> torch.Tensor:
    """L_I: the weak-to-strong confidence loss of the student (alpha = 0: it fits the teacher as is).

    Positive-bag instances: BCE(p, (1 - alpha) t + alpha f_hat). Negative-bag instances: BCE(p, 0).
    The two groups are averaged separately and summed, so neither dominates by bag size.
    With `evidence` e (B, N) in [0, 1] (`negative_evidence`): t' = e * max(t, e) replaces t (an
    instance the negative bags explain is no positive whatever the attention; one they cannot explain
    is one at least as strongly as its evidence) and f_hat becomes e * f_hat. `y` is 1 for positive
    bags, 0 for negative ones; `negative`: the class index of `positive_logit`."""
    z = positive_logit(instance_logits, negative)
    pos = mask & (y == 1).unsqueeze(1)
    neg = mask & (y == 0).unsqueeze(1)
    loss = z.new_zeros(())
    if pos.any():
        t = teacher_labels(attention, mask, y)
        if evidence is not None:
            e = evidence.to(t.dtype)
            t = e * torch.maximum(t, e)
        if alpha > 0:
            f_hat = hardened_student(torch.sigmoid(z), pos, neg, fp_rate)
            if evidence is not None:
                f_hat = f_hat * e
            t = (1 - alpha) * t + alpha * f_hat
        loss = loss + F.binary_cross_entropy_with_logits(z[pos], t[pos])
    if neg.any():
        loss = loss + F.binary_cross_entropy_with_logits(z[neg], torch.zeros_like(z[neg]))
    return loss


def keep_mask(instance_logits: torch.Tensor, mask: torch.Tensor, reject_below: float, min_keep: int,
              negative: int = 0) -> torch.Tensor:
    """Instances the bag branch may attend to: those the student does not confidently reject
    (p >= reject_below), and always at least the `min_keep` it scores highest in each bag."""
    p = torch.sigmoid(positive_logit(instance_logits.detach(), negative))
    keep = mask & (p >= reject_below)
    k = min(min_keep, p.shape[1])
    if k > 0:
        top = torch.where(mask, p, torch.full_like(p, -1.0)).topk(k, dim=1).indices
        forced = torch.zeros_like(mask).scatter_(1, top, True) & mask
        keep = keep | forced
    return keep


def distill_loss(attention: torch.Tensor, instance_logits: torch.Tensor, attended: torch.Tensor,
                 y: torch.Tensor, negative: int = 0) -> torch.Tensor:
    """L_D = KL(q || a) over positive bags (y == 1), q = the student's probabilities normalised over
    the attended instances: the bag branch is pulled towards where the corrected student sees tumour."""
    pos_bags = y == 1
    if not pos_bags.any():
        return attention.new_zeros(())
    p = torch.sigmoid(positive_logit(instance_logits.detach(), negative)) * attended
    q = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    a = attention.clamp_min(1e-12)
    kl = torch.where(attended & (q > 0), q * (torch.log(q.clamp_min(1e-12)) - torch.log(a)), torch.zeros_like(q))
    return kl.sum(dim=1)[pos_bags].mean()


def class_loss(instance_logits: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
               negative: int | None, evidence: torch.Tensor | None = None) -> torch.Tensor:
    """Which class an instance is, for a multi-class student (B, N, C), taught per class from the
    attention of that class's bags: every instance of a bag of class c (c not `negative`) learns class
    c, weighted by its teacher label t (min-max attention; with `evidence`, e * max(t, e) as in
    `student_loss`). With a negative class the softmax runs over the other classes only (P(class |
    not negative): whether it is negative at all is `student_loss`'s part); without one (pure
    subtyping) over all C. Weighted mean over the weighted instances; 0 when there are none."""
    pos_bags = (y != negative) if negative is not None else torch.ones_like(y, dtype=torch.bool)
    t = teacher_labels(attention, mask, pos_bags.long())
    if evidence is not None and negative is not None:
        e = evidence.to(t.dtype)
        t = e * torch.maximum(t, e)
    if negative is None:
        logp, target = instance_logits.log_softmax(-1), y
    else:
        others = [c for c in range(instance_logits.shape[-1]) if c != negative]
        logp = instance_logits[..., others].log_softmax(-1)
        # index among the other classes (the negative bags' own, weighted 0, clamped into range)
        target = (y - (y > negative).long()).clamp(0, len(others) - 1)
    nll = -logp.gather(-1, target[:, None, None].expand(-1, logp.shape[1], 1)).squeeze(-1)   # (B, N)
    w = t * pos_bags[:, None]
    total = w.sum()
    if total <= 0:
        return nll.new_zeros(())
    return (nll * w).sum() / total


# ---- negative-bag evidence ------------------------------------------------------------------------
def _topk(q: torch.Tensor, qb: torch.Tensor, ref: torch.Tensor, rb: torch.Tensor, k: int):
    """The k largest cosine similarities of each row of q to ref (values, indices), leaving out ref
    rows of the query's own bag (qb, rb: bag ids)."""
    s = q @ ref.T
    s.masked_fill_(qb[:, None] == rb[None, :], -2.0)
    return s.topk(min(k, s.shape[1]), dim=1)


@torch.no_grad()
def negative_evidence(features: list, labels: list[int], *, k: int = 5, max_refs: int = 8192,
                      quantile: float = 0.99, seed: int = 0, chunk: int = 2048,
                      device: str | torch.device = "cpu") -> tuple[list, dict]:
    """Per-instance evidence e in [0, 1] that a positive bag's instance is *not* explained by the
    negative bags (0 for every instance of a negative bag), and a summary dict.

    Features are centred on the mean of the reference instances and L2-normalised (cosine). For an
    instance x of bag b, with s_P(x) and s_N(x) the mean of its k largest similarities to a reference
    sample of the positive bags' and of the negative bags' instances (bag b left out of both), its
    positive-enrichment is r(x) = s_P(x) - s_N(x). A type that occurs in both classes but is commoner
    in positive bags (a confounder) has r > 0 too, as much as its density ratio makes it, so r is
    compared with the r of x's own k nearest negative-bag neighbours (their r measured the same way):

        d(x) = r(x) - mean_{n in kNN_N(x)} r(n),        e(x) = sigmoid((d(x) - d0) / T),

    d0 the `quantile` of d over a sample of negative-bag instances (the null) and T = (d0 - median of
    the null) / 4. A confounder's negative neighbours are the same confounder, as enriched as it is:
    d ~ 0. Tumour, never in a negative bag, has as nearest negatives other tissue (a mimic), far less
    enriched: d >> d0, e ~ 1. This is mi-SVM's constraint (Andrews, Tsochantaridis & Hofmann, NIPS
    2002: no instance of a negative bag is positive, so whatever resembles the negative bags'
    instances is negative) as a nearest-neighbour score; WENO (Qu et al. 2022) and DMKD (arXiv
    2505.12074) likewise treat the negative bags as the one sure source of instance labels.

    Bounded cost: at most `max_refs` reference instances per class (sampled across bags) and
    `max_refs // 2` null instances; queries go in chunks of `chunk` rows, so memory is
    O(chunk * max_refs) whatever the bag sizes (bags of 10^5 instances stream through). Compute:
    one (n_positive_instances + 1.5 max_refs) x 2 max_refs x D matmul per fold."""
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    labels = [int(y) for y in labels]
    sizes = np.array([len(f) for f in features])

    def sample(cls: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        bags = [i for i, y in enumerate(labels) if y == cls]
        total = int(sizes[bags].sum()) if bags else 0
        if not total:
            return torch.zeros(0, features[0].shape[1]), torch.zeros(0, dtype=torch.long)
        flat = np.sort(rng.choice(total, min(m, total), replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes[bags])])
        owner = np.searchsorted(starts, flat, side="right") - 1
        rows = [np.asarray(features[bags[o]][flat[owner == o] - starts[o]], np.float32) for o in np.unique(owner)]
        ids = np.concatenate([np.full((owner == o).sum(), bags[o]) for o in np.unique(owner)])
        return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(ids)

    raw_p, bid_p = sample(1, max_refs)
    raw_n, bid_n = sample(0, max_refs)
    out = [np.zeros(n, np.float32) for n in sizes]
    if not len(raw_p) or not len(raw_n):
        return out, {"computed": False}
    mu = torch.cat([raw_p, raw_n]).mean(0)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.to(dev, torch.float32) - mu.to(dev), dim=1)

    ref_p, ref_n, bid_p, bid_n = norm(raw_p), norm(raw_n), bid_p.to(dev), bid_n.to(dev)

    def enrichment(x: torch.Tensor, bag_ids: torch.Tensor, r_neg: torch.Tensor | None):
        """r (and d when the negatives' r is given) of raw rows x, in chunks."""
        rs, ds = [], []
        for i in range(0, len(x), chunk):
            q, qb = norm(x[i:i + chunk]), bag_ids[i:i + chunk].to(dev)
            sp = _topk(q, qb, ref_p, bid_p, k).values.mean(1)
            sn, idx = _topk(q, qb, ref_n, bid_n, k)
            r = sp - sn.mean(1)
            rs.append(r)
            if r_neg is not None:
                ds.append(r - r_neg[idx].mean(1))
        r = torch.cat(rs)
        return r, (torch.cat(ds) if r_neg is not None else None)

    r_neg, _ = enrichment(raw_n, bid_n.cpu(), None)       # the negatives' own enrichment (bag left out)
    null_x, null_b = sample(0, max(1, max_refs // 2))
    _, null = enrichment(null_x, null_b, r_neg)
    null = null[torch.isfinite(null)].cpu()
    d0 = torch.quantile(null, quantile).item()
    temp = max((d0 - null.median().item()) / 4, 1e-4)
    n_pos, high = 0, 0
    for i, (f, y) in enumerate(zip(features, labels)):
        if y != 1:
            continue
        _, d = enrichment(torch.from_numpy(np.asarray(f, np.float32)), torch.full((len(f),), i), r_neg)
        e = torch.sigmoid((d.cpu() - d0) / temp).numpy().astype(np.float32)
        out[i] = e
        n_pos += len(e)
        high += int((e > 0.5).sum())
    info = {"computed": True, "k": k, "refs_positive": len(ref_p), "refs_negative": len(ref_n), "null": len(null),
            "d0": d0, "temperature": temp, "positive_instances": n_pos,
            "share_above_half": high / max(n_pos, 1)}
    return out, info


def fold_evidence(bags: list, labels: list[int], w: W2SConfig, *, seed: int = 0,
                  device: str | torch.device = "cpu") -> tuple[list, dict]:
    """The negative-bag evidence of a fold's training bags (`labels`: 1 positive bag, 0 negative) as
    `w.evidence_kind` names it: "knn" (`negative_evidence`), "contrast" (`mil.contrast.contrast_evidence`),
    "both" (e = max(e_knn, e_contrast) per instance), or "auto": the k-NN evidence, joined by the contrast
    (as in "both") when the k-NN evidence leaves fewer than `w.contrast_below` of the positive bags'
    instances unexplained (e > 1/2): a tumour that is a type of its own is left to the k-NN evidence,
    which does not also flag a confounder gathered at its margin; one it cannot see is sought by the
    contrast. Returns per-bag arrays and a summary (per kind)."""
    from .cohort import LazyFeatures
    from .contrast import contrast_evidence

    feats = [LazyFeatures(b) for b in bags]
    kind = w.evidence_kind
    parts: dict[str, tuple[list, dict]] = {}
    if kind in ("knn", "both", "auto"):
        parts["knn"] = negative_evidence(feats, labels, k=w.evidence_k, max_refs=w.evidence_refs,
                                         quantile=w.evidence_quantile, seed=seed, device=device)
        if kind == "auto":
            info = parts["knn"][1]
            kind = "both" if not info["computed"] or info["share_above_half"] < w.contrast_below else "knn"
    if kind in ("contrast", "both"):
        parts["contrast"] = contrast_evidence(feats, labels, [b.coords for b in bags], radius=w.contrast_radius,
                                              rounds=w.contrast_rounds, max_refs=2 * w.evidence_refs,
                                              quantile=w.evidence_quantile, seed=seed, device=device)
    if len(parts) == 1:
        e, info = next(iter(parts.values()))
        return e, {**info, "used": kind}
    done = [p for p in parts.values() if p[1]["computed"]]
    summary = {k: v[1] for k, v in parts.items()}
    if not done:
        return parts["knn"][0], {"computed": False, "used": kind, **summary}
    e = [np.maximum.reduce([p[0][i] for p in done]) for i in range(len(bags))]
    n = sum(len(x) for x, y in zip(e, labels) if y == 1)
    high = sum(int((x > 0.5).sum()) for x, y in zip(e, labels) if y == 1)
    return e, {"computed": True, "used": kind, "share_above_half": high / max(n, 1), **summary}


def prefit_student(student: torch.nn.Module, features: list, evidence: list, labels: list[int], *, steps: int,
                   lr: float = 1e-3, batch_size: int = 512, max_instances: int = 65536, seed: int = 0,
                   negative: int = 0, device: str | torch.device = "cpu") -> dict:
    """Fit the student to the evidence before the bag loop: positive-bag instances towards e, negative-bag
    instances towards 0 (class-balanced BCE on `positive_logit`), `steps` AdamW steps on mini-batches of
    instances sampled across the bags (at most `max_instances`, half per class). A shift a few noise
    widths from a common tissue takes many instance-level steps to learn; the bag loop gives the student
    few, on whole bags. Seeded inside a forked RNG: the fold's random state is the same without it."""
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    xs, ts, cs = [], [], []
    for cls in (1, 0):
        bags = [i for i, y in enumerate(labels) if y == cls and len(features[i])]
        sizes = np.array([len(features[i]) for i in bags])
        if not len(bags):
            continue
        flat = np.sort(rng.choice(int(sizes.sum()), min(max_instances // 2, int(sizes.sum())), replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(starts, flat, side="right") - 1
        for o in np.unique(owner):
            rows = flat[owner == o] - starts[o]
            xs.append(np.asarray(features[bags[o]][rows], np.float32))
            ts.append(np.asarray(evidence[bags[o]], np.float32)[rows] if cls else np.zeros(len(rows), np.float32))
            cs.append(np.full(len(rows), cls))
    if not xs or steps <= 0:
        return {"steps": 0}
    x, t, c = (torch.from_numpy(np.concatenate(a)) for a in (xs, ts, cs))
    w = torch.where(c == 1, 0.5 / max(int((c == 1).sum()), 1), 0.5 / max(int((c == 0).sum()), 1)) * len(c)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
        was = student.training
        student.train()
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),))
            z = positive_logit(student(x[idx].to(dev)), negative)
            loss = (F.binary_cross_entropy_with_logits(z.float(), t[idx].to(dev), reduction="none")
                    * w[idx].to(dev)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.train(was)
    return {"steps": steps, "instances": len(x), "last_loss": float(loss.item())}
