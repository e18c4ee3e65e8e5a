"""Where a MIL cohort's bags come from, behind one interface (`FeatureSource`):

    StoreFeatures   a tile store: `features/<encoder>`, coords and per-tile labels of its complete slides
    H5Features      a CLAM (h5_files/) or TRIDENT (features_<encoder>/) folder of h5 files

and `BagReader`, which reads one bag's features from a source when a batch needs them (a bag that is
not in the memory cache), checking that they did not change while the run reads them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from wsi.errors import CohortError


class FeatureSource(Protocol):
    """Where bags come from. `slide_ids()` lists the slides holding the encoder's features; `read`
    gives one slide's (features (N, D) float16/32, coords (N, 2) int64), `features` the features alone.
    A source is used from DataLoader workers too: it must survive fork and pickling."""

    kind: str                               # "store" | "h5"
    path: str
    encoder: str

    def describe(self) -> str: ...
    def slide_ids(self) -> list[str]: ...
    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]: ...
    def features(self, slide_id: str) -> np.ndarray: ...
    def check_instance_labels(self, name: str) -> None: ...
    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None: ...


class StoreFeatures:
    """Features of a tile store's complete slides (a TileStore or its path, opened read-only). Each
    process (a DataLoader worker after fork or spawn) opens the store itself."""

    kind = "store"

    def __init__(self, store, encoder: str):
        from wsi.store import TileStore

        self.store = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
        self.path, self.encoder = str(self.store.path), encoder
        self._pid = os.getpid()

    def __getstate__(self) -> dict:   # a spawned worker gets the path, never open handles
        return {**self.__dict__, "store": None, "_pid": None}

    def _store(self):
        if self._pid != os.getpid():
            from wsi.store import TileStore

            self.store, self._pid = TileStore.open(self.path, readonly=True), os.getpid()
        return self.store

    def describe(self) -> str:
        return f"{self.path} (features {self.encoder!r})"

    def slide_ids(self) -> list[str]:
        st = self._store()
        return [s for s in st.complete_ids() if st[s].has_features(self.encoder)]

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        view = self._store()[slide_id]
        return view.features(self.encoder), view.coords

    def features(self, slide_id: str) -> np.ndarray:
        return self._store()[slide_id].features(self.encoder)

    def check_instance_labels(self, name: str) -> None:
        pass

    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None:
        return self._store()[slide_id].labels(name)


class H5Features:
    """Features of a CLAM or TRIDENT h5 folder (files TRIDENT is still writing are left out)."""

    kind = "h5"

    def __init__(self, h5_dir: str | Path, encoder: str):
        from wsi.h5 import h5_feature_files

        self.path, self.encoder = str(h5_dir), encoder
        self.files = h5_feature_files(h5_dir, encoder)

    def describe(self) -> str:
        return self.path

    def slide_ids(self) -> list[str]:
        return sorted(self.files)

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        from wsi.h5 import read_h5_bag

        return read_h5_bag(self.files[slide_id])

    def features(self, slide_id: str) -> np.ndarray:
        return self.read(slide_id)[0]

    def check_instance_labels(self, name: str) -> None:
        raise CohortError(f"instance labels {name!r} live in a tile store, not in h5 files; import the h5 folder "
                          f"with `wsi import-h5 {self.path} --store STORE --encoder {self.encoder}`, pass --store")

    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None:
        self.check_instance_labels(name)
        return None


def feature_source(*, store=None, h5_dir: str | Path | None = None, encoder: str) -> FeatureSource:
    """The source of exactly one of `store` (a TileStore or its path) and `h5_dir`."""
    if (store is None) == (h5_dir is None):
        raise CohortError("give exactly one of store (a tile store) or h5_dir (a CLAM / TRIDENT feature folder)")
    return StoreFeatures(store, encoder) if store is not None else H5Features(h5_dir, encoder)


def _as_features(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float16) else a.astype(np.float32)


class BagReader:
    """Features of bags not held in memory, read from the source on each use, as load_cohort first
    read them (shape and dtype checked: a slide re-embedded since is an error, not other data)."""

    def __init__(self, source: FeatureSource):
        self.source = source
        self._shapes: dict[str, tuple[tuple[int, int], np.dtype]] = {}

    def record(self, slide_id: str, feats: np.ndarray) -> None:
        self._shapes[slide_id] = (tuple(feats.shape), feats.dtype)

    def shape(self, slide_id: str) -> tuple[int, int]:
        return self._shapes[slide_id][0]

    def nbytes(self, slide_id: str) -> int:
        (n, d), dtype = self._shapes[slide_id]
        return n * d * dtype.itemsize

    def read(self, slide_id: str) -> np.ndarray:
        feats = _as_features(self.source.features(slide_id))
        shape, dtype = self._shapes[slide_id]
        if feats.shape != shape or feats.dtype != dtype:
            raise CohortError(f"{self.source.path}: features of slide {slide_id!r} changed while the cohort was "
                              f"in use ({shape} {dtype}, now {feats.shape} {feats.dtype}); run again once they "
                              "are written")
        return feats
