"""mil.models: registry, padding invariance, keep-masks, extra losses, a toy fit, one big bag (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mil.models import DualMIL, MILOutput, create_model, get_spec, list_models

NAMES = ["abmil", "clam-sb", "dsmil", "transmil"]
D = 32
SIZES = [7, 40, 300]             # transmil below runs with 16 landmarks: 7 < 16 < 40
SMALL = {"abmil": {"hidden": 64, "attn_hidden": 32}, "clam-sb": {"hidden": 64, "attn_hidden": 32},
         "dsmil": {}, "transmil": {"hidden": 64, "heads": 2, "dim_head": 32, "num_landmarks": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, n_classes: int = 2, **kw) -> DualMIL:
    torch.manual_seed(0)
    if name == "transmil":
        kw = {"num_landmarks": 16, **kw}
    return create_model(name, D, n_classes, **kw).eval()


def padded(sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(sizes), max(sizes), D, generator=g)
    mask = torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]
    return x, mask


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_bag_by_bag(name, n_classes):
    model, (x, mask) = build(name, n_classes), padded()
    with torch.no_grad():
        out = model(x, mask)
        assert isinstance(out, MILOutput)
        assert out.bag_logits.shape == (3, n_classes) and out.attention.shape == mask.shape
        assert out.instance_logits.shape == (*mask.shape, n_classes)
        for i, n in enumerate(SIZES):
            one = model(x[i:i + 1, :n])
            assert close(one.bag_logits[0], out.bag_logits[i]), name
            assert close(one.attention[0], out.attention[i, :n]), name
            assert close(one.instance_logits[0], out.instance_logits[i, :n]), name
        assert close(model(x).bag_logits, model(x, torch.ones_like(mask)).bag_logits)


@pytest.mark.parametrize("name", NAMES)
def test_padding_values_change_nothing_and_attention_is_a_distribution(name):
    model, (x, mask) = build(name), padded()
    noisy = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        a, b = model(x, mask), model(noisy, mask)
    assert close(a.bag_logits, b.bag_logits, atol=1e-6)
    assert close(a.attention, b.attention, atol=1e-6)
    assert torch.equal(a.instance_logits[mask], b.instance_logits[mask])
    assert torch.isfinite(b.instance_logits).all()
    assert (a.attention[~mask] == 0).all() and (a.attention >= 0).all()
    assert close(a.attention.sum(1), torch.ones(3))


@pytest.mark.parametrize("name", NAMES)
def test_keep_filters_the_bag_branch_only(name):
    model, (x, mask) = build(name), padded()
    keep = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[0] = False                                   # bag 0: nothing kept -> falls back to its mask
    attended = mask & keep
    attended[0] = mask[0]
    changed = torch.where(attended[..., None], x, x + 5 * torch.randn_like(x))
    with torch.no_grad():
        out, alt, plain = model(x, mask, keep), model(changed, mask, keep), model(x, mask)
        assert (out.attention[~attended] == 0).all()
        assert close(out.attention.sum(1), torch.ones(3))
        assert close(out.bag_logits, alt.bag_logits, atol=1e-6)
        assert close(out.bag_logits[0], plain.bag_logits[0])            # the fallback bag
        # The bag branch sees a kept-out instance exactly as if it were not in the bag.
        for i in (1, 2):
            only = model(x[i:i + 1][:, attended[i]])
            assert close(only.bag_logits[0], out.bag_logits[i])
        # ... while the student still scores every real instance.
        assert torch.equal(out.instance_logits, plain.instance_logits)
        rejected = mask & ~attended
        assert not close(out.instance_logits[rejected], alt.instance_logits[rejected])


@pytest.mark.parametrize("name", NAMES)
def test_extra_loss_is_finite_and_trains(name):
    model, (x, mask) = build(name), padded([1, 5, 40])
    model.train()
    y = torch.tensor([0, 1, 1])
    out = model(x, mask)
    extra = model.extra_loss(out, y)
    assert extra.dim() == 0 and torch.isfinite(extra)
    (F.cross_entropy(out.bag_logits, y) + extra + F.cross_entropy(out.instance_logits[mask], y.repeat_interleave(
        mask.sum(1)))).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    if name in ("clam-sb", "dsmil"):
        assert extra.item() > 0
    else:
        assert extra.item() == 0


def test_clam_instance_loss_variants():
    model = build("clam-sb", 3, subtyping=True)
    x, mask = padded([1, 3, 40])
    out = model(x, mask)
    loss = model.extra_loss(out, torch.tensor([0, 2, 1]))
    assert torch.isfinite(loss) and loss.requires_grad
    tiny = model(x[:1, :1])                        # one instance: no top/bottom pair, loss 0
    assert model.extra_loss(tiny, torch.tensor([1])).item() == 0


def test_registry():
    assert {s.name for s in list_models()} == set(NAMES)
    for s in list_models():
        assert s.paper and s.url.startswith("https://") and s.license and s.description
    assert get_spec("transmil").license == "unspecified" and get_spec("clam-sb").defaults["k_sample"] == 8
    with pytest.raises(ValueError, match="abmil, clam-sb, dsmil, transmil"):
        create_model("nope", D, 2)
    with pytest.raises(ValueError, match="k_sample"):
        create_model("clam-sb", D, 2, hiden=3)


def toy_bags(n_bags=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 16, (n_bags,), generator=g).tolist()
    y = torch.tensor([i % 2 for i in range(n_bags)])
    x, mask = torch.randn(n_bags, max(sizes), 16, generator=g), torch.zeros(n_bags, max(sizes), dtype=torch.bool)
    for i, n in enumerate(sizes):
        mask[i, :n] = True
        if y[i]:
            x[i, torch.randint(0, n, (1,), generator=g), :2] += 2.0     # the positive instance
    return x, mask, y


def auc(scores, y):
    pos, neg = scores[y == 1], scores[y == 0]
    return ((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean()).item()


@pytest.mark.parametrize("name", NAMES)
def test_overfits_a_toy_problem(name):
    torch.manual_seed(0)
    x, mask, y = toy_bags()
    model = create_model(name, 16, 2, student_hidden=32, dropout=0.0, **SMALL[name])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    score = 0.0
    for step in range(400):
        model.train()
        out = model(x, mask)
        loss = F.cross_entropy(out.bag_logits, y) + model.extra_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19:
            model.eval()
            with torch.no_grad():
                score = auc(model(x, mask).bag_logits.softmax(-1)[:, 1], y)
            if score == 1.0:
                break
    assert score == 1.0, f"{name}: training AUC {score} after {step + 1} steps"


@pytest.mark.parametrize("name", NAMES)
def test_predict_bag_on_a_large_bag(name):
    torch.manual_seed(0)
    # transmil at its defaults takes ~10 s for this bag on one CPU thread; a narrower one keeps the test fast.
    kw = {"hidden": 128, "heads": 4, "dim_head": 32, "num_landmarks": 64} if name == "transmil" else {}
    model = create_model(name, 64, 2, **kw)
    model.train()
    out = model.predict_bag(torch.randn(50_000, 64))
    assert model.training                               # training mode restored
    assert out.bag_logits.shape == (1, 2) and out.attention.shape == (1, 50_000)
    assert out.instance_logits.shape == (1, 50_000, 2)
    assert torch.isfinite(out.bag_logits).all() and abs(out.attention.sum().item() - 1) < 1e-4


def test_nystrom_matches_the_reference_when_landmarks_divide_the_length():
    """With T a multiple of L and one bag, the segment-mean landmarks and the pinv scaling are
    lucidrains' NystromAttention (as TransMIL uses it) exactly."""
    from mil.models.transmil import NystromAttention

    torch.manual_seed(0)
    att = NystromAttention(32, heads=4, dim_head=8, num_landmarks=5, pinv_iterations=6, residual_kernel=33,
                           dropout=0.0).eval()
    x = torch.randn(1, 50, 32)
    with torch.no_grad():
        out, _ = att(x, torch.ones(1, 50, dtype=torch.bool), torch.tensor([50]))
        q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in att.to_qkv(x).chunk(3, -1))
        q = q * 8 ** -0.5
        ql, kl = q.reshape(1, 4, 5, 10, 8).mean(3), k.reshape(1, 4, 5, 10, 8).mean(3)
        a1, a2, a3 = (s.softmax(-1) for s in (q @ kl.mT, ql @ kl.mT, ql @ k.mT))
        z = a2.mT / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
        eye = torch.eye(5)
        for _ in range(6):
            xz = a2 @ z
            z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
        ref = att.to_out(((a1 @ z) @ (a3 @ v) + att.res_conv(v)).transpose(1, 2).flatten(2))
    assert close(out, ref)


