"""TransMIL: transformer MIL with Nystrom attention and a pyramid position encoding (Shao et al.,
NeurIPS 2021), made padding-aware so that a padded batch gives the same outputs as each bag alone.

As in the reference, each bag's tokens are laid out on their own square of side ceil(sqrt(n)) (the
square is filled by repeating the bag's first tokens), a CLS token is put in front, and two Nystrom
layers with a PPEG between them run over [CLS, square]. Differences from lucidrains' NystromAttention,
all needed for padding invariance: landmarks are the means of L_b = min(L, T_b) contiguous segments
of each bag's own T_b tokens (lucidrains front-pads the sequence with zero tokens to a multiple of L);
unused landmarks are masked and get identity rows/cols in the landmark kernel so the iterative
pseudo-inverse stays block diagonal; its initial scaling is taken per bag, not over the whole batch.
A bag of at most L tokens (one token per landmark) gets the softmax attention that its Nystrom
approximation converges to, computed directly: exact, and without the pinv's O(L^3) iterations, which
made small bags (a few hundred tiles, L = 256) cost ~20x their attention.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import instancewise, masked_softmax
from .registry import register_model


def iterative_pinv(x: Tensor, iters: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of x (B, H, L, L) by Newton-Schulz-type iterations (Nystromformer),
    with the initial scaling from each bag's own matrices (all heads), not the whole batch."""
    a = x.abs()
    scale = a.sum(-1).amax(dim=(1, 2)) * a.sum(-2).amax(dim=(1, 2))   # (B,)
    z = x.transpose(-1, -2) / scale[:, None, None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def _scores(a: Tensor, b: Tensor, keep_cols: Tensor) -> Tensor:
    """a @ b^T for (B, H, I, d) x (B, H, J, d), with -inf where keep_cols (B, J) is False, in one op."""
    B, H, I, _ = a.shape
    bias = torch.zeros(keep_cols.shape, dtype=a.dtype, device=a.device).masked_fill_(~keep_cols, float("-inf"))
    bias = bias[:, None, None].expand(B, H, 1, -1).reshape(B * H, 1, -1)
    return torch.baddbmm(bias, a.reshape(B * H, I, -1), b.reshape(B * H, b.shape[2], -1).transpose(1, 2)
                         ).view(B, H, I, -1)


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention over tokens where `valid` (the first `lengths[b]` of each bag)."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_landmarks: int, pinv_iterations: int,
                 residual_kernel: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.m, self.iters, self.scale = heads, num_landmarks, pinv_iterations, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: Tensor, valid: Tensor, lengths: Tensor, cls_attention: bool = False):
        B, T, _ = x.shape
        vm = valid[:, None, :, None]
        # Zeroed values at padding: the residual conv then sees what its own zero padding would give.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q, k, v = q * (vm * self.scale), k * vm, v * vm                          # (B, H, T, d)
        # A bag of at most L tokens has one token per landmark: its Nystrom approximation
        # attn1 @ pinv(attn2) @ attn3 is softmax attention itself (the three kernels are all the full
        # softmax kernel A, and A A+ A = A), which the pinv's iterations only approximate at O(T^3)
        # cost. Such bags take the exact softmax attention; larger ones the Nystrom approximation.
        small = lengths <= self.m
        out = v.new_zeros(v.shape)
        cls = v.new_zeros(B, T) if cls_attention else None
        for part, fn in ((small, self._exact), (~small, self._nystrom)):
            if not bool(part.any()):
                continue
            idx = part.nonzero().squeeze(1)
            t = int(lengths[idx].max())                                        # this part's padded length
            o, c = fn(q[idx, :, :t], k[idx, :, :t], v[idx, :, :t], valid[idx, :t], lengths[idx], cls_attention)
            out[idx, :, :t] = o
            if cls is not None:
                cls[idx, :t] = c
        out = out + self.res_conv(v)
        return self.to_out(out.transpose(1, 2).flatten(2)), cls

    @staticmethod
    def _exact(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, lengths: Tensor, cls_attention: bool):
        """Softmax attention over each bag's valid keys; the CLS query's row, mean over heads."""
        attn = _scores(q, k, valid).softmax(-1)                                # (B, H, T, T)
        return attn @ v, (attn[:, :, 0].mean(1) if cls_attention else None)

    def _nystrom(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, lengths: Tensor, cls_attention: bool):
        """The Nystrom approximation of softmax attention (landmarks: means of L_b contiguous segments)."""
        B, _, T, _ = q.shape
        m = self.m
        n_lm = lengths.clamp(max=m)                                            # L_b
        seg = torch.arange(T, device=q.device)[None] * n_lm[:, None] // lengths[:, None]
        seg = torch.where(valid, seg, m)                                       # padding -> a dropped slot
        idx = seg[:, None, :, None].expand_as(q)
        count = torch.zeros(B, m + 1, device=q.device, dtype=q.dtype).scatter_add_(1, seg, valid.to(q.dtype))
        count = count[:, None, :m, None].clamp(min=1)
        q_l = q.new_zeros(*q.shape[:2], m + 1, q.shape[-1]).scatter_add_(2, idx, q)[:, :, :m] / count
        k_l = k.new_zeros(*k.shape[:2], m + 1, k.shape[-1]).scatter_add_(2, idx, k)[:, :, :m] / count
        lm = torch.arange(m, device=q.device)[None] < n_lm[:, None]            # (B, L) landmark in use
        # The two big kernels only mask columns (unused landmarks, padded keys): every row keeps at least
        # one column, so a -inf bias gives exact zeros. Rows of unused landmarks in attn3 stay finite and
        # are never used: their columns in attn1 are exactly 0 and the pinv is block diagonal.
        attn1 = _scores(q, k_l, lm).softmax(-1)                                # (B, H, T, L)
        attn3 = _scores(q_l, k, valid).softmax(-1)                             # (B, H, L, T)
        attn2 = masked_softmax(q_l @ k_l.transpose(-1, -2), (lm[:, :, None] & lm[:, None, :])[:, None])
        attn2 = attn2 + torch.diag_embed((~lm).to(q.dtype))[:, None]         # identity on unused landmarks
        z = iterative_pinv(attn2, self.iters)
        out = attn1 @ (z @ (attn3 @ v))
        if not cls_attention:
            return out, None
        # The CLS query's row of the Nystrom approximation attn1 @ pinv @ attn3, mean over heads.
        return out, (attn1[:, :, :1] @ z @ attn3).squeeze(2).mean(1)


