"""Cohorts larger than memory: bags read from their source when the cache cannot hold them, through a
DataLoader with workers, give the same batches, runs and fingerprint as bags held in memory; huge
bags are batched alone; batches move to a device whole; training runs under autocast."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import make_store
from mil.batching import BagBatcher, Batch
from mil.cli import main as mil_main
from mil.cohort import Bag, LazyFeatures, default_cache_gb, load_cohort
from mil.config import DataConfig, TrainConfig, W2SConfig
from mil.splits import Split
from mil.train import evaluate, train_cohort, train_epoch, train_fold, train_precision
from wsi.errors import CohortError, RunError

from test_mil_train import SMALL, separable_bags

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def toy(tmp_path):
    """16 separable bags in a store (float32 features), their labels CSV, and the bags themselves."""
    bags = separable_bags(16, seed=3)
    store = make_store(tmp_path / "s.zarr", {b.slide_id: {"coords": b.coords} for b in bags},
                       features={"toy": {b.slide_id: b.features for b in bags}},
                       labels={"tumor": {b.slide_id: b.instance_labels for b in bags}})
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{'tumor' if b.label else 'normal'}\n" for b in bags))
    return store, labels, bags


def load(toy, cache_gb, **kw):
    store, labels, _ = toy
    return load_cohort(labels, store=store.path, encoder="toy", progress=False, cache_gb=cache_gb, **kw)


# ---- the cache ------------------------------------------------------------------------------------------
def test_cache_budget_decides_which_bags_stay_in_memory(toy):
    _, _, bags = toy
    every, none = load(toy, 10), load(toy, 0)
    assert all(b.held for b in every.bags) and not any(b.held for b in none.bags)
    total = sum(b.features.nbytes for b in bags)
    assert every.memory() == (total, total) and none.memory() == (0, total)
    budget = sum(b.features.nbytes for b in bags[:5]) + 10          # the first five fit, then first fit
    some = load(toy, budget / 2**30)
    assert [b.slide_id for b in some.bags if b.held] == [b.slide_id for b in bags[:5]]
    assert some.memory()[0] == budget - 10
    for a, b in zip(none.bags, bags):                                 # read from the store: the same values
        assert (a.n_instances, a.dim) == b.features.shape
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.features is not a.features                           # read again on each use, not kept
    # one fingerprint however the bags are held, hashed while loading or from the bags again
    fp = every.fingerprint()
    assert none.fingerprint() == some.fingerprint() == fp
    none.features_sha256 = None
    assert none.fingerprint() == fp
    none.bags[2].features = none.bags[2].features + 1                # a bag changed in memory: hashed anew
    assert none.fingerprint()["features"]["sha256"] != fp["features"]["sha256"]
    assert 0 < default_cache_gb() < 1e6


def test_a_slide_rewritten_while_in_use_is_an_error(toy):
    store, _, bags = toy
    c = load(toy, 0)
    store["s04"].write_features("toy", bags[4].features.astype(np.float16), {})        # re-embedded as float16
    with pytest.raises(CohortError, match="features of slide 's04' changed while the cohort was in use"):
        c.bags[4].features
    store.add_slide("s05", bags[5].coords[:3])                                          # re-tiled
    store["s05"].write_features("toy", bags[5].features[:3], {})
    with pytest.raises(CohortError, match=r"s05.*\(\(35, 16\) float32, now \(3, 16\) float32\)"):
        c.bags[5].features


def test_lazy_features_read_only_when_used(toy):
    c = load(toy, 0)
    lazy = [LazyFeatures(b) for b in c.bags]
    assert [len(x) for x in lazy] == [b.n_instances for b in c.bags] and lazy[0].shape == (len(lazy[0]), 16)
    np.testing.assert_array_equal(np.asarray(lazy[1], np.float32), c.bags[1].features)
    np.testing.assert_array_equal(lazy[1][[0, 2]], c.bags[1].features[[0, 2]])


# ---- same batches, same runs ----------------------------------------------------------------------------
def batches(bags, **kw) -> list[Batch]:
    b = BagBatcher(bags, 3, max_instances=30, seed=4, with_instance_labels=True, **kw)
    return [bt for _ in range(2) for bt in b]


def test_streamed_batches_equal_held_ones_in_process_and_from_workers(toy):
    held = batches(load(toy, 10, instance_labels="tumor").bags)
    for cache, workers in ((0, 0), (0, 2), (10, 1)):
        got = batches(load(toy, cache, instance_labels="tumor").bags, num_workers=workers, prefetch=1)
        assert len(got) == len(held)
        for a, b in zip(got, held):
            assert a.index == b.index
            for k in ("x", "mask", "y", "instance_labels"):
                assert torch.equal(getattr(a, k), getattr(b, k)), (cache, workers, k)
            if workers:
                assert a.x.is_shared()        # built in a worker straight into shared memory: not copied again


def test_a_spawned_worker_gets_the_bags_without_the_cache(toy):
    """Pickled for a spawned (not forked) worker: held bags travel without their features, which the
    worker reads from the store, and it builds the same batches."""
    import pickle

    from mil.batching import _PlannedBatches

    c = load(toy, 10)
    batcher = BagBatcher(c.bags, 4, seed=2)
    plan = batcher.plan()
    there = pickle.loads(pickle.dumps(_PlannedBatches(batcher)))
    assert all(b.held for b in c.bags) and not any(b.held for b in there.batcher.bags)
    assert len(pickle.dumps(_PlannedBatches(batcher))) < sum(b.nbytes for b in c.bags)
    for item in plan:
        assert torch.equal(there[item].x, batcher.build(*item).x)


def run_files(run) -> tuple[list, dict]:
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    return rows, json.loads((run / "metrics.json").read_text())


def test_training_streamed_equals_in_memory_with_w2s(toy, tmp_path):
    """The whole run, --w2s included (negative-bag evidence reads every training bag): a cache of nothing,
    or of one bag, with DataLoader workers, gives the predictions and metrics of every bag in memory."""
    cfg = TrainConfig(model="abmil", model_kwargs=SMALL["abmil"], epochs=4, batch_size=4, lr=1e-3, folds=2,
                      min_epochs=1, device="cpu", w2s=W2SConfig(enabled=True, warmup=1, ramp=1, min_warmup_steps=1))
    ref = train_cohort(load(toy, 10, instance_labels="tumor"), cfg, tmp_path / "held", instance_labels="tumor",
                       progress=False)
    small = load(toy, 2e-6, instance_labels="tumor")
    assert 0 < sum(b.held for b in small.bags) < len(small.bags)
    for name, c, data in (("none", load(toy, 0, instance_labels="tumor"), DataConfig(num_workers=0)),
                          ("workers", small, DataConfig(num_workers=2, prefetch=1))):
        m = train_cohort(c, cfg, tmp_path / name, instance_labels="tumor", progress=False, data=data)
        assert m["bag_auc"] == ref["bag_auc"] and m["best_epochs"] == ref["best_epochs"]
        rows, saved = run_files(tmp_path / name)
        ref_rows, _ = run_files(tmp_path / "held")
        assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in ref_rows]
        for r, q in zip(rows, ref_rows):
            np.testing.assert_allclose(float(r["prob_tumor"]), float(q["prob_tumor"]), atol=1e-6)
        np.testing.assert_allclose(saved["instance_auc"]["folds"], ref["instance_auc"]["folds"], atol=1e-6)


def test_mil_train_cache_and_workers_options(toy, tmp_path, capsys):
    store, labels, _ = toy
    common = ["-q", "train", "--store", str(store.path), "--labels", str(labels), "--encoder", "toy",
              "--model-kwargs", json.dumps(SMALL["abmil"]), "--epochs", "3", "--min-epochs", "1", "--folds", "2",
              "--device", "cpu"]
    assert mil_main(common + ["--out", str(tmp_path / "a")]) == 0
    assert mil_main(common + ["--out", str(tmp_path / "b"), "--cache-gb", "0", "--num-workers", "1"]) == 0
    (ra, ma), (rb, mb) = run_files(tmp_path / "a"), run_files(tmp_path / "b")
    assert [r["prob_tumor"] for r in ra] == [r["prob_tumor"] for r in rb] and ma["bag_auc"] == mb["bag_auc"]
    # another cache or other workers change no result, so a run resumes under them
    assert mil_main(common + ["--out", str(tmp_path / "a"), "--cache-gb", "0"]) == 0
    assert mil_main(common + ["--out", str(tmp_path / "c"), "--cache-gb", "-1"]) == 2
    assert "--cache-gb -1.0: must be 0 or more GiB" in capsys.readouterr().err
    with pytest.raises(RunError, match="--prefetch 0: must be at least 1"):
        DataConfig(prefetch=0)




# ---- huge bags ------------------------------------------------------------------------------------------
def _bags(sizes, dim=2) -> list[Bag]:
    return [Bag(f"b{i}", f"b{i}", i % 2, np.full((n, dim), i, np.float16), np.zeros((n, 2), np.int64))
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_huge_bag_is_batched_alone(shuffle):
    sizes = [8000, 100, 120, 30_000, 90, 110, 130, 95]    # 30,000 > 4 x median and > 8,192: alone
    b = BagBatcher(_bags(sizes), 4, shuffle=shuffle, seed=1)
    assert len(b) == 1 + 2
    got = list(b)
    assert len(got) == len(b) and sorted(i for bt in got for i in bt.index) == list(range(8))
    alone = [bt for bt in got if 3 in bt.index]
    assert alone[0].index == [3] and alone[0].x.shape == (1, 30_000, 2)
    assert max(bt.x.shape[1] for bt in got if 3 not in bt.index) == 8000      # 8,000: not over 8,192
    # subsampled below the threshold, it is an ordinary bag again
    assert len(BagBatcher(_bags(sizes), 4, shuffle=shuffle, max_instances=5000)) == 2
    # against the median of the *other* bags: a validation part of two bags does not pad 2,500 to 20,000
    assert [bt.x.shape for bt in BagBatcher(_bags([2500, 20_000]), 4, shuffle=shuffle)] in \
        ([(1, 2500, 2), (1, 20_000, 2)], [(1, 20_000, 2), (1, 2500, 2)])
    assert len(BagBatcher(_bags([9000, 10_000, 12_000]), 4, shuffle=shuffle)) == 1     # big alike: together


# ---- devices and precision --------------------------------------------------------------------------------
def test_batch_moves_to_a_device_whole():
    bt = next(iter(BagBatcher(_bags([5, 3]), 2, shuffle=False, aux=[np.ones(5), np.ones(3)])))
    bt.instance_labels = torch.zeros(bt.mask.shape)
    on = bt.to("meta", non_blocking=True)
    for k in ("x", "mask", "y", "instance_labels", "aux"):
        assert getattr(on, k).device.type == "meta" and getattr(on, k).shape == getattr(bt, k).shape, k
        assert getattr(bt, k).device.type == "cpu"                # the CPU batch is left as it was
    assert on.index == bt.index and on.selected is bt.selected
    assert bt.to("cpu").x is bt.x                                  # already there: no copy
    if torch.cuda.is_available():
        pinned = bt.pin_memory()
        assert pinned.x.is_pinned() and pinned.to("cuda", non_blocking=True).x.is_cuda


def test_loader_options_follow_the_device():
    assert DataConfig().loader(torch.device("cpu")) == {"num_workers": 0, "prefetch": 2, "pin_memory": False}
    assert DataConfig(num_workers=3).loader(torch.device("cpu"))["num_workers"] == 3
    assert DataConfig(prefetch=3).loader(torch.device("cuda")) == {"num_workers": 4, "prefetch": 3, "pin_memory": True}


def test_training_runs_under_autocast_when_asked():
    from mil.models import create_model

    cpu = torch.device("cpu")
    assert train_precision(cpu) == "fp32" and train_precision(cpu, "bf16") == "bf16"
    with pytest.raises(RunError, match="--precision 'fp16': must be auto, fp32 or bf16"):
        TrainConfig(precision="fp16")
    bags = separable_bags(8)
    seen = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = create_model("abmil", 16, 2, **SMALL["abmil"])
        hook = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
            lambda m, i, o: seen.append((precision, o.dtype)))
        cfg = TrainConfig(model_kwargs=SMALL["abmil"], device="cpu", precision=precision)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sums = train_epoch(model, BagBatcher(bags, 4, seed=0), opt, None, cfg, 0, True, cpu)
        ev = evaluate(model, bags, cfg, cpu, False)
        hook.remove()
        assert np.isfinite(sum(sums.values())) and ev["probs"].dtype == np.float32
        assert np.allclose(ev["probs"].sum(1), 1, atol=1e-5) and ev["attention"][0].dtype == np.float32
    assert {d for p, d in seen if p == "fp32"} == {torch.float32}
    assert {d for p, d in seen if p == "bf16"} == {torch.bfloat16}


def test_fold_trains_on_bags_that_are_never_held(toy):
    c = load(toy, 0, instance_labels="tumor")
    split = Split(0, train=list(range(10)), val=list(range(10, 12)), test=list(range(12, 16)))
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=3, min_epochs=1, batch_size=4, lr=1e-3, device="cpu")
    _, res = train_fold(c, split, cfg, progress=False)
    assert len(res.test_probs) == 4 and not any(b.held for b in c.bags)
