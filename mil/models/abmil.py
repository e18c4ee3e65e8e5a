"""ABMIL: attention-based deep MIL with gated attention (Ilse, Tomczak & Welling, ICML 2018)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import GatedAttention, instancewise, masked_softmax
from .registry import register_model


class ABMIL(nn.Module):
    """fc D->hidden (ReLU, dropout) -> gated attention -> attention-weighted mean -> linear classifier."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_hidden: int = 256,
                 dropout: float = 0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_hidden)   # the reference has no dropout here
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, dict]:
        h = instancewise(self.fc, x)                                          # (B, N, hidden)
        logits = instancewise(self.attention, h)                              # (B, N)
        a = masked_softmax(logits, mask, dim=1)
        pooled = (a.unsqueeze(1) @ h).squeeze(1)                # (B, hidden)
        return self.classifier(pooled), a, {"attention_logits": logits}


@register_model(
    "abmil",
    paper="Ilse, Tomczak & Welling. Attention-based Deep Multiple Instance Learning. ICML 2018",
    url="https://github.com/AMLab-Amsterdam/AttentionDeepMIL",
    license="MIT",
    description="gated attention pooling of the instance embeddings; one bag classifier",
    defaults={"hidden": 512, "attn_hidden": 256},
)
def build_abmil(in_dim: int, n_classes: int, **kw) -> ABMIL:
    return ABMIL(in_dim, n_classes, **kw)
