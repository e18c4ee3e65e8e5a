"""`SlideView`: one slide of a tile store, read and written through typed methods.

Reads: `meta` (SlideMeta), `coords`, `read_tiles` / `iter_tiles`, `features`, `labels`, `predictions`,
`top_tiles`, `thumbnail`, `tissue`. Writes: `write_arrays` / `write_tiles` (tiling), `write_features` /
`create_features` (embedding, imports), `write_labels`, `write_predictions`; each features, labels and
predictions entry is marked complete only after its data is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import StoreError
from .codecs import parse_tile_codec, tile_array_codecs
from .meta import COMPLETE, SlideMeta, feature_key, validate_name

if TYPE_CHECKING:
    from .tilestore import TileStore

TILE_CHUNK = 8                  # tiles per store chunk
TILES_PER_READ = 512            # iter_tiles: tiles per read (~100 MB of 256-px tiles)
FEATURE_ROWS_PER_CHUNK = 4096
_ROWS_PER_CHUNK = 65536         # coords, labels, predictions


def _stored_dtype(values: np.ndarray) -> np.ndarray:
    """A prediction array as stored: float64 becomes float32 (scores need no more), every other dtype
    (class indices, flags, float16) is kept."""
    return values.astype(np.float32) if values.dtype == np.float64 else values


@dataclass(frozen=True)
class TopTiles:
    """The k highest-scoring tiles of a slide, best first."""

    indices: np.ndarray         # (k,) int64 rows of coords
    scores: np.ndarray          # (k,) float32
    coords: np.ndarray          # (k, 2) int64 level-0 top-left x, y


class FeatureWriter:
    """Rows of an (N, D) feature array being filled batch by batch; `finish()` marks it complete."""

    def __init__(self, view: "SlideView", encoder: str, array):
        self.view, self.encoder, self._arr = view, encoder, array
        self.shape = array.shape

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        self._arr[rows] = values

    def finish(self) -> None:
        self._arr.attrs["complete"] = True


class SlideView:
    def __init__(self, store: "TileStore", slide_id: str, group):
        self.store, self.slide_id, self._g = store, slide_id, group
        self._meta: SlideMeta | None = None
        self._coords: np.ndarray | None = None
        self._tiles = None

    def __repr__(self) -> str:
        return f"SlideView({self.slide_id!r}, {self.meta.status}, {self.n_tiles} tiles)"

    # -- metadata --------------------------------------------------------------------------------
    @property
    def meta(self) -> SlideMeta:
        if self._meta is None:
            try:
                self._meta = SlideMeta.from_attrs(self.slide_id, self._g.attrs.asdict())
            except Exception as e:
                raise StoreError(f"{self.store.path}: slide {self.slide_id!r} has unreadable metadata "
                                 f"({type(e).__name__}: {e}); tile it again with --overwrite") from None
        return self._meta

    def _update_meta(self, **changes: Any) -> SlideMeta:
        self.store._require_writable()
        self._meta = self.meta.replace(**changes)
        self._g.attrs.put(self._meta.to_attrs())
        return self._meta

    def mark_complete(self, **changes: Any) -> SlideMeta:
        """Status "complete" (and n_tiles), after every array of the slide is written."""
        return self._update_meta(**changes, status=COMPLETE, n_tiles=self.n_tiles)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (what `wsi info` prints)."""
        m = self.meta
        return {"id": self.slide_id, "status": m.status, "kind": m.kind, "n_tiles": self.n_tiles,
                "mpp": m.target_mpp, "patch_size": m.patch_size, "slide_mpp": m.slide_mpp, "source": m.source,
                "tiles": self.has_tiles, "tile_codec": m.tile_codec if self.has_tiles else None,
                "features": self.feature_names(), "labels": self.label_names(),
                "predictions": self.prediction_names(), "error": m.error}

    # -- coords, tissue, tiles ---------------------------------------------------------------------
    def _has(self, name: str) -> bool:
        return name in self._g

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left x, y (a read-only array)."""
        if self._coords is None:
            c = self._g["coords"][:].astype(np.int64) if self._has("coords") else np.zeros((0, 2), np.int64)
            c.flags.writeable = False
            self._coords = c
        return self._coords

    @property
    def n_tiles(self) -> int:
        return int(self._g["coords"].shape[0]) if self._has("coords") else 0

    @property
    def level0_size(self) -> tuple[int, int]:
        """Level-0 (width, height): as tiling or the import recorded it, else the tiles' extent."""
        m = self.meta
        if m.width and m.height:
            return max(1, int(m.width)), max(1, int(m.height))
        size0 = float(m.tile_size_level0 or m.patch_size or 1)
        c = self.coords
        return (max(1, int(c[:, 0].max(initial=0) + size0)), max(1, int(c[:, 1].max(initial=0) + size0)))

    @property
    def has_tiles(self) -> bool:
        return self._has("tiles")

    def tissue(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(low-resolution mask, its attrs: downsample, mpp, threshold), or None for imports."""
        if not self._has("tissue") or self.meta.features_only:
            return None
        a = self._g["tissue"]
        return a[:], a.attrs.asdict()

    def tissue_fraction(self) -> np.ndarray | None:
        return self._g["tissue_fraction"][:] if self._has("tissue_fraction") else None

    def write_arrays(self, coords: np.ndarray, *, tissue: np.ndarray | None = None,
                     tissue_attrs: dict | None = None, tissue_fraction: np.ndarray | None = None,
                     tile_codec: str | None = None) -> None:
        """coords, the tissue mask and, with a `tile_codec`, an empty tiles array to fill chunk by chunk
        (`write_tiles`)."""
        self.store._require_writable()
        coords = np.asarray(coords, np.int32).reshape(-1, 2)
        n = len(coords)
        g = self._g
        g.create_array("coords", data=coords, chunks=(max(1, min(n, _ROWS_PER_CHUNK)), 2))
        if tissue is not None:
            g.create_array("tissue", data=np.asarray(tissue, np.uint8),
                           chunks=tuple(max(1, min(s, 1024)) for s in tissue.shape), attributes=tissue_attrs or {})
        if tissue_fraction is not None:
            g.create_array("tissue_fraction", data=np.asarray(tissue_fraction, np.float32),
                           chunks=(max(1, min(n, _ROWS_PER_CHUNK)),))
        self._coords = None
        if tile_codec is not None:
            p = self.meta.patch_size
            if not p:
                raise ValueError(f"{self.slide_id}: a patch size is needed to store tiles")
            codec = parse_tile_codec(tile_codec)
            g.create_array("tiles", shape=(n, p, p, 3), dtype="uint8", chunks=(TILE_CHUNK, p, p, 3),
                           fill_value=0, attributes={"codec": codec}, **tile_array_codecs(codec))
            self._update_meta(tiles_stored=True, tile_codec=codec)

    def _tile_array(self):
        if self._tiles is None:
            self._tiles = self._g["tiles"]
        return self._tiles

    def write_tiles(self, start: int, tiles: np.ndarray) -> None:
        """Tiles for rows start .. start+len(tiles); write whole chunks (start a multiple of
        TILE_CHUNK) when several processes fill one slide, so no two touch one chunk."""
        self._tile_array()[start:start + len(tiles)] = tiles

    def read_tiles(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (n, P, P, 3) tiles at rows `indices`, in the order given. Read from the stored tiles
        when there are any, else from the slide file through the coords, exactly as `wsi tile` reads
        them. A features-only slide (an import) has no pixels: StoreError. A whole slide can hold more
        tiles than memory; `iter_tiles` visits them all chunk by chunk."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tiles):
            raise IndexError(f"{self.slide_id}: tile index out of range 0..{self.n_tiles - 1}")
        if self.has_tiles:
            if len(idx) == 0:
                return np.zeros((0,) + self._tile_array().shape[1:], np.uint8)
            if len(idx) > 1 and np.all(np.diff(idx) == 1):
                return self._tile_array()[int(idx[0]):int(idx[-1]) + 1]
            return self._tile_array().get_orthogonal_selection((idx,))
        from .pixels import read_from_slide

        return read_from_slide(self.meta, self.coords[idx], self.store.path)

    def iter_tiles(self, chunk: int = TILES_PER_READ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, uint8 tiles) of every tile of the slide in coords order, at most `chunk` tiles
        (rounded up to whole store chunks) at a time, so memory stays bounded on any slide."""
        step = max(TILE_CHUNK, -(-int(chunk) // TILE_CHUNK) * TILE_CHUNK)
        for start in range(0, self.n_tiles, step):
            idx = np.arange(start, min(start + step, self.n_tiles), dtype=np.int64)
            yield idx, self.read_tiles(idx)

    # -- features ----------------------------------------------------------------------------------
    def _features_group(self, create: bool = False):
        if "features" in self._g:
            return self._g["features"]
        return self._g.create_group("features") if create else None

    def feature_names(self) -> list[str]:
        """Encoders (array names) with complete features."""
        g = self._features_group()
        return sorted(k for k, a in g.arrays() if a.attrs.get("complete")) if g is not None else []

    def has_features(self, encoder: str) -> bool:
        g = self._features_group()
        key = feature_key(encoder)
        return g is not None and key in g and bool(g[key].attrs.get("complete"))

    def _features_array(self, encoder: str):
        if not self.has_features(encoder):
            raise StoreError(f"{self.store.path}: slide {self.slide_id!r} has no complete features for "
                             f"{encoder!r}; run `wsi embed {self.store.path} --encoder {encoder}`")
        return self._features_group()[feature_key(encoder)]

    def features(self, encoder: str, dtype=None) -> np.ndarray:
        """(N, D) features of `encoder`, as stored (float32 or float16) unless `dtype` is given."""
        a = self._features_array(encoder)[:]
        return a if dtype is None else a.astype(dtype, copy=False)

    def feature_meta(self, encoder: str) -> dict[str, Any]:
        """The feature array's attributes: encoder, weights digest, transform, precision, source, ..."""
        a = self._features_array(encoder)
        return {**a.attrs.asdict(), "dim": int(a.shape[1]), "dtype": str(a.dtype)}

    def create_features(self, encoder: str, dim: int, attrs: dict[str, Any], dtype: str = "float32") -> FeatureWriter:
        """An empty (N, D) `features/<encoder>` array to fill batch by batch; not complete until
        `finish()`. Any earlier array of that name is replaced."""
        self.store._require_writable()
        feats = self._features_group(create=True)
        key, n = feature_key(encoder), self.n_tiles
        if key in feats:
            del feats[key]
        arr = feats.create_array(key, shape=(n, dim), dtype=dtype,
                                 chunks=(max(1, min(n, FEATURE_ROWS_PER_CHUNK)), dim),
                                 attributes={**attrs, "encoder": encoder, "complete": False})
        return FeatureWriter(self, encoder, arr)

    def write_features(self, encoder: str, features: np.ndarray, attrs: dict[str, Any]) -> None:
        """Write a whole (N, D) feature array at once and mark it complete."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != self.n_tiles:
            raise ValueError(f"{self.slide_id}: features of shape {features.shape} do not match {self.n_tiles} tiles")
        w = self.create_features(encoder, features.shape[1], attrs, dtype=str(features.dtype))
        w[:] = features
        w.finish()

    # -- labels --------------------------------------------------------------------------------------
    def label_names(self) -> list[str]:
        if "labels" not in self._g:
            return []
        return sorted(k for k, a in self._g["labels"].arrays() if a.attrs.get("complete", True))

    def _label_array(self, name: str):
        validate_name(name, "label")
        if "labels" not in self._g or name not in self._g["labels"]:
            return None
        a = self._g["labels"][name]
        if not a.attrs.get("complete", True):  # schema-1 labels had no marker and were written whole
            raise StoreError(f"{self.store.path}: labels {name!r} of slide {self.slide_id!r} were interrupted "
                             "while being written; run `wsi labels` again")
        return a

    def labels(self, name: str) -> np.ndarray | None:
        """float32 (N,) per-tile values of `labels/<name>` (e.g. tumour fraction), None when absent."""
        a = self._label_array(name)
        return None if a is None else a[:]

    def label_meta(self, name: str) -> dict[str, Any] | None:
        a = self._label_array(name)
        return None if a is None else a.attrs.asdict()

    def write_labels(self, name: str, values: np.ndarray, attrs: dict[str, Any]) -> None:
        """Write `labels/<name>`: float32 (N,), one value per tile (replaced if present)."""
        self.store._require_writable()
        validate_name(name, "label")
        values = np.asarray(values, np.float32)
        if values.ndim != 1 or values.shape[0] != self.n_tiles:
            raise ValueError(f"{self.slide_id}: labels of shape {values.shape} do not match {self.n_tiles} tiles")
        labels = self._g["labels"] if "labels" in self._g else self._g.create_group("labels")
        if name in labels:
            del labels[name]
        a = labels.create_array(name, shape=values.shape, dtype="float32",
                                chunks=(max(1, min(len(values), _ROWS_PER_CHUNK)),),
                                attributes={**attrs, "complete": False})
        a[:] = values
        a.attrs["complete"] = True

    # -- predictions ---------------------------------------------------------------------------------
    def prediction_names(self) -> list[str]:
        """Names of the slide's complete predictions."""
        if "predictions" not in self._g:
            return []
        return sorted(k for k, grp in self._g["predictions"].groups() if grp.attrs.get("complete"))

    def predictions(self, run: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(per-tile arrays, attrs) of `predictions/<run>`; StoreError when absent or unfinished."""
        validate_name(run, "prediction")
        if run not in self.prediction_names():
            raise StoreError(f"{self.store.path}: slide {self.slide_id!r} has no predictions {run!r} (it has: "
                             f"{', '.join(self.prediction_names()) or 'none'}); make them with "
                             f"`mil predict --store {self.store.path} --run RUN_DIR --name {run}`")
        grp = self._g["predictions"][run]
        return {k: a[:] for k, a in grp.arrays()}, grp.attrs.asdict()

    def write_predictions(self, run: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Write `predictions/<run>`: per-tile arrays (N, ...) and the run's attrs; `complete` is set
        last, so an interrupted write never looks finished."""
        self.store._require_writable()
        validate_name(run, "prediction")
        n = self.n_tiles
        arrays = {k: _stored_dtype(np.asarray(v)) for k, v in arrays.items()}
        for key, values in arrays.items():  # checked before the old predictions are dropped
            if values.shape[:1] != (n,):
                raise ValueError(f"{self.slide_id}: prediction {key!r} of shape {values.shape} does not match {n} tiles")
        preds = self._g["predictions"] if "predictions" in self._g else self._g.create_group("predictions")
        if run in preds:
            del preds[run]
        grp = preds.create_group(run, attributes={**attrs, "complete": False})
        for key, values in arrays.items():
            grp.create_array(key, data=values, chunks=(max(1, min(n, _ROWS_PER_CHUNK)),) + values.shape[1:])
        grp.attrs["complete"] = True

    def top_tiles(self, run: str, k: int = 8, by: str = "instance_score") -> TopTiles:
        """The k tiles with the highest `by` score of `predictions/<run>` (ties: lower index first)."""
        arrays, _ = self.predictions(run)
        if by not in arrays:
            raise StoreError(f"{self.store.path}: predictions {run!r} of slide {self.slide_id!r} have no "
                             f"{by!r}; they have: {', '.join(sorted(arrays))}")
        s = np.asarray(arrays[by], np.float32)
        if s.ndim != 1:
            raise StoreError(f"{by!r} of predictions {run!r} holds {s.shape[1:]} values per tile; pick one column")
        order = np.lexsort((np.arange(len(s)), -s))[:max(0, int(k))]
        return TopTiles(order.astype(np.int64), s[order], self.coords[order].copy())

    # -- pictures ------------------------------------------------------------------------------------
    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
        """(RGB uint8 image whose longer side is about `max_px`, level-0 px per image px (x, y)). From the
        slide file when it can be read, else a mosaic of the stored tiles; StoreError when neither."""
        from .pixels import thumbnail

        return thumbnail(self, max_px)
