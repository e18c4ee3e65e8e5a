"""`wsi`: tile slides into a store, inspect it, label its tiles, make synthetic cohorts.

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

from .cli_common import command_parser, format_table, run_command

log = logging.getLogger("wsi")


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
        keep = ("id", "status", "n_tiles", "mpp", "patch_size", "slide_mpp", "source", "features", "labels",
                "predictions")
        print(json.dumps({"store": str(a.store), "slides": [{k: s[k] for k in keep} | ({"error": s["error"]} if s["error"] else {})
                                                          for s in slides]}, indent=1))
        return 0
    rows = [("slide", "status", "tiles", "µm/px", "patch", "slide µm/px", "features", "source")]
    for s in slides:
        rows.append((s["id"], s["status"] or "?", str(s["n_tiles"]), str(s["mpp"] or "-"), str(s["patch_size"] or "-"),
                     f"{s['slide_mpp']:.3f}" if s["slide_mpp"] else "-", ",".join(s["features"]) or "-",
                     s["error"] or s["source"] or "-"))
    print(format_table(rows))
    n = sum(s["status"] == "complete" for s in slides)
    print(f"{len(slides)} slides, {n} complete, {sum(s['n_tiles'] for s in slides if s['status'] == 'complete')} tiles")
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import make_cohort

    # Options left out take make_cohort's own defaults, so they are written down in one place only.
    given = {k: v for k, v in (("width", a.width), ("height", a.height), ("mpp", a.slide_mpp),
                               ("tile_size", a.tile_size)) if v is not None}
    slides = make_cohort(a.out, n_slides=a.slides, seed=a.seed, positive_fraction=a.positive_fraction,
                         workers=a.workers, progress=not a.quiet, **given)
    for s in slides:
        print(f"{s.slide_id}\t{s.label}\t{s.width}x{s.height}\t{s.path}")
    print(f"{len(slides)} slides, labels in {Path(a.out) / 'labels.csv'}, annotations in {Path(a.out) / 'annotations'}")
    return 0


def _cmd_embed(a: argparse.Namespace) -> int:
    from .embed import EmbedConfig, embed_store, results_json
    from .encoders import EncoderError
    from .store import StoreError

    cfg = EmbedConfig(encoder=a.encoder, weights=a.weights, pretrained=not a.random_weights, batch_size=a.batch_size,
                      num_workers=a.num_workers, device=a.device, precision=a.precision, overwrite=a.overwrite)
    try:
        results = embed_store(a.store, cfg, a.slides, progress=not a.quiet and not a.no_progress)
    except (EncoderError, StoreError) as e:
        log.error("%s", e)
        return 2
    if a.json:
        print(json.dumps(results_json(results), indent=1))
    else:
        for r in results:
            rate = f"{r.n_tiles / r.seconds:.0f} tiles/s" if r.seconds else ""
            print(f"{r.slide_id}\t{r.status}\t{r.n_tiles}\t{rate}\t{r.error or ''}".rstrip())
        counts = {k: sum(r.status == k for r in results) for k in ("embedded", "skipped", "claimed", "failed")}
        print(", ".join(f"{v} {k}" for k, v in counts.items()) + f", of {len(results)} slides")
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_import_h5(a: argparse.Namespace) -> int:
    from .interop import import_h5

    try:
        results = import_h5(a.dir, a.store, a.encoder, mpp=a.mpp, overwrite=a.overwrite, progress=not a.quiet)
    except ValueError as e:
        log.error("%s", e)
        return 2
    for r in results:
        print(f"{r.slide_id}\t{r.status}\t{r.n}\t{r.error or ''}".rstrip())
    n = {k: sum(r.status == k for r in results) for k in ("imported", "skipped", "failed")}
    print(f"{n['imported']} imported, {n['skipped']} skipped, {n['failed']} failed, of {len(results)} files")
    return 1 if n["failed"] else 0


def _cmd_export_h5(a: argparse.Namespace) -> int:
    from .interop import export_h5
    from .store import StoreError

    try:
        results = export_h5(a.store, a.encoder, a.out, progress=not a.quiet)
    except (StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    ok = sum(r.status == "exported" for r in results)
    print(f"{ok} slides exported to {a.out / 'h5_files'} and {a.out / 'pt_files'}, "
          f"{len(results) - ok} failed")
    return 1 if ok < len(results) else 0


def _cmd_labels(a: argparse.Namespace) -> int:
    from .annotations import AnnotationError, label_store, results_json, results_table
    from .store import StoreError

    classes = [c.strip() for c in a.classes.split(",") if c.strip()] if a.classes else None
    try:
        results = label_store(a.store, a.annotations, name=a.name, classes=classes, missing=a.missing,
                              progress=not a.quiet and not a.no_progress)
    except (AnnotationError, StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(json.dumps(results_json(results), indent=1) if a.json else results_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_encoders(a: argparse.Namespace) -> int:
    from .encoders import list_encoders

    rows = [s.row() for s in list_encoders()]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "dim", "input", "precision", "gated", "license", "hub_id"]
    print(format_table([cols] + [[r[c] for c in cols] for r in rows]))
    print("also: timm:<arch>, hf-hub:<repo>, open_clip:<arch>[@<pretrained>], local:<dir>; "
          "--weights FILE.safetensors loads local weights into any of them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p, sub = command_parser("wsi", "Whole-slide images into a Zarr tile store.")

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

    e = sub.add_parser("embed", help="features for every tile of a store, with any encoder",
                       description="Write slides/<id>/features/<encoder>. Slides already embedded are skipped; "
                                   "under torchrun each rank takes its own slides.")
    e.add_argument("store")
    e.add_argument("--encoder", required=True, help="a name from `wsi encoders`, or timm:/hf-hub:/open_clip:/local:")
    e.add_argument("--weights", default=None, help="local .safetensors weights instead of the hub")
    e.add_argument("--random-weights", action="store_true", help="random weights (testing and benchmarks only)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader processes reading tiles (default: 0 on CPU, 4 on a GPU)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    e.add_argument("--slides", nargs="+", default=None, help="only these slide ids")
    e.add_argument("--overwrite", action="store_true", help="embed again even if features exist")
    e.add_argument("--json", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_embed)

    en = sub.add_parser("encoders", help="the encoder registry")
    en.add_argument("--json", action="store_true")
    en.set_defaults(func=_cmd_encoders)

    im = sub.add_parser("import-h5", help="CLAM or TRIDENT features (h5) into a store",
                        description="Reads CLAM (h5_files/) or TRIDENT (features_<enc>/) output, detected, into "
                                    "slides/<id>/coords and features/<encoder>.")
    im.add_argument("dir", type=Path)
    im.add_argument("--store", required=True)
    im.add_argument("--encoder", required=True, help="the name the features get in the store")
    im.add_argument("--mpp", type=_positive_float, default=None, help="target µm/px of the patches, if known")
    im.add_argument("--overwrite", action="store_true")
    im.set_defaults(func=_cmd_import_h5)

    ex = sub.add_parser("export-h5", help="a store's features as CLAM h5_files/ and pt_files/")
    ex.add_argument("store")
    ex.add_argument("--encoder", required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.set_defaults(func=_cmd_export_h5)

    lb = sub.add_parser("labels", help="per-tile labels from QuPath GeoJSON or ASAP XML annotations",
                        description="Write slides/<id>/labels/<name>: the fraction of each tile inside the "
                                    "annotated regions (positive if > 0.5). Files match slides by name "
                                    "(<slide_id>.geojson / .xml); slides without one are all negative.")
    lb.add_argument("store")
    lb.add_argument("--annotations", nargs="+", required=True, type=Path,
                    help="annotation files or folders of them (.geojson, .json, .xml)")
    lb.add_argument("--name", default="tumor", help="the label's name in the store (default tumor)")
    lb.add_argument("--classes", default=None,
                    help="comma-separated classes to use (default: all but exclusions, Ignore* and Region*)")
    lb.add_argument("--missing", choices=["negative", "skip"], default="negative",
                    help="slides without an annotation file: all negative (default) or left unlabelled")
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--no-progress", action="store_true")
    lb.set_defaults(func=_cmd_labels)

    s = sub.add_parser("synth", help="write a synthetic cohort with tumor annotations",
                       description="Pyramidal Aperio-like TIFFs textured with real H&E, labels.csv and GeoJSON "
                                   "tumor annotations (level-0 px) for every positive slide.")
    s.add_argument("out", type=Path)
    s.add_argument("--slides", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=None, help="level-0 width in px (default: make_cohort's)")
    s.add_argument("--height", type=int, default=None, help="level-0 height in px (default: make_cohort's)")
    s.add_argument("--slide-mpp", type=_positive_float, default=None, help="level-0 µm/px (default: make_cohort's, ≈ 40×)")
    s.add_argument("--tile-size", type=int, default=None, help="JPEG tile side in px (default: make_cohort's)")
    s.add_argument("--positive-fraction", type=float, default=0.5)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=_cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
