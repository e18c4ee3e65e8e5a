"""`TileDataset`: tiles of a store as a torch Dataset, the one way pathmil reads tiles for models.

`wsi embed`, PathoCLIP training and the reasoner read tiles through it. Items are (slide_id, tile
index) pairs; a sample is a dict:

    image      uint8 tensor (P, P, 3), or whatever `transform` makes of the tile as a PIL image
    slide_id   str
    index      int, the tile's row in the slide's coords
    features   (D,) float32 tensor, with `features=ENCODER`
    label      float32 tensor (per-tile value of labels/<name>), with `labels=NAME`

DataLoader workers (fork or spawn) each open the store and the slide files themselves. A batch of
indices (`__getitems__`) is read slide by slide with one `read_tiles` call each, so each store chunk
is decompressed once per batch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .store import TileStore


class TileDataset(torch.utils.data.Dataset):
    def __init__(self, store: TileStore | str | Path, items: Sequence[tuple[str, int]] | Iterable[tuple[str, int]],
                 transform: Callable | None = None, *, features: str | None = None, labels: str | None = None):
        self.store_path = store.path if isinstance(store, TileStore) else store
        self.items = [(str(s), int(i)) for s, i in items]
        self.transform, self.features, self.labels = transform, features, labels
        self._pid, self._store, self._cache = None, None, {}
        view_of = self._view
        for sid in dict.fromkeys(s for s, _ in self.items):  # fail now, in the parent, not in a worker
            v = view_of(sid)
            if features is not None:
                v.feature_meta(features)

    @classmethod
    def for_slides(cls, store: TileStore | str | Path, slide_ids: Iterable[str] | None = None,
                   transform: Callable | None = None, **kwargs) -> "TileDataset":
        """Every tile of `slide_ids` (default: every complete slide), in coords order."""
        st = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
        ids = list(slide_ids) if slide_ids is not None else st.complete_ids()
        return cls(st, [(s, i) for s in ids for i in range(st[s].n_tiles)], transform, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:  # a spawned worker gets the path, never open handles
        return {**self.__dict__, "_pid": None, "_store": None, "_cache": {}}

    def _view(self, slide_id: str):
        if self._pid != os.getpid():  # first use in this process (a fresh DataLoader worker)
            self._pid, self._cache = os.getpid(), {}
            self._store = TileStore.open(self.store_path, readonly=True)
        return self._store[slide_id]

    def _per_tile(self, slide_id: str, what: str, name: str) -> np.ndarray:
        key = (slide_id, what)
        if key not in self._cache:
            v = self._view(slide_id)
            arr = v.features(name, np.float32) if what == "features" else v.labels(name)
            if arr is None:
                from .errors import StoreError

                raise StoreError(f"{self.store_path}: slide {slide_id!r} has no labels {name!r}; "
                                 f"make them with `wsi labels {self.store_path} --name {name}`")
            self._cache = {k: v for k, v in self._cache.items() if k[0] == slide_id}  # one slide at a time
            self._cache[key] = arr
        return self._cache[key]

    def _sample(self, slide_id: str, index: int, tile: np.ndarray) -> dict[str, Any]:
        if self.transform is not None:
            from PIL import Image

            image = self.transform(Image.fromarray(tile))
        else:
            image = torch.from_numpy(np.ascontiguousarray(tile))
        out: dict[str, Any] = {"image": image, "slide_id": slide_id, "index": index}
        if self.features is not None:
            out["features"] = torch.from_numpy(self._per_tile(slide_id, "features", self.features)[index])
        if self.labels is not None:
            out["label"] = torch.tensor(float(self._per_tile(slide_id, "labels", self.labels)[index]))
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid, idx = self.items[i]
        return self._sample(sid, idx, self._view(sid).read_tiles([idx])[0])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch, read with one `read_tiles` call per slide (torch's DataLoader calls this)."""
        by_slide: dict[str, list[int]] = {}
        for k in indices:
            by_slide.setdefault(self.items[k][0], []).append(k)
        out: list[dict[str, Any] | None] = [None] * len(indices)
        pos = {k: j for j, k in enumerate(indices)}
        for sid, ks in by_slide.items():
            rows = [self.items[k][1] for k in ks]
            tiles = self._view(sid).read_tiles(rows)
            for k, r, t in zip(ks, rows, tiles):
                out[pos[k]] = self._sample(sid, r, t)
        return out  # type: ignore[return-value]
