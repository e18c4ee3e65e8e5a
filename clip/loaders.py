"""What `clip train` feeds its model: pair DataLoaders seeded per epoch (split across ranks under
torchrun so that N processes see the batches of one), WebDataset shards split into training and
validation, the locked-image cache, and the fingerprint of a data set (a run refuses to resume on
other data)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from wsi.runtime import autocast


def data_fingerprint(source: Path, store: Path | None, slides: list[str]) -> str:
    h = hashlib.sha256()
    if source.is_file():
        h.update(source.read_bytes())
    else:
        for p in sorted(source.glob("*.tar")):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    h.update(json.dumps([str(store) if store else None, sorted(slides)]).encode())
    return h.hexdigest()[:16]


def is_shards(data: Path) -> bool:
    return data.is_dir() or data.suffix == ".tar" or "{" in str(data)


def shard_split(data: Path, val_fraction: float) -> tuple[list[str], list[str], int, int]:
    """(training shards, validation shards, pairs in each): the last shards are held out (whole shards,
    so a validation pair never sits in a training shard); sizes from sizes.json when present."""
    from .shards import shard_urls

    urls = shard_urls(data)
    n_val = 0 if len(urls) < 2 or val_fraction <= 0 else max(1, round(len(urls) * val_fraction))
    train, val = urls[:len(urls) - n_val], urls[len(urls) - n_val:]
    sizes_file = (data if data.is_dir() else data.parent) / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    count = lambda us: sum(int(sizes.get(Path(u).name, 5000)) for u in us)  # noqa: E731
    return train, val, count(train), count(val)


def to_uint8(size: int):
    """PIL image -> uint8 (size, size, 3) tensor, resized with antialiasing (as `Encoder.preprocess`)."""
    from PIL import Image

    def convert(img):
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return convert


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class RankBatches(torch.utils.data.Sampler):
    """Batches of a map-style dataset for one rank: the order one process would take (a permutation
    seeded per epoch, or file order), cut into global batches of `batch_size * world`, of which this
    rank takes its slice. So N processes at batch B see exactly the batches one process sees at batch
    N*B, and every rank has the same number of equal-sized batches (ClipLoss gathers features of the
    same shape). Without `drop_last` a short last global batch is topped up from the start of the
    order to a multiple of `world` (as DistributedSampler pads).

    With `group` (validation): the order is cut into groups of `group` pairs (the batch a loss is
    scored on), rank r takes whole groups r, r + world, ... and yields each in batches of
    `batch_size` (what one forward holds)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, *, shuffle: bool, generator=None,
                 drop_last: bool = False, group: int | None = None):
        self.n, self.b, self.world, self.rank = n, batch_size, world, rank
        self.shuffle, self.g, self.drop_last, self.group = shuffle, generator, drop_last, group

    def _order(self) -> list[int]:
        return torch.randperm(self.n, generator=self.g).tolist() if self.shuffle else list(range(self.n))

    def __iter__(self):
        order = self._order()
        if self.group:
            for start in range(self.rank * self.group, len(order), self.world * self.group):
                mine = order[start:start + self.group]
                yield from (mine[i:i + self.b] for i in range(0, len(mine), self.b))
            return
        g = self.b * self.world
        for i in range(0, len(order), g):
            chunk = order[i:i + g]
            if len(chunk) < g:
                if self.drop_last:
                    return
                need = -len(chunk) % self.world
                chunk = chunk + (order * (need // max(len(order), 1) + 1))[:need]
            per = len(chunk) // self.world
            yield chunk[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        if self.group:
            return sum(math.ceil(min(self.group, self.n - s) / self.b)
                       for s in range(self.rank * self.group, self.n, self.world * self.group))
        g = self.b * self.world
        return self.n // g if self.drop_last else math.ceil(self.n / g)


def pair_loader(ds, batch_size: int, shuffle: bool, seed: int, epoch: int, workers: int, drop_last: bool,
                world: int = 1, rank: int = 0, *, group: int | None = None):
    """A DataLoader of (images, captions) batches for this rank (see RankBatches); shards (an
    IterableDataset) are batched and split across ranks by their own pipeline."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if isinstance(ds, torch.utils.data.IterableDataset):
        if group:  # one worker keeps the groups' batches in order (workers' batches interleave)
            workers = min(workers, 1)
        return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                          pin_memory=torch.cuda.is_available())
    sampler = RankBatches(len(ds), batch_size, world, rank, shuffle=shuffle, generator=g, drop_last=drop_last,
                          group=group)
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


class CachedPairs(torch.utils.data.Dataset):
    """(cached image-tower output, this epoch's caption) per image: the locked-image fast path. The
    outputs live in .npy files (one per rank that computed a part), memory-mapped in each process
    that reads them: ranks and DataLoader workers share the page cache instead of each holding a copy."""

    def __init__(self, parts: list[Path], pairs):
        self.parts, self.pairs = [Path(p) for p in parts], pairs
        self._maps: list[np.ndarray] | None = None
        counts = [int(np.load(p, mmap_mode="r").shape[0]) for p in self.parts]
        self.starts = np.cumsum([0, *counts])

    def __getstate__(self):  # workers open their own maps
        return {**self.__dict__, "_maps": None}

    def _map(self, part: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r") for p in self.parts]
        return self._maps[part]

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return torch.from_numpy(np.array(self._map(part)[i - self.starts[part]])), self.pairs.caption(i)


def _block(n: int, world: int, rank: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


@torch.inference_mode()
def cache_frozen(frozen: nn.Module, enc, ds, device, precision: str, batch_size: int, workers: int,
                 progress: bool, what: str, folder: Path, world: int = 1, rank: int = 0) -> list[Path]:
    """Run the frozen image part once over `ds` (no augmentation), each rank over its own contiguous
    block, written batch by batch to folder/<what>-<rank>.npy (memory bounded by a batch). Returns
    every rank's part, in order; the caller waits for all ranks (a barrier) before reading them."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    parts = [folder / f"{what}-{r}.npy" for r in range(world) if _block(len(ds), world, r)[1] > _block(
        len(ds), world, r)[0]]
    lo, hi = _block(len(ds), world, rank)
    if hi <= lo:
        return parts
    loader = pair_loader(torch.utils.data.Subset(ds, range(lo, hi)), batch_size, False, 0, 0, workers, False)
    out, row = None, 0
    for images, _ in tqdm(loader, desc=f"frozen image tower ({what})", unit="batch", disable=not progress,
                          leave=False):
        with autocast(device, precision):
            f = frozen(enc.preprocess(images.to(device, non_blocking=True))).float().cpu().numpy()
        if out is None:
            out = open_memmap(folder / f"{what}-{rank}.npy.tmp", mode="w+", dtype=np.float32,
                              shape=(hi - lo, *f.shape[1:]))
        out[row:row + len(f)] = f
        row += len(f)
    out.flush()
    del out
    (folder / f"{what}-{rank}.npy.tmp").replace(folder / f"{what}-{rank}.npy")
    return parts
