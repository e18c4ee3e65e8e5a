"""Padded, size-bucketed mini-batches of bags held in memory: what `mil train` iterates over."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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


class BagBatcher:
    """Padded, size-bucketed mini-batches from bags held in memory.

    Each pass (epoch) with shuffle: bags above `max_instances` are subsampled afresh (kept indices
    sorted), bags are ordered by size with a little seeded noise and cut into batches (so padding
    stays small), and the batch order is shuffled. Every pass differs and is reproducible from `seed`
    and the pass number. With shuffle=False the bags keep their order and every pass is identical."""

    SIZE_NOISE = 0.1    # relative jitter on sizes before bucketing: neighbours vary from epoch to epoch

    def __init__(self, bags: list[Bag], batch_size: int = 16, *, max_instances: int | None = None,
                 shuffle: bool = True, seed: int = 0, with_instance_labels: bool = False,
                 aux: list[np.ndarray] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be at least 1 (or None for whole bags), got {max_instances}")
        empty = [b.slide_id for b in bags if len(b.features) == 0]
        if empty:
            raise CohortError(f"bags without instances: {name_ids(empty)}; leave those slides out")
        dims = {b.features.shape[1] for b in bags}
        if len(dims) > 1:
            raise CohortError(f"bags have different feature widths {sorted(dims)}; use features of one encoder")
        self.bags, self.batch_size, self.max_instances = bags, batch_size, max_instances
        self.shuffle, self.seed, self.with_instance_labels = shuffle, seed, with_instance_labels
        if aux is not None and [len(a) for a in aux] != [len(b.features) for b in bags]:
            raise ValueError("aux must hold one value per instance of every bag")
        self.aux = aux   # per-bag (N,) values batched alongside the features (e.g. w2s negative-bag evidence)
        self.dim = dims.pop() if dims else 0
        self.sizes = np.array([len(b.features) for b in bags], dtype=np.int64)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.bags) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The pass the next iteration makes (to resume a run with the same batches)."""
        self.epoch = epoch

    def _selection(self, rng: np.random.Generator) -> list[np.ndarray | None]:
        m = self.max_instances
        if m is None:
            return [None] * len(self.bags)
        return [np.sort(rng.choice(n, m, replace=False)) if n > m else None for n in self.sizes]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        # shuffle=False: the same subsample every pass, so evaluation is deterministic
        rng = np.random.default_rng([self.seed, epoch] if self.shuffle else [self.seed])
        sel = self._selection(rng)
        n = len(self.bags)
        if self.shuffle:
            sizes = np.array([len(s) if s is not None else k for s, k in zip(sel, self.sizes)], dtype=np.float64)
            order = np.argsort(sizes * np.exp(rng.uniform(-self.SIZE_NOISE, self.SIZE_NOISE, n)), kind="stable")
            chunks = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        else:
            chunks = [np.arange(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        for idx in chunks:
            yield self._build([int(i) for i in idx], [sel[i] for i in idx])

    def _build(self, idx: list[int], sel: list[np.ndarray | None]) -> Batch:
        import torch

        lens = [int(self.sizes[i]) if s is None else len(s) for i, s in zip(idx, sel)]
        B, nmax = len(idx), max(lens)
        # Filled in numpy (single-threaded memcpy-speed copies, float16 -> float32 on assignment): torch's
        # intra-op threads only slow plain copies down on a busy CPU. np.empty + zeroing just the
        # padding writes each byte once.
        f0 = self.bags[idx[0]].features
        # One whole float32 bag: a view, not a copy (a 200,000 x 1024 bag is 0.8 GB).
        view = B == 1 and sel[0] is None and f0.dtype == np.float32 and f0.flags.c_contiguous
        x = f0[None] if view else np.empty((B, nmax, self.dim), dtype=np.float32)
        mask = np.zeros((B, nmax), dtype=bool)
        for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
            if view:
                mask[r, :k] = True
                continue
            f = self.bags[i].features
            x[r, :k] = f if s is None else f[s]     # (gather then copy beats np.take(out=) here)
            x[r, k:] = 0
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
        return Batch(torch.from_numpy(x), torch.from_numpy(mask), y, idx, inst, list(sel), aux)
