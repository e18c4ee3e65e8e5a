"""`wsi tile` as a Python API: slides in, a tile store out, one bad slide never stopping a cohort.

Per slide: open -> segment tissue -> plan the grid -> write coords and tissue -> fill `tiles` chunk by
chunk (in worker processes, each with its own slide handle, writing straight to the store) -> mark
complete. Re-running skips complete slides and redoes the rest; `overwrite` redoes everything.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cohort import SlideSource
from .errors import PathmilError, SlideError, StoreError
from .slide import open_slide
from .store import COMPLETE, DEFAULT_TILE_CODEC, TILE_CHUNK, SlideMeta, TileStore, file_fingerprint, parse_tile_codec
from .tiling import TileGeometry, TileReader, plan_tiles, tile_geometry
from .tissue import TissueParams, segment_tissue

log = logging.getLogger(__name__)


def _doc(help: str, off_help: str | None = None) -> dict:
    """Field metadata: the help text of its `wsi tile` option (see wsi.cli_common.add_config_options)."""
    return {"help": help, **({"off_help": off_help} if off_help else {})}


@dataclass(frozen=True)
class TilingConfig:
    """How `wsi tile` tiles a slide; the command's options are made from these fields."""

    target_mpp: float = field(default=0.5, metadata=_doc("target resolution in µm/px (0.5 ≈ 20×)"))
    patch_size: int = field(default=256, metadata=_doc("tile side in px at the target resolution"))
    overlap: int = field(default=0, metadata=_doc("overlap between tiles in px at the target resolution"))
    min_tissue: float = field(default=0.25, metadata=_doc("keep tiles with at least this tissue fraction"))
    save_tiles: bool = field(default=True, metadata=_doc(
        "store tile pixels", "store coordinates only, not tile pixels (tiles are then read through the slide file)"))
    fast_read: bool = field(default=True, metadata=_doc(
        "decode tiled JPEG levels directly where the geometry allows",
        "always read through openslide (no direct JPEG tile decoding)"))
    tile_codec: str = field(default=DEFAULT_TILE_CODEC, metadata=_doc(
        "how stored tiles are compressed: jpeg, jpeg-QUALITY (1-100) or lossless (zstd, ~1.2x)"))
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self):
        object.__setattr__(self, "tile_codec", parse_tile_codec(self.tile_codec))

    def settings(self) -> dict:
        """The settings that define a store's tiles (SlideMeta fields); a complete slide tiled otherwise
        is not reused."""
        return {"target_mpp": self.target_mpp, "patch_size": self.patch_size, "overlap": self.overlap,
                "min_tissue": self.min_tissue, "tiles_stored": self.save_tiles,
                "tile_codec": self.tile_codec if self.save_tiles else None}


@dataclass
class SlideResult:
    slide_id: str
    source: str
    status: str                 # complete | skipped | failed
    n_tiles: int = 0
    seconds: float = 0.0
    error: str | None = None
    method: str | None = None   # how pixels were read: jpeg-direct | openslide | coords-only
    tissue_fraction: float | None = None
    slide_mpp: float | None = None


# ---- worker side: one slide handle and one slide view per process, reused across chunks -----------
_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def _worker_state(key: tuple):
    if key not in _CACHE:
        path, mpp, geom, fast, store_path, slide_id = key
        slide = open_slide(path, mpp)
        _CACHE[key] = (slide, TileReader(slide, geom, fast), TileStore.open(store_path)[slide_id])
        while len(_CACHE) > 2:  # the previous slide's handles, kept only while its last chunks finish
            _, (s, r, _v) = _CACHE.popitem(last=False)
            r.close()
            s.close()
    return _CACHE[key]


def _fill_chunk(task: tuple) -> int:
    """Read the tiles of one store chunk and write them; returns how many."""
    key, start, coords = task
    _, reader, view = _worker_state(key)
    view.write_tiles(start, reader.read_many(coords))
    return len(coords)


