"""mil.batching: padded, size-bucketed, seeded mini-batches of bags."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mil.batching import BagBatcher  # noqa: E402
from mil.cohort import Bag  # noqa: E402
from wsi.errors import CohortError  # noqa: E402


def _bags(sizes, dim=4, dtype=np.float32, with_labels=True) -> list[Bag]:
    out = []
    for i, n in enumerate(sizes):
        f = (np.arange(n * dim).reshape(n, dim) + 1000 * i).astype(dtype)
        lab = (np.arange(n) % 2).astype(np.float32) if with_labels else None
        out.append(Bag(f"b{i}", f"p{i}", i % 2, f, np.zeros((n, 2), np.int64), lab))
    return out


def test_batcher_padding_and_mask():
    bags = _bags([5, 3, 8, 1, 4], dtype=np.float16)
    bags[0].features[:] = np.float16(0.1)
    b = BagBatcher(bags, 2, shuffle=False, with_instance_labels=True)
    assert len(b) == 3
    batches = list(b)
    assert [x.index for x in batches] == [[0, 1], [2, 3], [4]]
    x = batches[0]
    assert x.x.dtype == torch.float32 and x.x.shape == (2, 5, 4) and x.mask.dtype == torch.bool
    assert x.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    np.testing.assert_array_equal(x.x[0].numpy(), bags[0].features.astype(np.float32))   # float16 -> float32
    np.testing.assert_array_equal(x.x[1, :3].numpy(), bags[1].features.astype(np.float32))
    assert x.x[1, 3:].abs().sum() == 0
    assert x.y.dtype == torch.long and x.y.tolist() == [0, 1]
    assert x.instance_labels.tolist()[1] == [0, 1, 0, 0, 0] and x.selected == [None, None]
    bags[3].instance_labels = None
    assert [y.instance_labels is None for y in BagBatcher(bags, 2, shuffle=False, with_instance_labels=True)] == \
        [False, True, False]
    assert all(y.instance_labels is None for y in BagBatcher(bags, 2, shuffle=False))


def test_batcher_epochs_subsampling_and_order():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 60, 37).tolist()
    bags = _bags(sizes)
    b = BagBatcher(bags, 4, max_instances=20, seed=7, with_instance_labels=True)
    seen_sel = []
    orders = []
    for _ in range(3):
        idx, sel = [], {}
        for batch in b:
            assert batch.x.shape[1] <= 20 and len(batch.index) <= 4
            for r, (i, s) in enumerate(zip(batch.index, batch.selected)):
                n = sizes[i]
                k = int(batch.mask[r].sum())
                assert k == min(n, 20)
                if n > 20:
                    assert s is not None and len(s) == 20 and np.all(np.diff(s) > 0) and s.max() < n
                    np.testing.assert_array_equal(batch.x[r, :k].numpy(), bags[i].features[s])
                    np.testing.assert_array_equal(batch.instance_labels[r, :k].numpy(), bags[i].instance_labels[s])
                else:
                    assert s is None
                sel[i] = None if s is None else s.tolist()
            idx += batch.index
        assert sorted(idx) == list(range(len(bags)))              # every bag once per epoch
        seen_sel.append(sel)
        orders.append(idx)
    assert seen_sel[0] != seen_sel[1] and orders[0] != orders[1]   # fresh each epoch
    b2 = BagBatcher(bags, 4, max_instances=20, seed=7, with_instance_labels=True)
    again = [[bt.index for bt in b2] for _ in range(2)]
    b.set_epoch(0)
    assert again == [[bt.index for bt in b] for _ in range(2)]     # deterministic given seed and epoch
    assert [bt.index for bt in BagBatcher(bags, 4, max_instances=20, seed=8)] != again[0]
    # size buckets keep padding small: bags in a batch have similar sizes
    whole = BagBatcher(bags, 4, seed=1)
    pad = sum(bt.x.shape[0] * bt.x.shape[1] - int(bt.mask.sum()) for bt in whole)
    assert pad < 0.25 * sum(sizes)
    # shuffle=False: same order and same subsample every pass
    ev = BagBatcher(bags, 4, max_instances=20, shuffle=False)
    p1, p2 = list(ev), list(ev)
    assert [x.index for x in p1] == [list(range(i, min(i + 4, 37))) for i in range(0, 37, 4)]
    assert all(torch.equal(u.x, v.x) for u, v in zip(p1, p2))


def test_batcher_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BagBatcher(_bags([2]), 0)
    with pytest.raises(ValueError, match="max_instances"):
        BagBatcher(_bags([2]), 2, max_instances=0)
    with pytest.raises(CohortError, match="without instances: b1"):
        BagBatcher(_bags([2, 0]), 2)
    mixed = _bags([2, 2])
    mixed[1].features = np.zeros((2, 5), np.float32)
    with pytest.raises(CohortError, match="different feature widths"):
        BagBatcher(mixed, 2)
