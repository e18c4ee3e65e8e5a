"""What `clip train` feeds its model: pair DataLoaders seeded per epoch (sharded across ranks under
torchrun), WebDataset shards split into training and validation, the locked-image cache, and the
fingerprint of a data set (a run refuses to resume on other data)."""
from __future__ import annotations

import hashlib
import json
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


def pair_loader(ds, batch_size: int, shuffle: bool, seed: int, epoch: int, workers: int, drop_last: bool,
            world: int, rank: int):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if isinstance(ds, torch.utils.data.IterableDataset):  # shards: shuffled and split across ranks by the pipeline
        return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                          pin_memory=torch.cuda.is_available())
    if world > 1:
        sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(ds, generator=g) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=_collate,
                      drop_last=drop_last, generator=g, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


class CachedPairs(torch.utils.data.Dataset):
    """(cached image-tower output, this epoch's caption) per image: the locked-image fast path."""

    def __init__(self, feats: torch.Tensor, pairs):
        self.feats, self.pairs = feats, pairs

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int):
        return self.feats[i], self.pairs.caption(i)


@torch.inference_mode()
def cache_frozen(frozen: nn.Module, enc, ds, device, precision: str, batch_size: int, workers: int,
                  progress: bool, what: str) -> torch.Tensor:
    from tqdm import tqdm

    out = []
    loader = pair_loader(ds, batch_size, False, 0, 0, workers, False, 1, 0)
    for images, _ in tqdm(loader, desc=f"frozen image tower ({what})", unit="batch", disable=not progress,
                          leave=False):
        with autocast(device, precision):
            out.append(frozen(enc.preprocess(images.to(device, non_blocking=True))).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
