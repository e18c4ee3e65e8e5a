"""CLAM-SB: clustering-constrained attention MIL, single branch (Lu et al., Nat. Biomed. Eng. 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import GatedAttention, instancewise, masked_softmax
from .registry import register_model


class CLAMSB(nn.Module):
    """ABMIL-like trunk plus one 2-way instance classifier per class, trained by `extra_loss` on the
    k most and k least attended instances of each bag (CLAM's instance-level clustering)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_hidden: int = 256,
                 k_sample: int = 8, subtyping: bool = False, dropout: float = 0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))
        self.k_sample, self.subtyping = k_sample, subtyping

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, dict]:
        h = instancewise(self.fc, x)
        logits = instancewise(self.attention, h)
        a = masked_softmax(logits, mask, dim=1)
        pooled = (a.unsqueeze(1) @ h).squeeze(1)
        return self.classifier(pooled), a, {"h": h, "attention_logits": logits, "attended": mask}

    def extra_loss(self, extras: dict, y: Tensor) -> Tensor:
        """Mean over bags of CLAM's instance loss. Per bag k = min(k_sample, n_attended // 2) so small
        bags work (the reference needs n >= k_sample); bags with k = 0 are left out. The in-class
        classifier learns top-k -> 1, bottom-k -> 0; with subtyping, every other class's classifier
        learns top-k -> 0 and the sum is divided by the number of classes, as in CLAM."""
        h, logits, att = extras["h"], extras["attention_logits"], extras["attended"]
        k = (att.sum(1) // 2).clamp(max=self.k_sample)                        # (B,)
        kmax = min(self.k_sample, h.shape[1])
        used = k > 0
        if kmax == 0 or not bool(used.any()):
            return h.sum() * 0.0
        top = logits.masked_fill(~att, float("-inf")).topk(kmax, dim=1).indices
        bottom = (-logits).masked_fill(~att, float("-inf")).topk(kmax, dim=1).indices
        valid = torch.arange(kmax, device=h.device) < k[:, None]             # (B, kmax) ranks < k are real
        W = torch.stack([c.weight for c in self.instance_classifiers])        # (C, 2, hidden)
        b = torch.stack([c.bias for c in self.instance_classifiers])          # (C, 2)
        top_logits = torch.einsum("bkh,coh->bkco", _take(h, top), W) + b      # (B, kmax, C, 2)
        rows = torch.arange(len(y), device=h.device)
        bottom_logits = torch.einsum("bkh,boh->bko", _take(h, bottom), W[y]) + b[y][:, None]
        pos = _ce(top_logits[rows, :, y], 1)                                  # in-class: top-k -> 1
        neg = _ce(bottom_logits, 0)                                           # in-class: bottom-k -> 0
        kf = k.clamp(min=1).to(h.dtype)
        per_bag = ((pos + neg) * valid).sum(1) / (2 * kf)
        if self.subtyping:                                                    # other classes: top-k -> 0
            out = (_ce(top_logits, 0) * valid[..., None]).sum(1) / kf[:, None]   # (B, C)
            out = out.masked_fill(F.one_hot(y, out.shape[1]).bool(), 0.0)
            per_bag = (per_bag + out.sum(1)) / len(self.instance_classifiers)
        return per_bag[used].mean()


def _take(h: Tensor, idx: Tensor) -> Tensor:
    """h (B, N, H), idx (B, K) -> (B, K, H)."""
    return h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def _ce(logits: Tensor, target: int) -> Tensor:
    """Cross-entropy of (..., 2) logits against a constant class, unreduced (...)."""
    return -logits.log_softmax(-1)[..., target]


@register_model(
    "clam-sb",
    paper="Lu et al. Data-efficient and weakly supervised computational pathology on whole-slide images. "
          "Nat. Biomed. Eng. 2021",
    url="https://github.com/mahmoodlab/CLAM",
    license="GPL-3.0",
    description="gated attention pooling + instance clustering loss on the top/bottom-k attended instances",
    defaults={"hidden": 512, "attn_hidden": 256, "k_sample": 8, "subtyping": False},
)
def build_clam_sb(in_dim: int, n_classes: int, **kw) -> CLAMSB:
    return CLAMSB(in_dim, n_classes, **kw)