def make_pool(workers: int):
    """Worker processes for `fill_tiles`."""
    import multiprocessing as mp

    # spawn, not fork: zarr runs an event-loop thread and openslide holds native state, neither
    # of which survives a fork.
    return mp.get_context("spawn").Pool(workers)


# ---- driver side -----------------------------------------------------------------------------------
def fill_tiles(store: TileStore, src: SlideSource, slide, geom: TileGeometry, coords: np.ndarray, pool=None,
               fast: bool = True, progress: bool = True) -> str:
    """Read every tile at `coords` into the slide's `tiles` array, chunk by chunk; returns the read method.

    With a pool, worker processes read and write whole chunks (no two touch one chunk); without,
    it runs here on the already-open `slide`.
    """
    from tqdm.auto import tqdm

    reader = TileReader(slide, geom, fast)
    key = (str(src.path), src.mpp, geom, fast, str(store.path), src.slide_id)
    tasks = [(key, s, coords[s:s + TILE_CHUNK]) for s in range(0, len(coords), TILE_CHUNK)]
    with tqdm(total=len(coords), desc=src.slide_id, unit="tile", disable=not progress, leave=False) as bar:
        if pool is None:
            _CACHE.clear()
            _CACHE[key] = (slide, reader, store[src.slide_id])
            try:
                for t in tasks:
                    bar.update(_fill_chunk(t))
            finally:
                _CACHE.clear()
        else:
            for n in pool.imap_unordered(_fill_chunk, tasks, chunksize=1):
                bar.update(n)
    reader.close()
    return reader.method


def _needs_work(store: TileStore, src: SlideSource, cfg: TilingConfig, overwrite: bool) -> tuple[bool, str]:
    try:
        status = store.status(src.slide_id)
    except StoreError as e:  # damaged: reported, then redone
        log.warning("%s; tiling it again", e)
        return True, ""
    if overwrite or status != COMPLETE:
        return True, ""
    meta = store[src.slide_id].meta
    differs = {k: (getattr(meta, k), v) for k, v in cfg.settings().items() if getattr(meta, k) != v}
    if differs:
        what = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in differs.items())
        return False, f"complete with other settings: {what}; pass --overwrite to redo it"
    try:
        if meta.fingerprint != file_fingerprint(src.path):
            log.warning("%s: source file changed since it was tiled; tiling it again", src.path)
            return True, ""
    except OSError:
        pass  # source moved away: the stored tiles are still good
    return False, "already complete"


def tile_slide(store: TileStore, src: SlideSource, cfg: TilingConfig, pool=None, viz_dir: Path | None = None,
               progress: bool = True) -> SlideResult:
    """Tile one slide into `store`. Raises SlideError (naming the file) when the slide cannot be used."""
    t0 = time.perf_counter()
    with open_slide(src.path, src.mpp) as slide:
        geom = tile_geometry(slide, cfg.target_mpp, cfg.patch_size, cfg.overlap)
        tissue = segment_tissue(slide, cfg.tissue)
        if tissue.fraction == 0:
            raise SlideError(f"{src.path}: no tissue found (saturation threshold {tissue.threshold}); "
                             "is it blank, or a fluorescence image? Check its thumbnail")
        coords, frac = plan_tiles(slide, tissue, geom, cfg.min_tissue)
        if len(coords) == 0:
            raise SlideError(f"{src.path}: tissue found ({tissue.fraction:.1%} of the slide) but no "
                             f"{cfg.patch_size}px tile at {cfg.target_mpp} µm/px has >= {cfg.min_tissue:.0%} "
                             "tissue; lower --min-tissue or --patch-size")
        W, H = slide.dimensions
        settings = {**cfg.settings(), "tiles_stored": False, "tile_codec": None}  # set when tiles are made
        meta = SlideMeta(src.slide_id, source=str(Path(src.path).resolve()), fingerprint=file_fingerprint(src.path),
                         slide_mpp=slide.mpp, tile_size_level0=geom.patch_size_level0, width=W, height=H,
                         **settings,
                         provenance={"slide_mpp_source": "metadata" if src.mpp is None else "given",
                                     "vendor": slide.vendor, "read_level": geom.level, "read_size": geom.read_size,
                                     "tissue_params": cfg.tissue.to_dict()})
        view = store.begin_slide(meta)
        view.write_arrays(coords, tissue=tissue.mask,
                          tissue_attrs={"downsample": list(tissue.downsample), "mpp": tissue.mpp,
                                        "threshold": tissue.threshold},
                          tissue_fraction=frac, tile_codec=cfg.tile_codec if cfg.save_tiles else None)
        method = fill_tiles(store, src, slide, geom, coords, pool, cfg.fast_read, progress) \
            if cfg.save_tiles else "coords-only"
        seconds = time.perf_counter() - t0
        view.mark_complete(provenance={**view.meta.provenance, "seconds": round(seconds, 3), "read_method": method})
        if viz_dir is not None:
            from .viz import tiling_overview

            tiling_overview(slide, tissue, coords, geom.patch_size_level0, Path(viz_dir) / f"{src.slide_id}.png",
                            title=f"{src.slide_id}: {len(coords)} tiles at {cfg.target_mpp} um/px")
    return SlideResult(src.slide_id, str(src.path), "complete", len(coords), seconds, None, method,
                       tissue.fraction, slide.mpp)


