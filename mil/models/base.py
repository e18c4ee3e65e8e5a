"""What every MIL model shares: the output record, the dual-level wrapper, the instance student,
the masked softmax and the gated attention of ABMIL and CLAM.
`extras["attended"]` always holds the (B, N) mask the bag branch attended over.

Padding rule: a bag branch gets a bool mask (True = attend) and must give the same outputs for a
padded batch as for each bag alone, whatever the (finite) feature values at masked positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class MILOutput:
    """Outputs of a DualMIL forward pass."""

    bag_logits: Tensor        # (B, C)
    attention: Tensor         # (B, N) >= 0, sums to 1 over each bag's attended instances, exactly 0 elsewhere
    instance_logits: Tensor   # (B, N, C) the student's logits
    extras: dict[str, Tensor] = field(default_factory=dict)   # model-specific, for its extra_loss


INSTANCE_CHUNK = 8192  # instances per chunk of a per-instance module on very large bags


def instancewise(module: nn.Module, x: Tensor, chunk: int | None = None) -> Tensor:
    """`module` applied to every instance of x (B, N, ...), in chunks of `chunk` instances when N is
    larger. While training, each chunk is checkpointed: only its output is kept for the backward pass
    and its intermediates are recomputed, so a 200,000-instance bag trains in a few GiB (with
    `wsi.runtime.large_frees_to_os()` around the call, as `mil train` and `mil predict` do, so the
    chunks' freed buffers go back to the OS)."""
    n, chunk = x.shape[1], chunk or INSTANCE_CHUNK
    if n <= chunk:
        return module(x)
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    parts = [checkpoint(module, x[:, i:i + chunk], use_reentrant=False) if grad else module(x[:, i:i + chunk])
             for i in range(0, n, chunk)]
    return torch.cat(parts, 1)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` where `mask` is True; exactly 0 where it is False (and all 0 for an all-False
    row instead of NaN). `mask` broadcasts against `logits`."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return filled.softmax(dim) * mask


class GatedAttention(nn.Module):
    """Gated attention of Ilse et al. 2018 (as in CLAM's Attn_Net_Gated): w^T (tanh(V h) * sigm(U h))."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, N, dim) -> attention logits (B, N)."""
        return self.w(self.a(h) * self.b(h)).squeeze(-1)


class InstanceStudent(nn.Module):
    """Per-instance classifier (the instance branch): LayerNorm -> 2 GELU layers -> C logits."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DualMIL(nn.Module):
    """A bag branch (the registered model) and an instance student over the same features."""

    def __init__(self, bag: nn.Module, student: nn.Module, name: str = ""):
        super().__init__()
        self.bag, self.student, self.name = bag, student, name
        # Weak-to-strong feedback (mil/w2s.py): when set, instances the student scores below
        # `reject_below` leave the bag branch's attention (at least `min_keep` stay). Training turns it
        # on after warm-up; a model trained with it keeps it for inference (saved in the run config).
        self.reject_below: float | None = None
        self.min_keep: int = 8
        self.w2s_filter = True   # False for models that need the whole bag (registry metadata)
        self.negative_index = 0  # the class whose probability is "not tumour" (mil.w2s.positive_logit)

    def forward(self, x: Tensor, mask: Tensor | None = None, keep: Tensor | None = None) -> MILOutput:
        """x (B, N, D); mask (B, N) True = real instance (None: all real); keep (B, N) an extra filter
        for the bag branch only. A bag whose `keep` would leave nothing attended falls back to `mask`
        (the bag branch then sees all its real instances). The student scores every position."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        instance_logits = instancewise(self.student, x)
        if keep is None and self.reject_below is not None and self.w2s_filter:
            from ..w2s import keep_mask

            keep = keep_mask(instance_logits, mask, self.reject_below, self.min_keep, self.negative_index)
        attended = mask
        if keep is not None:
            attended = mask & keep
            attended = torch.where(attended.any(1, keepdim=True), attended, mask)
        bag_logits, attention, extras = self.bag(x, attended)
        return MILOutput(bag_logits, attention, instance_logits, {**extras, "attended": attended})

    def extra_loss(self, out: MILOutput, y: Tensor) -> Tensor:
        """The bag branch's auxiliary loss (CLAM instance loss, DSMIL max-instance CE), else a 0 scalar."""
        fn = getattr(self.bag, "extra_loss", None)
        return fn(out.extras, y) if fn is not None else out.bag_logits.new_zeros(())

    @torch.inference_mode()
    def predict_bag(self, x: Tensor) -> MILOutput:
        """One whole bag (N, D) -> outputs with B=1, in eval mode (the training mode is restored).
        Features are cast to the model's dtype (bags may hold float16)."""
        was_training = self.training
        self.eval()
        try:
            return self(x.to(next(self.parameters()).dtype).unsqueeze(0))
        finally:
            self.train(was_training)
