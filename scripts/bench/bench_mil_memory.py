"""Memory of `mil train` and `mil predict` as a user runs them: a cohort larger than the feature cache,
and a cohort with one 200,000-instance slide.

    .venv/bin/python scripts/bench/bench_mil_memory.py [--part a b] [--scale 0.5] [--repeats 1] [--huge-epochs 2]

The README's figures: `--scale 1 --repeats 2` (26 min on the shared 2-core machine; the defaults
take about a third of that).

(a) Streaming. A store of float32 1024-d bags (sizes log-normal around 3,000 instances) whose features
    are 3x the cache budget (`--cache-gb`). Peak RSS of the whole `mil train --folds 2` command with
    every bag cached (in memory), with the budget (two thirds of the bags read from the store every
    epoch), and with nothing cached (what the process needs besides the cache: Python, torch, the
    model and its batches). Target: RSS(budget) <= budget + RSS(nothing cached). Epoch time: one
    training pass over every bag (`mil.train.train_epoch` fed as `mil train` feeds it) in a child
    process, cached vs streamed, the store's files in the page cache (the load pass has just read
    them). Target: streamed <= 1.3x cached.
(b) The 200,000-instance bag. 12 ordinary slides and one 200,000 x 1024 slide; `mil train --model
    abmil --folds 2` with defaults but `--epochs` (`--huge-epochs`; the peak is the first step on the
    huge bag and its evaluation, it does not grow with epochs) and a `--seed` whose folds train on the
    huge slide, then `mil predict` of the run. Target: both under 4 GiB.

Every command runs as a child under `/usr/bin/time -f %M` (peak RSS of the whole command; with
DataLoader workers, of its largest process: a forked worker counts the parent's pages it shares). A
sampler also sums the PSS (shared pages split between the processes that map them) of the command and
all its descendants every 0.2 s: the memory the command really takes, workers included.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GIB = 2**30


# ---- cohorts --------------------------------------------------------------------------------------------
def write_cohort(root: Path, sizes: list[int], dim: int, seed: int = 0) -> tuple[Path, Path]:
    """A store of `sizes` bags of float32 features (encoder "bench"; positives shifted on a few dims in
    a fifth of their instances) and its labels CSV; returns (store, labels)."""
    import numpy as np

    from wsi.store import TileStore

    store = TileStore.create(root / "cohort.zarr")
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(sizes):
        sid, label = f"s{i:03d}", i % 2
        f = rng.standard_normal((n, dim), dtype=np.float32)
        if label:
            f[rng.choice(n, n // 5, replace=False), :8] += 1.5
        coords = np.stack([np.arange(n) % 1000, np.arange(n) // 1000], 1).astype(np.int64) * 256
        store.add_slide(sid, coords, patch_size=256).write_features("bench", f, {})
        rows.append(f"{sid},{'tumor' if label else 'normal'}\n")
        del f
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(rows))
    return store.path, labels


def ordinary_sizes(n: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(s) for s in np.clip(rng.lognormal(np.log(3000), 0.6, n), 500, 10_000)]


# ---- measuring a command --------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _pss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass
    return total


def measure(cmd: list[str], label: str) -> dict:
    """Run `cmd` under /usr/bin/time -f %M; returns its peak RSS and peak summed PSS (GiB), seconds, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _pss(_descendants(proc.pid)))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{err[-3000:]}")
    rss = int(err.strip().splitlines()[-1]) * 1024
    res = {"label": label, "rss_gib": rss / GIB, "pss_gib": peak[0] / GIB, "seconds": secs, "stdout": out}
    print(f"  {label:44s} peak RSS {res['rss_gib']:5.2f} GiB | summed PSS {res['pss_gib']:5.2f} GiB | "
          f"{secs:6.1f} s", flush=True)
    return res


def mil(*args: str) -> list[str]:
    return [sys.executable, "-m", "mil.cli", "-q", *args]