def tile_cohort(sources: list[SlideSource], store_path: str | Path, cfg: TilingConfig = TilingConfig(),
                workers: int = 1, overwrite: bool = False, viz_dir: str | Path | None = None,
                progress: bool = True) -> list[SlideResult]:
    """Tile every slide into the store at `store_path`; failures are recorded and skipped."""
    from tqdm.auto import tqdm

    store = TileStore.create(store_path)
    results: list[SlideResult] = []
    pool = make_pool(workers) if workers > 1 and cfg.save_tiles else None
    try:
        for src in tqdm(sources, desc="slides", unit="slide", disable=not progress or len(sources) < 2):
            todo, why = _needs_work(store, src, cfg, overwrite)
            if not todo:
                (log.warning if "other settings" in why else log.info)("%s: skipped, %s", src.slide_id, why)
                view = store[src.slide_id]
                results.append(SlideResult(src.slide_id, str(src.path), "skipped", view.n_tiles,
                                           error=None if why == "already complete" else why,
                                           slide_mpp=view.meta.slide_mpp))
                continue
            try:
                res = tile_slide(store, src, cfg, pool, Path(viz_dir) if viz_dir else None, progress)
                log.info("%s: %d tiles in %.1f s (%s)", src.slide_id, res.n_tiles, res.seconds, res.method)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one bad slide never stops a cohort
                msg = str(e) if isinstance(e, PathmilError) else f"{src.path}: {type(e).__name__}: {e}"
                log.error("%s: failed: %s", src.slide_id, msg)
                store.mark_failed(src.slide_id, msg, source=str(src.path))
                res = SlideResult(src.slide_id, str(src.path), "failed", error=msg)
            results.append(res)
    finally:
        if pool is not None:
            pool.terminate()
    return results


def results_table(results: list[SlideResult]) -> str:
    """A plain-text table of per-slide outcomes, and a closing count."""
    rows = [("slide", "status", "tiles", "slide µm/px", "tissue", "seconds", "read", "note")]
    for r in results:
        rows.append((r.slide_id, r.status, str(r.n_tiles), f"{r.slide_mpp:.3f}" if r.slide_mpp else "-",
                     f"{r.tissue_fraction:.0%}" if r.tissue_fraction is not None else "-",
                     f"{r.seconds:.1f}" if r.seconds else "-", r.method or "-", (r.error or "")[:90]))
    from .cli_common import format_table

    lines = [format_table(rows)]
    n_ok = sum(r.status == "complete" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    n_fail = sum(r.status == "failed" for r in results)
    lines.append(f"{n_ok} tiled, {n_skip} skipped (already complete), {n_fail} failed, of {len(results)} slides")
    return "\n".join(lines)


def results_json(results: list[SlideResult]) -> list[dict]:
    return [asdict(r) for r in results]
