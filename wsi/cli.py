"""`wsi`: tile slides into a store, inspect it, make synthetic cohorts.

Every command is a thin layer over the Python API (`wsi.pipeline`, `wsi.store`, `wsi.synthetic`).
Imports are deferred to the command that needs them, so `wsi info` and `wsi tile --no-tiles`
start fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("wsi")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return v


def _cmd_tile(a: argparse.Namespace) -> int:
    from .cohort import CohortError, resolve_sources
    from .pipeline import TilingConfig, results_json, results_table, tile_cohort
    from .tissue import TissueParams

    try:
        sources = resolve_sources(a.slides, a.slide_mpp)
    except CohortError as e:
        log.error("%s", e)
        return 2
    cfg = TilingConfig(target_mpp=a.mpp, patch_size=a.patch_size, overlap=a.overlap, min_tissue=a.min_tissue,
                       save_tiles=not a.no_tiles, fast_read=not a.no_fast_read,
                       tissue=TissueParams(min_area_um2=a.min_area_um2, max_hole_um2=a.max_hole_um2))
    from .store import StoreError

    try:
        results = tile_cohort(sources, a.store, cfg, workers=a.workers, overwrite=a.overwrite, viz_dir=a.viz,
                              progress=not a.quiet and not a.no_progress)
    except StoreError as e:
        log.error("%s", e)
        return 2
    if a.json:
        print(json.dumps(results_json(results), indent=1))
    else:
        print(results_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .store import StoreError, TileStore

    try:
        store = TileStore(a.store, mode="r")
    except StoreError as e:
        log.error("%s", e)
        return 2
    slides = store.info()
    if a.json:
        keep = ("id", "status", "n_tiles", "mpp", "patch_size", "slide_mpp", "source", "features")
        print(json.dumps({"store": str(a.store), "slides": [{k: s[k] for k in keep} | ({"error": s["error"]} if s["error"] else {})
                                                          for s in slides]}, indent=1))
        return 0
    rows = [("slide", "status", "tiles", "µm/px", "patch", "slide µm/px", "features", "source")]
    for s in slides:
        rows.append((s["id"], s["status"] or "?", str(s["n_tiles"]), str(s["mpp"] or "-"), str(s["patch_size"] or "-"),
                     f"{s['slide_mpp']:.3f}" if s["slide_mpp"] else "-", ",".join(s["features"]) or "-",
                     s["error"] or s["source"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    n = sum(s["status"] == "complete" for s in slides)
    print(f"{len(slides)} slides, {n} complete, {sum(s['n_tiles'] for s in slides if s['status'] == 'complete')} tiles")
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import make_cohort

    slides = make_cohort(a.out, n_slides=a.slides, seed=a.seed, width=a.width, height=a.height, mpp=a.slide_mpp,
                         tile_size=a.tile_size, positive_fraction=a.positive_fraction, workers=a.workers,
                         progress=not a.quiet)
    for s in slides:
        print(f"{s.slide_id}\t{s.label}\t{s.width}x{s.height}\t{s.path}")
    print(f"{len(slides)} slides, labels in {Path(a.out) / 'labels.csv'}, annotations in {Path(a.out) / 'annotations'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi", description="Whole-slide images into a Zarr tile store.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tile", help="segment tissue and tile slides into a store",
                       description="Tile slides at a physical resolution into a Zarr tile store. Complete "
                                   "slides are skipped on a re-run; failed ones are reported and retried.")
    t.add_argument("slides", nargs="+", help="slide files, folders of slides, or a cohort CSV (path[,slide_id][,mpp])")
    t.add_argument("--store", required=True, help="the tile store (a .zarr folder; created if missing)")
    t.add_argument("--mpp", type=_positive_float, default=0.5, help="target resolution in µm/px (default 0.5 ≈ 20×)")
    t.add_argument("--patch-size", type=int, default=256, help="tile side in px at the target resolution (default 256)")
    t.add_argument("--overlap", type=int, default=0, help="overlap between tiles in px at the target resolution")
    t.add_argument("--min-tissue", type=float, default=0.25, help="keep tiles with at least this tissue fraction")
    t.add_argument("--slide-mpp", type=_positive_float, default=None,
                   help="level-0 µm/px of slides whose metadata has none (a CSV 'mpp' column wins)")
    t.add_argument("--min-area-um2", type=float, default=20_000.0, help="drop tissue pieces smaller than this")
    t.add_argument("--max-hole-um2", type=float, default=20_000.0, help="fill holes in tissue smaller than this")
    t.add_argument("--no-tiles", action="store_true", help="store coordinates only, not tile pixels")
    t.add_argument("--no-fast-read", action="store_true", help="always read through openslide (no direct JPEG tile decoding)")
    t.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tile-reading processes")
    t.add_argument("--overwrite", action="store_true", help="redo slides that are already complete")
    t.add_argument("--viz", type=Path, default=None, help="write a PNG overview per slide into this folder")
    t.add_argument("--json", action="store_true", help="print per-slide results as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_tile)

    i = sub.add_parser("info", help="what a store holds")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    s = sub.add_parser("synth", help="write a synthetic cohort with tumor annotations",
                       description="Pyramidal Aperio-like TIFFs textured with real H&E, labels.csv and GeoJSON "
                                   "tumor annotations (level-0 px) for every positive slide.")
    s.add_argument("out", type=Path)
    s.add_argument("--slides", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=16384)
    s.add_argument("--height", type=int, default=12288)
    s.add_argument("--slide-mpp", type=_positive_float, default=0.25, help="level-0 µm/px (default 0.25 ≈ 40×)")
    s.add_argument("--tile-size", type=int, default=256)
    s.add_argument("--positive-fraction", type=float, default=0.5)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=_cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        return args.func(args)
    with logging_redirect_tqdm():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