# ---- (a) a cohort 3x the cache ------------------------------------------------------------------------
def epochs_child(store: str, labels: str, cache_gb: float, workers: int | None, epochs: int) -> None:
    """Seconds per training pass over every bag, fed as `mil train` feeds them (JSON on stdout)."""
    import torch

    from mil.batching import BagBatcher
    from mil.cohort import load_cohort
    from mil.config import DataConfig, TrainConfig
    from mil.models import create_model
    from mil.train import train_epoch
    from wsi.runtime import large_frees_to_os

    t0 = time.perf_counter()
    cohort = load_cohort(labels, store=store, encoder="bench", progress=False, cache_gb=cache_gb)
    load_s = time.perf_counter() - t0
    cpu = torch.device("cpu")
    cfg = TrainConfig(model="abmil", device="cpu")
    opts = DataConfig(num_workers=workers).loader(cpu)
    torch.manual_seed(0)
    model = create_model("abmil", cohort.dim, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batcher = BagBatcher(cohort.bags, cfg.batch_size, seed=0, **opts)
    times = []
    with large_frees_to_os():
        for e in range(epochs):
            t = time.perf_counter()
            train_epoch(model, batcher, opt, None, cfg, e, True, cpu)
            times.append(time.perf_counter() - t)
    held, total = cohort.memory()
    print(json.dumps({"epochs": times, "load_s": load_s, "held_gib": held / GIB, "total_gib": total / GIB,
                      "workers": opts["num_workers"]}))


def part_a(root: Path, scale: float, epochs: int, repeats: int) -> list[str]:
    sizes = ordinary_sizes(max(6, int(96 * scale)), seed=1)
    print(f"(a) {len(sizes)} bags, {sum(sizes):,} instances x 1024 float32 ...", flush=True)
    store, labels = write_cohort(root / "a", sizes, 1024)
    feats = sum(sizes) * 1024 * 4 / GIB
    budget = round(feats / 3, 3)
    print(f"    features {feats:.2f} GiB, cache budget {budget:.3f} GiB ({feats / budget:.1f}x)", flush=True)
    train = mil("train", "--store", str(store), "--labels", str(labels), "--encoder", "bench", "--model", "abmil",
                "--folds", "2", "--epochs", str(epochs), "--min-epochs", "0")
    runs = {}
    for name, cache in (("in memory", feats * 2 + 1), ("budget", budget), ("nothing cached", 0)):
        runs[name] = measure(train + ["--cache-gb", str(cache), "--out", str(root / "a" / f"run_{cache}")],
                             f"mil train, cache {name} ({cache:.3f} GiB)")
    own = runs["nothing cached"]["rss_gib"]
    rows = [f"features {feats:.2f} GiB ({len(sizes)} bags, {sum(sizes):,} x 1024 float32), cache budget "
            f"{budget:.3f} GiB; `mil train --model abmil --folds 2 --epochs {epochs}`:"]
    for name, r in runs.items():
        rows.append(f"  cache {name:15s} peak RSS {r['rss_gib']:.2f} GiB, summed PSS {r['pss_gib']:.2f} GiB, "
                    f"{r['seconds']:.0f} s")
    ok = runs["budget"]["rss_gib"] <= budget + own
    rows.append(f"  RSS(budget) {runs['budget']['rss_gib']:.2f} <= budget {budget:.2f} + RSS(nothing cached) "
                f"{own:.2f} = {budget + own:.2f} GiB: {'yes' if ok else 'NO'}")
    # epoch times, the child processes interleaved so that load changes on this shared machine hit both
    child = [sys.executable, __file__, "--epochs-child", str(store), str(labels)]
    times: dict[str, list[float]] = {}
    for rep in range(repeats):
        for name, cache, workers in (("cached", feats * 2 + 1, None), ("streamed", budget, None),
                                     ("streamed, 1 worker", budget, 1)):
            r = measure(child + [str(cache), "-1" if workers is None else str(workers), "2"],
                        f"train_epoch x2, {name}")
            out = json.loads(r["stdout"].strip().splitlines()[-1])
            times.setdefault(name, []).extend(out["epochs"])
    base = min(times["cached"])
    rows.append(f"  seconds per training pass over every bag (best of {2 * repeats}; files in the page cache):")
    for name, t in times.items():
        rows.append(f"    {name:22s} {min(t):6.2f} s = {min(t) / base:.2f}x cached (all: "
                    + ", ".join(f"{x:.1f}" for x in t) + ")")
    return rows


# ---- (b) the 200,000-instance bag ------------------------------------------------------------------------
def part_b(root: Path, huge: int, epochs: int) -> list[str]:
    sizes = ordinary_sizes(12, seed=2) + [huge]
    print(f"(b) 12 ordinary slides ({sum(sizes[:-1]):,} instances) + one {huge:,} x 1024 slide ...", flush=True)
    store, labels = write_cohort(root / "b", sizes, 1024, seed=3)
    run = root / "b" / "run"
    # The first seed whose folds train on the huge slide (in the other fold it is tested), so that the
    # measured peak includes its training step, not only its evaluation.
    from mil.cohort import load_cohort
    from mil.splits import make_splits

    cohort = load_cohort(labels, store=store, encoder="bench", progress=False, cache_gb=0)
    seed = next(s for s in range(50) if any(len(sizes) - 1 in sp.train for sp in make_splits(cohort, 2, seed=s)))
    tr = measure(mil("train", "--store", str(store), "--labels", str(labels), "--encoder", "bench", "--model",
                     "abmil", "--folds", "2", "--epochs", str(epochs), "--seed", str(seed), "--out", str(run)),
                 f"mil train --model abmil --folds 2 --epochs {epochs} --seed {seed}")
    pr = measure(mil("predict", "--store", str(store), "--run", str(run)), "mil predict")
    return [f"12 ordinary slides + one {huge:,} x 1024 slide (features {sum(sizes) * 4096 / GIB:.2f} GiB):",
            f"  mil train --model abmil --folds 2 --epochs {epochs} --seed {seed} (the huge slide trained on in "
            f"one fold, tested in the other): peak RSS {tr['rss_gib']:.2f} GiB "
            f"(summed PSS {tr['pss_gib']:.2f}), {tr['seconds']:.0f} s",
            f"  mil predict: peak RSS {pr['rss_gib']:.2f} GiB (summed PSS {pr['pss_gib']:.2f}), {pr['seconds']:.0f} s",
            f"  target < 4 GiB: {'yes' if max(tr['rss_gib'], pr['rss_gib']) < 4 else 'NO'}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["a", "b"], default=["a", "b"])
    p.add_argument("--scale", type=float, default=0.5, help="(a): cohort size (1: 96 bags, 1.2 GiB of features)")
    p.add_argument("--repeats", type=int, default=1, help="(a): rounds of the epoch-time children (2 epochs each)")
    p.add_argument("--epochs", type=int, default=2, help="(a): epochs of the mil train runs")
    p.add_argument("--huge", type=int, default=200_000, help="(b): instances of the huge slide")
    p.add_argument("--huge-epochs", type=int, default=2, help="(b): --epochs of mil train (its default: 40)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    p.add_argument("--epochs-child", nargs=5, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.epochs_child:
        store, labels, cache, workers, epochs = a.epochs_child
        return epochs_child(store, labels, float(cache), None if workers == "-1" else int(workers), int(epochs))
    tmp = None if a.keep else tempfile.TemporaryDirectory(dir=REPO / ".cache")
    root = a.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    if "a" in a.part:
        rows += part_a(root, a.scale, a.epochs, a.repeats)
    if "b" in a.part:
        rows += part_b(root, a.huge, a.huge_epochs)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
