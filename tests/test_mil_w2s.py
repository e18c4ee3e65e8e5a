"""The weak-to-strong losses behave as specified (mil/w2s.py)."""
import pytest
import torch

from mil.w2s import W2SConfig, distill_loss, hardened_student, keep_mask, student_loss, teacher_labels


def logits_from(z: torch.Tensor) -> torch.Tensor:
    """(B, N) positive log-odds -> (B, N, 2) logits."""
    return torch.stack([torch.zeros_like(z), z], -1)


def test_teacher_labels_minmax_in_positive_bags_zero_in_negative_and_padding():
    att = torch.tensor([[0.1, 0.2, 0.7, 0.0], [0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    y = torch.tensor([1, 0, 1])
    t = teacher_labels(att, mask, y)
    assert torch.allclose(t[0], torch.tensor([0.0, 1 / 6, 1.0, 0.0]))
    assert t[1].abs().sum() == 0                      # negative bag: every instance a sure negative
    assert t[2].tolist() == [1.0, 0.0, 0.0, 0.0]      # a single attended instance is the positive


def test_confident_student_overrules_a_wrong_teacher_label():
    # The teacher attends instance 0; the student is confident that 0 is negative and 5 is positive.
    att = torch.full((1, 10), 0.02)
    att[0, 0] = 0.82
    mask = torch.ones(1, 10, dtype=torch.bool)
    y = torch.tensor([1])
    z = torch.full((1, 10), -4.0)
    z[0, 0], z[0, 5] = -6.0, 6.0

    def grad(alpha, z0=None):
        zz = z.clone()
        if z0 is not None:
            zz[0, 0] = z0
        zz.requires_grad_(True)
        student_loss(logits_from(zz), att, mask, y, alpha).backward()
        return zz.grad[0]

    g_naive, g_w2s = grad(0.0), grad(1.0)
    assert g_naive[0] < 0 and g_naive[5] > 0          # alpha 0: pulled towards the teacher (0 up, 5 down)
    assert g_w2s[0] > 0 and g_w2s[5] < 0              # alpha 1: its own confident view wins (0 down, 5 up)
    # At the default alpha_max the target of instance 0 is 0.25 * 1 + 0.75 * 0: the student settles at
    # p = 0.25, a negative call, against the teacher.
    assert grad(0.75, z0=0.0)[0] > 0
    assert grad(0.75, z0=float(torch.logit(torch.tensor(0.25))))[0].abs() < 1e-6


def test_negative_bag_instances_stay_negative_whatever_alpha():
    att = torch.tensor([[0.9, 0.05, 0.05]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    y = torch.tensor([0])
    for alpha in (0.0, 0.5, 1.0):
        z = torch.tensor([[3.0, 0.0, -3.0]], requires_grad=True)
        student_loss(logits_from(z), att, mask, y, alpha).backward()
        assert (z.grad > 0).all()                      # every instance pushed towards negative


def test_padding_gets_no_gradient():
    att = torch.tensor([[0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    z = torch.tensor([[1.0, -1.0, 50.0]], requires_grad=True)
    student_loss(logits_from(z), att, mask, torch.tensor([1]), 0.75).backward()
    assert z.grad[0, 2] == 0


def test_hardened_student_threshold_comes_from_the_sure_negatives():
    # Negative-bag scores spread over [0, 0.5]; positive-bag scores over [0, 1].
    p = torch.cat([torch.linspace(0, 0.5, 200), torch.linspace(0, 1, 100)]).unsqueeze(0)
    neg = torch.zeros_like(p, dtype=torch.bool)
    neg[0, :200] = True
    pos = ~neg
    f = hardened_student(p, pos, neg, fp_rate=0.01)
    assert not f[neg].any()                            # only positive-bag instances are ever hardened to 1
    hard = p[0, 200:][f[0, 200:] == 1]
    assert hard.min() > 0.49 and abs(len(hard) - 50) <= 2   # above ~ the 99th percentile of the negatives
    assert hardened_student(p, pos, torch.zeros_like(neg)).sum() == (p[pos] > 0.5).sum()  # no negatives: 0.5


def test_keep_mask_rejects_confident_negatives_but_keeps_min_keep():
    z = torch.tensor([[-5.0, -6.0, -7.0, 2.0, -8.0, 0.0], [-5.0] * 6])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    keep = keep_mask(logits_from(z), mask, reject_below=0.1, min_keep=2)
    assert keep[0].tolist() == [True, False, False, True, False, False]   # 2 kept: the positive + best of the rest
    assert keep[1].sum() == 2 and not keep[1, 3:].any()                  # an all-negative bag keeps 2 real ones
    assert not (keep & ~mask).any()


def test_distill_loss_pulls_attention_towards_the_student_in_positive_bags_only():
    z = torch.tensor([[4.0, -4.0, -4.0, -4.0]])
    attended = torch.ones(1, 4, dtype=torch.bool)
    q = torch.sigmoid(z) / torch.sigmoid(z).sum()
    assert distill_loss(q.clone(), logits_from(z), attended, torch.tensor([1])).item() == pytest.approx(0, abs=1e-6)
    att_logits = torch.zeros(1, 4, requires_grad=True)       # uniform attention, as a softmax
    a = att_logits.softmax(1)
    loss = distill_loss(a, logits_from(z), attended, torch.tensor([1]))
    assert loss.item() > 0.5
    loss.backward()
    g = att_logits.grad[0]
    assert g[0] < 0 and (g[1:] > 0).all()                     # more attention on the student's positive
    assert distill_loss(a, logits_from(z), attended, torch.tensor([0])).item() == 0


def test_schedule_warmup_then_ramp_and_off_when_disabled():
    w = W2SConfig(warmup=2, ramp=4)
    assert [w.ramp_at(e) for e in range(7)] == [0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert not w.feedback_on(1) and w.feedback_on(2)
    off = W2SConfig(enabled=False)
    assert off.ramp_at(100) == 0 and not off.feedback_on(100)


def test_warmup_lasts_enough_optimizer_steps_but_at_most_a_third_of_training():
    w = W2SConfig(warmup=3, ramp=5, min_warmup_steps=50)
    assert w.scaled(steps_per_epoch=100, epochs=40).warmup == 3      # big cohort: 300 steps already
    assert w.scaled(steps_per_epoch=5, epochs=40).warmup == 10       # 50 steps
    assert w.scaled(steps_per_epoch=1, epochs=30).warmup == 10       # capped at a third of 30 epochs
    assert w.scaled(steps_per_epoch=1, epochs=6).warmup == 3         # never below the asked warm-up
