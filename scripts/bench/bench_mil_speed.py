"""Seconds per MIL training epoch against its floor and against a CLAM-style loop; memory of a huge bag.

    .venv/bin/python scripts/bench/bench_mil_speed.py [--bags 48] [--models abmil transmil] [--memory]

Same bags (1024-d features, sizes log-normal around 3,000 instances), same model, same process:
- floor: the padded batches of one epoch already built in memory; only forward + loss + backward +
  optimizer step are timed (the loss touches both branches: bag CE + the student's BCE);
- pathmil: `mil.train.train_epoch` on a `BagBatcher` over bags held in memory (batch building, the
  w2s-free instance loss, everything a real epoch does);
- CLAM-style: one bag per step, each bag's features read from the tile store on disk at every step;
- one-bag floor: one bag per step from memory (no padding, no reading): what batching is up against.
`--memory` trains one step on, and then predicts, a single 200,000 x 1024 bag in a child process
and reports its peak RSS (target: under 4 GiB).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_bags(n_bags: int, dim: int, seed: int):
    import numpy as np

    from mil.cohort import Bag

    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(3000), 0.6, n_bags), 200, 12000).astype(int)
    return [Bag(slide_id=f"s{i:03d}", patient_id=f"s{i:03d}", label=i % 2,
                features=rng.standard_normal((n, dim), dtype=np.float32), coords=np.zeros((n, 2), np.int64),
                instance_labels=None) for i, n in enumerate(sizes)]


AUTOCAST = [contextlib.nullcontext]   # the precision `mil train` uses on the device (set in main)
DEVICE = ["cpu"]


def _sync() -> None:
    import torch

    if DEVICE[0] != "cpu":
        torch.cuda.synchronize()


def step(model, opt, x, mask, y) -> None:
    """Forward, the loss of both branches (bag CE + the student's BCE), backward, optimizer step."""
    import torch
    import torch.nn.functional as F

    from mil.w2s import positive_logit

    with AUTOCAST[0]():
        out = model(x, mask)
        z = positive_logit(out.instance_logits).float()
        m = mask if mask is not None else torch.ones(z.shape, dtype=torch.bool, device=z.device)
        loss = F.cross_entropy(out.bag_logits.float(), y) + F.binary_cross_entropy_with_logits(z[m], torch.zeros_like(z[m]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_floor(model, batches, opt) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, mask, y in batches:
        step(model, opt, x, mask, y)
    _sync()
    return time.perf_counter() - t0


def time_per_bag_floor(model, bags, opt) -> float:
    """One bag per step, tensors already in memory: no padding at all."""
    import torch

    xs = [(torch.from_numpy(b.features)[None].to(DEVICE[0]), torch.tensor([b.label], device=DEVICE[0])) for b in bags]
    model.train()
    t0 = time.perf_counter()
    for x, y in xs:
        step(model, opt, x, None, y)
    _sync()
    return time.perf_counter() - t0


def time_clam_loop(model, store, ids, labels, opt) -> float:
    import torch

    model.train()
    t0 = time.perf_counter()
    for sid, y in zip(ids, labels):
        x = torch.from_numpy(store[sid].features("bench"))[None].to(DEVICE[0])  # read from disk every step, as CLAM does
        step(model, opt, x, None, torch.tensor([y], device=DEVICE[0]))
    _sync()
    return time.perf_counter() - t0


def memory_child(n: int, dim: int, model_name: str, keep_heap: bool = False) -> None:
    import numpy as np
    import torch

    from wsi.runtime import large_frees_to_os

    from mil.batching import BagBatcher
    from mil.cohort import Bag
    from mil.models import create_model
    from mil.train import TrainConfig, train_epoch

    feats = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    bag = Bag("huge", "huge", 1, feats, np.zeros((n, 2), np.int64), None)
    model = create_model(model_name, dim, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # As `mil train` and `mil predict` do (train_fold, predict_store): large frees go back to the OS,
    # inside the call only. --no-large-frees shows the difference.
    scope = contextlib.nullcontext if keep_heap else large_frees_to_os
    t0 = time.perf_counter()
    with scope():
        train_epoch(model, BagBatcher([bag], 1), opt, None, TrainConfig(model=model_name), 0, True,
                    torch.device("cpu"))
    t_train = time.perf_counter() - t0
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    with scope():
        out = model.predict_bag(torch.from_numpy(feats))
    t_pred = time.perf_counter() - t0
    assert out.attention.shape == (1, n)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{model_name}: one {n:,} x {dim} bag: train step {t_train:.1f} s (peak RSS {rss_train:.2f} GiB), "
          f"predict {t_pred:.1f} s; peak RSS {rss:.2f} GiB (features alone {feats.nbytes / 2**30:.2f} GiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=48)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--models", nargs="+", default=["abmil", "clam-sb", "dsmil", "transmil"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (the floor then runs under the same autocast)")
    p.add_argument("--memory", action="store_true", help="also the 200,000-instance bag, in a child process")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-model", default="abmil", help=argparse.SUPPRESS)
    p.add_argument("--no-large-frees", action="store_true",
                   help="with --memory: without wsi.runtime.large_frees_to_os (glibc keeps freed chunks)")
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.dim, a.memory_model, a.no_large_frees)

    import torch

    from mil.batching import BagBatcher
    from mil.models import create_model
    from mil.train import TrainConfig, train_epoch
    from wsi.store import TileStore

    bags = make_bags(a.bags, a.dim, 0)
    n_inst = sum(len(b.features) for b in bags)
    print(f"{len(bags)} bags, {n_inst:,} instances of {a.dim}-d (sizes {min(len(b.features) for b in bags)}-"
          f"{max(len(b.features) for b in bags)}), batch {a.batch_size}, torch threads {torch.get_num_threads()}")
    tmp = tempfile.TemporaryDirectory()
    store = TileStore.create(Path(tmp.name) / "bench.zarr")
    for b in bags:
        store.add_slide(b.slide_id, b.coords, patch_size=256).write_features("bench", b.features, {})
    from mil.train import train_precision
    from wsi.runtime import autocast, resolve_device

    dev = resolve_device(a.device)
    DEVICE[0] = str(dev)
    precision = train_precision(dev)
    AUTOCAST[0] = lambda: autocast(dev, precision)
    print(f"device {dev}, precision {precision}")
    for name in a.models:
        torch.manual_seed(0)
        model = create_model(name, a.dim, 2).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cfg = TrainConfig(model=name, batch_size=a.batch_size)
        batcher = BagBatcher(bags, a.batch_size, shuffle=True, seed=0)
        floor, ours, clam, per_bag = [], [], [], []
        for r in range(a.repeats):
            batches = [(b.x.to(dev), b.mask.to(dev), b.y.to(dev)) for b in batcher]  # built before timing
            pad = 1 - sum(int(m.sum()) for _, m, _ in batches) / sum(m.numel() for _, m, _ in batches)
            floor.append(time_floor(model, batches, opt))
            del batches
            per_bag.append(time_per_bag_floor(model, bags, opt))
            t0 = time.perf_counter()
            train_epoch(model, batcher, opt, None, cfg, 0, True, dev)
            _sync()
            ours.append(time.perf_counter() - t0)
            clam.append(time_clam_loop(model, store, [b.slide_id for b in bags], [b.label for b in bags], opt))
        f, o, c, pb = min(floor), min(ours), min(clam), min(per_bag)
        print(f"{name:9s} floor {f:6.2f} s/epoch | pathmil {o:6.2f} s = {o / f:.2f}x floor | "
              f"CLAM-style loop {c:6.2f} s = {c / o:.2f}x pathmil | one-bag floor {pb:6.2f} s "
              f"(padding {pad:.1%} of the batched instances)", flush=True)
    if a.memory:
        for name in ("abmil",):
            subprocess.run([sys.executable, __file__, "--memory-child", "200000", "--dim", str(a.dim),
                            "--memory-model", name] + (["--no-large-frees"] if a.no_large_frees else []), check=True)


if __name__ == "__main__":
    main()
