"""The tile store on disk: `TileStore.open` / `TileStore.create`, slides as `SlideView`s.

    cohort.zarr/                 attrs: pathmil_schema (2), pathmil_version
      slides/<slide_id>/         attrs: SlideMeta (status, kind, source, µm/px, tile sizes, ...)
        coords   int32 (N, 2)    level-0 top-left x, y
        tissue   uint8 (h, w)    low-resolution tissue mask; attrs: downsample, mpp, threshold
        tissue_fraction float32 (N,)
        tiles    uint8 (N, P, P, 3), TILE_CHUNK tiles per chunk, JPEG or lossless (attrs: codec)
        features/<encoder>       (N, D); attrs: encoder, weights digest, transform, complete
        labels/<name>            float32 (N,); attrs: source, rule, complete
        predictions/<run>/       per-tile arrays; attrs: run, model, bag probabilities, complete

A slide's status is "writing" while its arrays are written, "complete" only after all of them are,
and "failed" (with `error`) when it could not be processed. Every features, labels and predictions
entry has its own `complete` marker, set last. zarr's local store writes each file atomically
(temp file + rename), so a kill never leaves a half-written `zarr.json`.

This package is the only place that imports zarr.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import StoreError
from ..runtime import package_version
from .codecs import DEFAULT_TILE_CODEC, register as _register_codecs
from .meta import COMPLETE, FAILED, TILED, WRITING, SlideMeta, validate_slide_id
from .view import SlideView

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2


def _valid_id(name: str) -> bool:
    try:
        return validate_slide_id(name) == name
    except ValueError:
        return False


def _is_url(path) -> bool:
    return "://" in str(path)


class TileStore:
    """A cohort's tile store (a local folder or any fsspec URL zarr accepts).

    `TileStore.open(path)` for a store that must exist, `TileStore.create(path)` to make one (or
    reopen it). `store[slide_id]` and `iter(store)` give `SlideView`s."""

    def __init__(self, path: str | Path, mode: str = "a"):
        """mode "r": open read-only; "r+": open an existing store for writing; "a": create if missing."""
        import zarr

        _register_codecs()
        self.path = path if _is_url(path) else Path(path)
        self.readonly = mode == "r"
        local = None if _is_url(path) else Path(path)
        if mode in ("r", "r+"):
            if local is not None and not (local / "zarr.json").is_file():
                what = "no tile store here" if not local.exists() else "not a tile store (no zarr.json)"
                raise StoreError(f"{path}: {what}; create one with `wsi tile SLIDES --store {path}`")
            try:
                self.root = zarr.open_group(str(path), mode=mode)
            except Exception as e:
                raise StoreError(f"{path}: cannot open it as a tile store ({type(e).__name__}: {e})") from None
        elif mode == "a":
            if local is not None and local.exists() and not (local / "zarr.json").exists() and \
                    (not local.is_dir() or any(local.iterdir())):
                raise StoreError(f"{path}: exists and is not a tile store; choose a new path for --store")
            self.root = zarr.open_group(str(path), mode="a", zarr_format=3)
        else:
            raise ValueError(f"mode must be 'r', 'r+' or 'a', got {mode!r}")
        schema = self.root.attrs.get("pathmil_schema")
        if schema is None:
            if mode != "a" or len(list(self.root.keys())):
                raise StoreError(f"{path}: a Zarr group, but not a pathmil tile store; choose a new path for --store")
            self.root.attrs.update({"pathmil_schema": SCHEMA_VERSION, "pathmil_version": package_version()})
        elif schema > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer pathmil (schema {schema}); upgrade pathmil")
        elif schema < SCHEMA_VERSION and not self.readonly:
            self._migrate(schema)
        if not self.readonly and "slides" not in self.root:
            self.root.create_group("slides")
        self._views: dict[str, SlideView] = {}

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> "TileStore":
        """An existing store; StoreError (and nothing created) when there is none at `path`."""
        return cls(path, mode="r" if readonly else "r+")

    @classmethod
    def create(cls, path: str | Path) -> "TileStore":
        """A new store at `path`, or the existing one opened for writing."""
        return cls(path, mode="a")

    def _migrate(self, schema: int) -> None:
        """Schema 1 -> 2: slide attributes get their typed names (SlideMeta). Nothing is dropped:
        names without a typed field move to `provenance`."""
        n = 0
        for sid in self.slide_ids():
            g = self.root["slides"][sid]
            a = dict(g.attrs)
            if "kind" not in a:
                g.attrs.put(SlideMeta.from_attrs(sid, a).to_attrs())
                n += 1
        self.root.attrs.update({"pathmil_schema": SCHEMA_VERSION, "migrated_from_schema": schema})
        log.info("%s: migrated %d slides from store schema %d to %d", self.path, n, schema, SCHEMA_VERSION)

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, {len(self)} slides)"

    # -- slides ---------------------------------------------------------------------------------
    def slide_ids(self) -> list[str]:
        if "slides" not in self.root:
            return []
        try:
            return sorted(self.root["slides"].group_keys())
        except Exception:  # a member's metadata is unreadable: list names without parsing them
            return self._listed_ids()

    def _listed_ids(self) -> list[str]:
        """Slide ids from the store's key listing alone, so one damaged slide hides no other slide
        (`status` and `info` then report it as damaged)."""
        from zarr.core.sync import sync

        sp = self.root.store_path
        prefix = f"{sp.path}/slides" if sp.path else "slides"

        async def names() -> list[str]:
            return [n async for n in sp.store.list_dir(prefix)]

        return sorted(n for n in sync(names()) if n != "zarr.json" and _valid_id(n))

    def __len__(self) -> int:
        return len(self.slide_ids())

    def __contains__(self, slide_id: object) -> bool:
        """Whether the store holds `slide_id`; False for anything that is not a valid slide id."""
        return isinstance(slide_id, str) and _valid_id(slide_id) and slide_id in self.slide_ids()

    def __iter__(self) -> Iterator[SlideView]:
        for sid in self.slide_ids():
            yield self[sid]

    def __getitem__(self, slide_id: str) -> SlideView:
        validate_slide_id(slide_id)
        view = self._views.get(slide_id) or self._load(slide_id)
        if view is None:
            raise StoreError(f"{self.path}: no slide {slide_id!r}; it holds {len(self.slide_ids())} slides "
                             "(see `wsi info`)")
        return view

    def _load(self, slide_id: str) -> SlideView | None:
        """A fresh view of the slide (cached), None when the store has none; StoreError when its
        metadata cannot be read. One lookup, not a listing of every slide."""
        try:
            group = self.root["slides"][slide_id]
        except KeyError:
            return None
        except Exception as e:
            raise StoreError(f"{self.path}: slide {slide_id!r} is damaged ({type(e).__name__}: {e}); "
                             f"tile it again with --overwrite") from None
        view = self._views[slide_id] = SlideView(self, slide_id, group)
        return view

    def complete_ids(self) -> list[str]:
        """Slides whose status is complete (damaged slides are left out with a warning)."""
        out = []
        for sid in self.slide_ids():
            try:
                if self.status(sid) == COMPLETE:
                    out.append(sid)
            except StoreError as e:
                log.warning("%s", e)
        return out

    def status(self, slide_id: str) -> str | None:
        """"writing" | "complete" | "failed", or None when the store has no such slide. A slide whose
        metadata cannot be read raises StoreError: damage is reported, never taken for absence."""
        validate_slide_id(slide_id)
        self._views.pop(slide_id, None)  # re-read: another process may have written (or removed) it
        view = self._load(slide_id)
        return None if view is None else view.meta.status

    def info(self) -> list[dict[str, Any]]:
        """One summary dict per slide (`wsi info`); a damaged slide shows status "damaged" and why."""
        out = []
        for sid in self.slide_ids():
            try:
                out.append(self[sid].info())
            except StoreError as e:
                out.append({"id": sid, "status": "damaged", "n_tiles": 0, "error": str(e)})
        return out

    # -- writing ----------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; open it with TileStore.open(path) to write")

    def begin_slide(self, meta: SlideMeta) -> SlideView:
        """Start (or restart) a slide: any previous content is removed, status becomes "writing"."""
        self._require_writable()
        sid = validate_slide_id(meta.slide_id)
        slides = self.root["slides"]
        try:
            exists = sid in slides
        except Exception:  # its metadata is damaged: it exists, and goes
            exists = True
        if exists:
            del slides[sid]
        self._views.pop(sid, None)
        slides.create_group(sid, attributes=meta.replace(status=WRITING, error=None).to_attrs())
        return self[sid]

    def mark_failed(self, slide_id: str, error: str, source: str | None = None) -> None:
        """Record a slide that could not be processed (its old content is dropped)."""
        self.begin_slide(SlideMeta(slide_id, source=source))
        self[slide_id]._update_meta(status=FAILED, error=error)

    def add_slide(self, slide_id: str, coords: np.ndarray, *, tiles: np.ndarray | None = None,
                  tile_codec: str = DEFAULT_TILE_CODEC, target_mpp: float = 0.5, slide_mpp: float | None = None,
                  patch_size: int | None = None, kind: str = TILED, source: str | None = None,
                  width: int | None = None, height: int | None = None, **meta: Any) -> SlideView:
        """Write a whole slide in one call and mark it complete: what imports, tests and benchmarks
        use instead of building groups by hand. `tiles` (N, P, P, 3) uint8 are optional. For a tiled
        slide, sizes not given are derived (slide µm/px = target, level-0 size = the coords' extent);
        a features-only slide (an import) records only what is given: unknowns stay None."""
        coords = np.asarray(coords, np.int32).reshape(-1, 2)
        if tiles is not None:
            tiles = np.asarray(tiles, np.uint8)
            if tiles.shape[0] != len(coords) or tiles.ndim != 4 or tiles.shape[3] != 3:
                raise ValueError(f"{slide_id}: tiles of shape {tiles.shape} do not match {len(coords)} coords")
            patch_size = patch_size or tiles.shape[1]
        derive = kind == TILED
        slide_mpp = slide_mpp or (target_mpp if derive else None)
        ps0 = meta.pop("tile_size_level0", None)
        if ps0 is None and patch_size and derive:
            ps0 = int(round(patch_size * target_mpp / slide_mpp)) if target_mpp else None
        if width is None and len(coords) and derive:
            width = int(coords[:, 0].max()) + int(ps0 or 0)
            height = int(coords[:, 1].max()) + int(ps0 or 0)
        m = SlideMeta(slide_id, kind=kind, source=source, target_mpp=target_mpp, slide_mpp=slide_mpp,
                      patch_size=patch_size, tile_size_level0=ps0, width=width, height=height,
                      tiles_stored=tiles is not None, **meta)
        view = self.begin_slide(m)
        view.write_arrays(coords, tile_codec=tile_codec if tiles is not None else None)
        if tiles is not None:
            view.write_tiles(0, tiles)
        view.mark_complete()
        return view