def test_a_bag_within_the_landmarks_gets_the_attention_its_nystrom_approximation_converges_to():
    """At most L tokens: one token per landmark, so Nystrom's attn1 @ pinv(attn2) @ attn3 is softmax
    attention once the pinv converges; the exact path gives that, CLS row included."""
    from mil.models.transmil import NystromAttention

    torch.manual_seed(0)
    att = NystromAttention(32, heads=4, dim_head=8, num_landmarks=64, pinv_iterations=20, residual_kernel=33,
                           dropout=0.0).eval()
    x, valid = torch.randn(2, 50, 32), torch.arange(50)[None] < torch.tensor([[50], [37]])
    lengths = valid.sum(1)
    with torch.no_grad():
        out, cls = att(x, valid, lengths, cls_attention=True)
        q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in att.to_qkv(x).chunk(3, -1))
        vm = valid[:, None, :, None]
        q, k, v = q * (vm * 8 ** -0.5), k * vm, v * vm
        approx, cls_approx = att._nystrom(q, k, v, valid, lengths, True)
        ref = att.to_out((approx + att.res_conv(v)).transpose(1, 2).flatten(2))
    assert torch.allclose(out[valid], ref[valid], atol=1e-3) and torch.allclose(cls, cls_approx, atol=1e-4)


@pytest.mark.parametrize("name", ["abmil", "clam-sb", "dsmil", "transmil"])
def test_chunked_and_checkpointed_instances_give_the_same_outputs_and_gradients(name, monkeypatch):
    """Very large bags run their per-instance layers in checkpointed chunks; nothing may change."""
    import mil.models.base as base

    torch.manual_seed(0)
    kw = {"num_landmarks": 16} if name == "transmil" else {}
    model = create_model(name, 24, 2, dropout=0.0, **kw)
    x = torch.randn(2, 50, 24)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 35:] = False
    y = torch.tensor([1, 0])

    def run():
        model.zero_grad()
        out = model(x, mask)
        loss = torch.nn.functional.cross_entropy(out.bag_logits, y) + out.instance_logits.square().mean() \
            + model.extra_loss(out, y)
        loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    whole, g_whole = run()
    monkeypatch.setattr(base, "INSTANCE_CHUNK", 7)
    chunked, g_chunked = run()
    assert torch.allclose(whole.bag_logits, chunked.bag_logits, atol=1e-5)
    assert torch.allclose(whole.attention, chunked.attention, atol=1e-6)
    assert torch.allclose(whole.instance_logits, chunked.instance_logits, atol=1e-5)
    assert g_whole.keys() == g_chunked.keys()
    for k in g_whole:
        assert torch.allclose(g_whole[k], g_chunked[k], atol=1e-5), k
