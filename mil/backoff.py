"""The back-off of weak-to-strong feedback: the bag branch as it would train without the student's
feedback (`Shadow`), and the test that says when the feedback hurts (`feedback_hurts`).

`mil.train` runs the twin beside the model and compares their validation bag losses every epoch;
when the feedback is worse for `backoff_patience` epochs, it turns filtering (then distillation) off
and the twin's weights take over (README, "Weak-to-strong pseudo-label correction", step 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig


@dataclass
class Shadow:
    """The bag branch as the run would train it without feedback: a copy of the bag branch trained on
    the bag loss alone (plus the model's own auxiliary loss), on the same batches, sharing the
    student. It is what `--w2s` falls back to when the student's feedback hurts (the back-off)."""

    model: Any          # a DualMIL whose `bag` is the copy and whose `student` is the trained model's
    opt: Any
    sched: Any

    @classmethod
    def of(cls, model, cfg: TrainConfig, total_steps: int) -> "Shadow":
        import copy

        student, model.student = model.student, None
        try:
            twin = copy.deepcopy(model)
        finally:
            model.student = student
        twin.student = student
        opt = torch.optim.AdamW(twin.bag.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return cls(twin, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps)))

    def step(self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
        bag = self.model.bag
        bag.train()
        logits, _, extras = bag(x, mask)
        loss = F.cross_entropy(logits, y)
        fn = getattr(bag, "extra_loss", None)
        if fn is not None:
            loss = loss + cfg.extra_weight * fn({**extras, "attended": mask}, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()


def feedback_hurts(loss_feedback: float, loss_plain: float, tol: float) -> str | None:
    """Why the student's feedback hurts the bag branch this epoch, or None: the validation bag loss of
    the model with feedback is worse than its feedback-free twin's by more than `tol` nats (a NaN
    loss with feedback counts as worse)."""
    if not np.isfinite(loss_feedback) or loss_feedback > loss_plain + tol:
        return (f"validation bag loss {loss_feedback:.3f} with the student's feedback vs {loss_plain:.3f} "
                f"without (tolerance {tol:.3f})")
    return None