class TransLayer(nn.Module):
    def __init__(self, dim: int, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **kw)

    def forward(self, x: Tensor, valid: Tensor, lengths: Tensor, cls_attention: bool = False):
        out, a = self.attn(self.norm(x), valid, lengths, cls_attention)
        return (x + out) * valid[..., None], a


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convs over each bag's own square of tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, sides: list[int]) -> Tensor:
        rows = []
        for b, s in enumerate(sides):   # each bag has its own square, so one conv call per bag
            feat = x[b, 1:1 + s * s].transpose(0, 1).reshape(1, -1, s, s)
            feat = self.proj(feat) + feat + self.proj1(feat) + self.proj2(feat)
            rows.append(torch.cat([x[b, :1], feat.flatten(2)[0].transpose(0, 1), x[b, 1 + s * s:]]))
        return torch.stack(rows)


class TransMIL(nn.Module):
    """fc -> [CLS, square of tokens] -> TransLayer -> PPEG -> TransLayer -> LayerNorm -> head on CLS."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, heads: int = 8, dim_head: int = 64,
                 num_landmarks: int = 256, pinv_iterations: int = 6, residual_kernel: int = 33,
                 dropout: float = 0.25):
        super().__init__()
        kw = dict(heads=heads, dim_head=dim_head, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
                  residual_kernel=residual_kernel, dropout=dropout)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.layer1, self.layer2 = TransLayer(hidden, **kw), TransLayer(hidden, **kw)
        self.pos_layer = PPEG(hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, dict]:
        B, N, _ = x.shape
        dev = x.device
        # Move each bag's attended instances to the front, in order; the rest is never read.
        order = None if bool(mask.all()) else torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        h = instancewise(self.fc, x if order is None else x.gather(1, order[..., None].expand_as(x)))
        n = mask.sum(1).clamp(min=1)                                           # (B,)
        sides = [math.isqrt(v - 1) + 1 for v in n.tolist()]
        sq = torch.tensor([s * s for s in sides], device=dev)
        j = torch.arange(int(sq.max()), device=dev)[None]
        in_square = j < sq[:, None]                                            # (B, T-1)
        src = torch.where(in_square, j % n[:, None], 0)                        # fill: repeat the first tokens
        tokens = h.gather(1, src[..., None].expand(-1, -1, h.shape[-1]))
        seq = torch.cat([self.cls_token.expand(B, -1, -1), tokens], 1)
        valid = torch.cat([in_square.new_ones(B, 1), in_square], 1)
        lengths = sq + 1
        seq = seq * valid[..., None]
        seq, _ = self.layer1(seq, valid, lengths)
        seq = self.pos_layer(seq, sides)
        seq, cls_att = self.layer2(seq, valid, lengths, cls_attention=True)
        logits = self.head(self.norm(seq[:, 0]))
        # Attention: the CLS row clipped at 0; a repeated token's share goes to the instance it repeats.
        a = h.new_zeros(B, N).scatter_add_(1, src, cls_att[:, 1:].clamp(min=0) * in_square)
        if order is not None:
            a = torch.zeros_like(a).scatter_(1, order, a)
        a = a * mask
        total = a.sum(1, keepdim=True)
        a = torch.where(total > 0, a / total.clamp(min=torch.finfo(a.dtype).tiny), mask / n[:, None])
        return logits, a, {"cls_attention": cls_att}


@register_model(
    "transmil",
    paper="Shao et al. TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide "
          "Image Classification. NeurIPS 2021",
    url="https://github.com/szc19990412/TransMIL",
    license="unspecified",
    # Its PPEG and self-attention model the whole bag's layout: masking rejected tiles out under --w2s
    # cost 0.05 bag AUC on a synthetic cohort (0.953 vs 1.000); the distillation still applies.
    w2s_filter=False,
    description="Nystrom-attention transformer with PPEG position encoding; attention = CLS row of the last "
                "layer's Nystrom approximation",
    defaults={"hidden": 512, "heads": 8, "dim_head": 64, "num_landmarks": 256, "pinv_iterations": 6,
              "residual_kernel": 33},
)
def build_transmil(in_dim: int, n_classes: int, **kw) -> TransMIL:
    return TransMIL(in_dim, n_classes, **kw)
