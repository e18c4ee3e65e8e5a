"""DSMIL: dual-stream MIL with critical-instance attention (Li, Li & Eliceiri, CVPR 2021)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import instancewise, masked_softmax
from .registry import register_model


class DSMIL(nn.Module):
    """Stream 1: an instance classifier; its top instance per class is the critical instance.
    Stream 2: attention of every instance to the critical one (query similarity), bag embedding per
    class, Conv1d bag classifier. `extra_loss` is the CE of the max instance score (stream 1)."""

    def __init__(self, in_dim: int, n_classes: int, q_dim: int = 128, nonlinear: bool = True,
                 passing_v: bool = False, dropout: float = 0.25):
        super().__init__()
        self.i_classifier = nn.Linear(in_dim, n_classes)    # features are precomputed: extractor = identity
        self.q = (nn.Sequential(nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
                  if nonlinear else nn.Linear(in_dim, q_dim))
        # The reference's default (passing_v=False) uses the features themselves as values.
        self.v = (nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
                  if passing_v else nn.Identity())
        self.fcc = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, dict]:
        c = instancewise(self.i_classifier, x)                                           # (B, N, C)
        c_masked = c.masked_fill(~mask[..., None], float("-inf"))
        crit = c_masked.argmax(1)                                          # (B, C) critical instance per class
        m_feats = x.gather(1, crit[..., None].expand(-1, -1, x.shape[-1]))  # (B, C, D)
        Q, q_max = instancewise(self.q, x), self.q(m_feats)                              # (B, N, q), (B, C, q)
        A = masked_softmax(Q @ q_max.transpose(1, 2) / math.sqrt(Q.shape[-1]), mask[..., None], dim=1)  # (B, N, C)
        bag_emb = A.transpose(1, 2) @ self.v(x)                            # (B, C, D')
        bag_logits = self.fcc(bag_emb).squeeze(-1)                         # (B, C)
        # The positive class's attention in a binary task, else the mean over classes (still sums to 1).
        attention = A[..., 1] if A.shape[-1] == 2 else A.mean(-1)
        max_inst = c_masked.amax(1)                                        # (B, C)
        return bag_logits, attention, {"instance_scores": c, "max_instance_logits": max_inst, "A": A}

    def extra_loss(self, extras: dict, y: Tensor) -> Tensor:
        """CE of the max-instance prediction (the reference trains 0.5 bag + 0.5 max-instance loss)."""
        return F.cross_entropy(extras["max_instance_logits"], y)


@register_model(
    "dsmil",
    paper="Li, Li & Eliceiri. Dual-stream Multiple Instance Learning Network for Whole Slide Image "
          "Classification with Self-supervised Contrastive Learning. CVPR 2021",
    url="https://github.com/binli123/dsmil-wsi",
    license="MIT",
    description="max-instance stream + attention to the critical instance; bag logits from the second stream",
    defaults={"q_dim": 128, "nonlinear": True, "passing_v": False},
)
def build_dsmil(in_dim: int, n_classes: int, **kw) -> DSMIL:
    return DSMIL(in_dim, n_classes, **kw)
