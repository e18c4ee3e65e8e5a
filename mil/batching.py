"""Padded, size-bucketed mini-batches of bags: what `mil train` iterates over.

The batches of a pass (which bags go together, which instances of bags above `max_instances`) are
planned in this process from the seed and the pass number alone. They are then built (features read,
converted to float32, padded) in this process or, with `num_workers`, by DataLoader workers ahead of
use; on a GPU they come in pinned memory for non-blocking copies (`Batch.to`). So a pass gives the same
batches however it is built, and whether a bag's features are held in memory or read from its source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np

from wsi.errors import CohortError

from .cohort import Bag, name_ids

if TYPE_CHECKING:  # torch is imported where batches are built, not at CLI start-up
    import torch


@dataclass
class Batch:
    x: "torch.Tensor"                       # (B, Nmax, D) float32, 0 at padding
    mask: "torch.Tensor"                    # (B, Nmax) bool, True = real instance
    y: "torch.Tensor"                       # (B,) long
    index: list[int]                        # positions in the bags list given to the batcher
    instance_labels: "torch.Tensor | None" = None   # (B, Nmax) float32, 0 at padding
    selected: list[np.ndarray | None] = field(default_factory=list)  # kept instance indices (None: all)
    aux: "torch.Tensor | None" = None       # (B, Nmax) float32 per-instance side values (`aux=`), 0 at padding

    def _map(self, fn) -> "Batch":
        import torch

        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "Batch":
        """The batch with every tensor on `device`; `non_blocking` copies from pinned memory run
        asynchronously with the GPU's work (index and selections stay as they are)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (the DataLoader's pin_memory thread calls this)."""
        return self._map(lambda t: t.pin_memory())


def _empty(shape: tuple[int, ...], shared: bool) -> "torch.Tensor":
    """An uninitialised float32 tensor; in shared memory when built in a DataLoader worker, so that
    handing it to the main process copies nothing (as torch's default_collate does)."""
    import torch

    if not shared:
        return torch.empty(shape, dtype=torch.float32)
    elem = torch.empty(0, dtype=torch.float32)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape))).resize_(shape)


def _median_of_others(sizes: np.ndarray) -> np.ndarray:
    """For each size, the median of all the other sizes (inf when there are none). Of the others, not of
    all: among two bags, a 200,000-instance one is an outlier next to a 2,500-instance one."""
    n = len(sizes)
    if n < 2:
        return np.full(n, np.inf)
    order = np.argsort(sizes, kind="stable")
    s = sizes[order].astype(np.float64)
    j = np.arange(n)                  # sorted position of the bag left out
    m = n - 1
    # the k-th smallest of the others is s[k] below the left-out position, s[k + 1] from it on
    lo, hi = (m - 1) // 2, m // 2
    med = (s[lo + (lo >= j)] + s[hi + (hi >= j)]) / 2
    out = np.empty(n)
    out[order] = med
    return out


class BagBatcher:
    """Padded, size-bucketed mini-batches of bags.

    Each pass (epoch) with shuffle: bags above `max_instances` are subsampled afresh (kept indices
    sorted), bags are ordered by size with a little seeded noise and cut into batches (so padding
    stays small), and the batch order is shuffled. Every pass differs and is reproducible from `seed`
    and the pass number. With shuffle=False the bags keep their order and every pass is identical.
    A bag much larger than the others (`alone`) is a batch of its own, so that it never pads its
    batch-mates to its size (one 200,000-instance slide in a batch of 4 would make 4 x 200,000 rows).

    `num_workers` > 0: batches are built by that many DataLoader worker processes, `prefetch` batches
    each ahead of use; `pin_memory`: batches come in page-locked memory (for a GPU)."""

    SIZE_NOISE = 0.1    # relative jitter on sizes before bucketing: neighbours vary from epoch to epoch
    ALONE_FACTOR = 4    # a bag over this many times the median size of the others ...
    ALONE_MIN = 8192    # ... and over this many instances (mil.models.base.INSTANCE_CHUNK) is batched alone

    def __init__(self, bags: list[Bag], batch_size: int = 16, *, max_instances: int | None = None,
                 shuffle: bool = True, seed: int = 0, with_instance_labels: bool = False,
                 aux: list[np.ndarray] | None = None, num_workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be at least 1 (or None for whole bags), got {max_instances}")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"num_workers must be 0 or more and prefetch at least 1, got {num_workers}, {prefetch}")
        self.sizes = np.array([b.n_instances for b in bags], dtype=np.int64)
        empty = [b.slide_id for b, n in zip(bags, self.sizes) if n == 0]
        if empty:
            raise CohortError(f"bags without instances: {name_ids(empty)}; leave those slides out")
        dims = {b.dim for b in bags}
        if len(dims) > 1:
            raise CohortError(f"bags have different feature widths {sorted(dims)}; use features of one encoder")
        self.bags, self.batch_size, self.max_instances = bags, batch_size, max_instances
        self.shuffle, self.seed, self.with_instance_labels = shuffle, seed, with_instance_labels
        if aux is not None and [len(a) for a in aux] != self.sizes.tolist():
            raise ValueError("aux must hold one value per instance of every bag")
        self.aux = aux   # per-bag (N,) values batched alongside the features (e.g. w2s negative-bag evidence)
        self.dim = dims.pop() if dims else 0
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        used = self.sizes if max_instances is None else np.minimum(self.sizes, max_instances)
        self.alone = (used > self.ALONE_MIN) & (used > self.ALONE_FACTOR * _median_of_others(used))
        self.epoch = 0

    def __len__(self) -> int:
        k = int(self.alone.sum())
        return k + math.ceil((len(self.bags) - k) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The pass the next iteration makes (to resume a run with the same batches)."""
        self.epoch = epoch

    def _selection(self, rng: np.random.Generator) -> list[np.ndarray | None]:
        m = self.max_instances
        if m is None:
            return [None] * len(self.bags)
        return [np.sort(rng.choice(n, m, replace=False)) if n > m else None for n in self.sizes]

    def plan(self) -> list[tuple[list[int], list[np.ndarray | None]]]:
        """The batches of the next pass, as (bag positions, kept instances per bag), and advance the
        pass counter. Depends on the seed, the pass number and the bag sizes only."""
        epoch = self.epoch
        self.epoch += 1
        # shuffle=False: the same subsample every pass, so evaluation is deterministic
        rng = np.random.default_rng([self.seed, epoch] if self.shuffle else [self.seed])
        sel = self._selection(rng)
        n, bs = len(self.bags), self.batch_size
        if self.shuffle:
            sizes = np.array([len(s) if s is not None else k for s, k in zip(sel, self.sizes)], dtype=np.float64)
            order = np.argsort(sizes * np.exp(rng.uniform(-self.SIZE_NOISE, self.SIZE_NOISE, n)), kind="stable")
            shared = [int(i) for i in order if not self.alone[i]]
            chunks = [shared[i:i + bs] for i in range(0, len(shared), bs)] + [[int(i)] for i in order if self.alone[i]]
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        else:
            chunks, cur = [], []
            for i in range(n):
                if self.alone[i]:
                    chunks.append([i])
                    continue
                cur.append(i)
                if len(cur) == bs:
                    chunks.append(cur)
                    cur = []
            chunks += [cur] if cur else []
        return [(idx, [sel[i] for i in idx]) for idx in chunks]

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        if self.num_workers == 0 and not self.pin_memory:
            for idx, sel in plan:
                yield self.build(idx, sel)
            return
        import torch
        from torch.utils.data import DataLoader

        # batch_size=None: each item of the sampler (one planned batch) is built whole by one worker.
        # A generator of its own: the DataLoader draws its workers' seeds from it, not from torch's global
        # RNG, which the model's dropout and sampling use (else workers would change the run's results).
        yield from DataLoader(_PlannedBatches(self), batch_size=None, sampler=plan, num_workers=self.num_workers,
                              prefetch_factor=self.prefetch if self.num_workers else None,
                              pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed))

    def build(self, idx: list[int], sel: list[np.ndarray | None]) -> Batch:
        """One padded batch of the bags at positions `idx` (their instances `sel`, None: all)."""
        import torch

        in_worker = torch.utils.data.get_worker_info() is not None
        lens = [int(self.sizes[i]) if s is None else len(s) for i, s in zip(idx, sel)]
        B, nmax = len(idx), max(lens)
        # One whole float32 bag: a view, not a copy (a 200,000 x 1024 bag is 0.8 GB); not from a
        # worker, whose tensors must be in shared memory anyway.
        f0 = self.bags[idx[0]].features if B == 1 else None
        view = f0 is not None and not in_worker and sel[0] is None and f0.dtype == np.float32 \
            and f0.flags.c_contiguous
        if view:
            xt = torch.from_numpy(f0[None])
        else:
            # Filled in numpy (single-threaded memcpy-speed copies, float16 -> float32 on assignment):
            # torch's intra-op threads only slow plain copies down on a busy CPU. np.empty + zeroing just
            # the padding writes each byte once; bags are read one at a time (held: no read), so a batch
            # of bags from disk costs its padded size plus one bag.
            xt = _empty((B, nmax, self.dim), shared=in_worker)
            x = xt.numpy()
            for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
                f = f0 if r == 0 and f0 is not None else self.bags[i].features
                x[r, :k] = f if s is None else f[s]     # (gather then copy beats np.take(out=) here)
                x[r, k:] = 0
                del f
        del f0
        mask = np.zeros((B, nmax), dtype=bool)
        for r, k in enumerate(lens):
            mask[r, :k] = True
        y = torch.tensor([self.bags[i].label for i in idx], dtype=torch.long)
        inst = None
        if self.with_instance_labels and all(self.bags[i].instance_labels is not None for i in idx):
            lab = np.zeros((B, nmax), dtype=np.float32)
            for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
                il = self.bags[i].instance_labels
                lab[r, :k] = il if s is None else il[s]
            inst = torch.from_numpy(lab)
        aux = None
        if self.aux is not None:
            a = np.zeros((B, nmax), dtype=np.float32)
            for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
                a[r, :k] = self.aux[i] if s is None else self.aux[i][s]
            aux = torch.from_numpy(a)
        return Batch(xt, torch.from_numpy(mask), y, idx, inst, list(sel), aux)


class _PlannedBatches:
    """The batcher as a map-style dataset whose keys are planned batches (what DataLoader workers run)."""

    def __init__(self, batcher: BagBatcher):
        self.batcher = batcher

    def __getitem__(self, item: tuple[list[int], list[np.ndarray | None]]) -> Batch:
        return self.batcher.build(*item)

    def __getstate__(self) -> dict:
        # A spawned worker (not a forked one, which shares this process's memory) is sent the bags
        # without the features held in memory: it reads them from their source instead of receiving
        # a pickled copy of the whole cache.
        b = self.batcher
        light = [Bag(x.slide_id, x.patient_id, x.label, None, x.coords, x.instance_labels, x.reader)
                 if x.reader is not None and x.held else x for x in b.bags]
        clone = object.__new__(BagBatcher)
        clone.__dict__.update({**b.__dict__, "bags": light})
        return {"batcher": clone}
