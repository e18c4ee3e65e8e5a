"""`wsi`: tile slides into a store, inspect it, label its tiles, make synthetic cohorts.

Every command is a thin layer over the Python API (`wsi.pipeline`, `wsi.store`, `wsi.synthetic`).
The options of `wsi tile` and `wsi embed` are made from their config dataclasses (TilingConfig,
TissueParams, EmbedConfig), so each default is written once. Heavy imports (torch, openslide, zarr)
are deferred to the command that needs them, so `wsi info` starts fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .cli_common import (add_config_options, command_parser, config_from_args, format_table, positive_float,
                         registry_help, run_command)

# EmbedConfig's field metadata gives the help texts; these are the options whose text differs from it:
# the flag that turns `pretrained` off, and the registry listing (made when the parser is built).
EMBED_HELP = {"pretrained": "random weights (testing and benchmarks only)"}
EMBED_NAMES = {"pretrained": "--random-weights"}


@contextmanager
def _user_errors():
    """A ValueError raised on the user's arguments (a name, a number) is a user error: one line, exit 2."""
    from .errors import PathmilError

    try:
        yield
    except PathmilError:
        raise
    except ValueError as e:
        raise PathmilError(str(e)) from e


def _cmd_tile(a: argparse.Namespace) -> int:
    from .cohort import resolve_sources
    from .pipeline import TilingConfig, results_json, results_table, tile_cohort
    from .tissue import TissueParams

    sources = resolve_sources(a.slides, a.slide_mpp)
    cfg = config_from_args(TilingConfig, a, tissue=config_from_args(TissueParams, a))
    results = tile_cohort(sources, a.store, cfg, workers=a.workers, overwrite=a.overwrite, viz_dir=a.viz,
                          progress=not a.quiet and not a.no_progress)
    if a.json:
        print(json.dumps(results_json(results), indent=1))
    else:
        print(results_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


INFO_JSON_KEYS = ("id", "status", "kind", "n_tiles", "mpp", "patch_size", "slide_mpp", "tile_codec", "source",
                  "features", "labels", "predictions")


def _cmd_info(a: argparse.Namespace) -> int:
    from .store import TileStore

    slides = TileStore.open(a.store, readonly=True).info()   # a damaged slide: status "damaged" and why
    if a.json:
        print(json.dumps({"store": str(a.store), "slides": [
            {k: s.get(k, [] if k in ("features", "labels", "predictions") else None) for k in INFO_JSON_KEYS}
            | ({"error": s["error"]} if s.get("error") else {}) for s in slides]}, indent=1))
        return 0
    rows = [("slide", "status", "kind", "tiles", "µm/px", "patch", "slide µm/px", "codec", "features", "source")]
    for s in slides:
        rows.append((s["id"], s["status"] or "?", s.get("kind") or "-", str(s["n_tiles"]), str(s.get("mpp") or "-"),
                     str(s.get("patch_size") or "-"), f"{s['slide_mpp']:.3f}" if s.get("slide_mpp") else "-",
                     s.get("tile_codec") or "-", ",".join(s.get("features") or []) or "-",
                     s.get("error") or s.get("source") or "-"))
    print(format_table(rows))
    n = sum(s["status"] == "complete" for s in slides)
    damaged = sum(s["status"] == "damaged" for s in slides)
    print(f"{len(slides)} slides, {n} complete, " + (f"{damaged} damaged (`wsi tile` redoes them), " if damaged else "")
          + f"{sum(s['n_tiles'] for s in slides if s['status'] == 'complete')} tiles")
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import make_cohort
    from .synthetic.difficulty import resolve

    # Options left out take make_cohort's own defaults, so they are written down in one place only.
    given = {k: v for k, v in (("width", a.width), ("height", a.height), ("mpp", a.slide_mpp),
                               ("tile_size", a.tile_size)) if v is not None}
    # Difficulty options left out take the preset's values (wsi.synthetic.difficulty: help and values in one place).
    options = {k: getattr(a, k) for k in a.synth_options if getattr(a, k) is not None}
    with _user_errors():
        resolve(a.preset, **options)  # an out-of-range value is the user's: one line, exit 2
    slides = make_cohort(a.out, n_slides=a.slides, seed=a.seed, positive_fraction=a.positive_fraction,
                         workers=a.workers, progress=not a.quiet, preset=a.preset, **options, **given)
    for s in slides:
        print(f"{s.slide_id}\t{s.label}\t{s.width}x{s.height}\t{s.path}")
    out = Path(a.out)
    print(f"{len(slides)} slides, labels in {out / 'labels.csv'}, annotations in {out / 'annotations'}"
          + (f" (inflammation and mimics: {out / 'annotations' / 'extra'})" if (out / "annotations" / "extra").is_dir()
             else "") + f", record in {out / 'synth.json'}")
    return 0


def _cmd_embed(a: argparse.Namespace) -> int:
    from .embed import EmbedConfig, embed_store, results_json

    cfg = config_from_args(EmbedConfig, a)
    results = embed_store(a.store, cfg, a.slides, progress=not a.quiet and not a.no_progress)
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

    with _user_errors():  # imports may start a new store, like `wsi tile`
        results = import_h5(a.dir, a.store, a.encoder, mpp=a.mpp, overwrite=a.overwrite, progress=not a.quiet)
    for r in results:
        print(f"{r.slide_id}\t{r.status}\t{r.n}\t{r.error or ''}".rstrip())
    n = {k: sum(r.status == k for r in results) for k in ("imported", "skipped", "failed")}
    print(f"{n['imported']} imported, {n['skipped']} skipped, {n['failed']} failed, of {len(results)} files")
    return 1 if n["failed"] else 0


def _cmd_export_h5(a: argparse.Namespace) -> int:
    from .interop import export_h5

    with _user_errors():
        results = export_h5(a.store, a.encoder, a.out, progress=not a.quiet)
    ok = sum(r.status == "exported" for r in results)
    print(f"{ok} slides exported to {a.out / 'h5_files'} and {a.out / 'pt_files'}, "
          f"{len(results) - ok} failed")
    return 1 if ok < len(results) else 0


def _cmd_labels(a: argparse.Namespace) -> int:
    from .annotations import label_store, results_json, results_table

    def names(opt: str | None) -> list[str] | None:
        listed = [c.strip() for c in (opt or "").split(",") if c.strip()]
        return listed or None

    with _user_errors():
        results = label_store(a.store, a.annotations, name=a.name, classes=names(a.classes),
                              exclude_classes=names(a.exclude_classes), missing=a.missing,
                              progress=not a.quiet and not a.no_progress)
    print(json.dumps(results_json(results), indent=1) if a.json else results_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_encoders(a: argparse.Namespace) -> int:
    from .encoders import list_encoders

    rows = [s.row() for s in list_encoders()]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "task", "dim", "input", "precision", "gated", "license", "hub_id"]
    print(format_table([cols] + [[r[c] for c in cols] for r in rows]))
    print("also: timm:<arch>, hf-hub:<repo>, open_clip:<arch>[@<pretrained>], local:<dir>; "
          "--weights FILE.safetensors loads local weights into any of them")
    return 0


def _encoder_names() -> str:
    """The registry's names, for help texts. A broken encoder module must not break every command
    (`wsi info`, `wsi tile`): its error then shows here and again when `wsi embed` builds an encoder."""
    try:
        from .encoders import list_encoders

        return ", ".join(spec.name for spec in list_encoders())
    except Exception as e:  # noqa: BLE001 - any import error of a family module
        return f"the registered names (the registry failed to load: {type(e).__name__}: {e})"


def build_parser() -> argparse.ArgumentParser:
    from .embed import EmbedConfig
    from .pipeline import TilingConfig
    from .runtime import PRECISIONS
    from .store import parse_tile_codec
    from .tissue import TissueParams

    p, sub = command_parser("wsi", "Whole-slide images into a Zarr tile store.")

    t = sub.add_parser("tile", help="segment tissue and tile slides into a store",
                       description="Tile slides at a physical resolution into a Zarr tile store. Complete "
                                   "slides are skipped on a re-run; failed ones are reported and retried.")
    t.add_argument("slides", nargs="+", help="slide files, folders of slides, or a cohort CSV (path[,slide_id][,mpp])")
    t.add_argument("--store", required=True, help="the tile store (a .zarr folder; created if missing)")
    add_config_options(t, TilingConfig, names={"target_mpp": "--mpp", "save_tiles": "--no-tiles"},
                       types={"target_mpp": positive_float, "tile_codec": parse_tile_codec})
    add_config_options(t, TissueParams, only=("min_area_um2", "max_hole_um2"))
    t.add_argument("--slide-mpp", type=positive_float, default=None,
                   help="level-0 µm/px of slides whose metadata has none (a CSV 'mpp' column wins)")
    t.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tile-reading processes")
    t.add_argument("--overwrite", action="store_true", help="redo slides that are already complete")
    t.add_argument("--viz", type=Path, default=None, help="write a PNG overview per slide into this folder")
    t.add_argument("--json", action="store_true", help="print per-slide results as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_tile)

    i = sub.add_parser("info", help="what a store holds")
    i.add_argument("store", help="an existing tile store")
    i.add_argument("--json", action="store_true", help="print the slides as JSON")
    i.set_defaults(func=_cmd_info)

    e = sub.add_parser("embed", help="features for every tile of a store, with any encoder",
                       formatter_class=registry_help(encoders=_encoder_names),
                       description="Write slides/<id>/features/<encoder>. Slides already embedded are skipped; "
                                   "under torchrun each rank takes its own slides.")
    e.add_argument("store", help="an existing tile store (made by `wsi tile`)")
    add_config_options(e, EmbedConfig, names=EMBED_NAMES, choices={"precision": PRECISIONS},
                       help={**EMBED_HELP, "encoder": "one of {encoders} (see `wsi encoders`), or "
                             "timm:<arch>, hf-hub:<repo>, open_clip:<arch>[@<pretrained>], local:<dir>"})
    e.add_argument("--slides", nargs="+", default=None, help="only these slide ids")
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
    im.add_argument("--store", required=True, help="the tile store (a .zarr folder; created if missing)")
    im.add_argument("--encoder", required=True, help="the name the features get in the store")
    im.add_argument("--mpp", type=positive_float, default=None, help="target µm/px of the patches, if known")
    im.add_argument("--overwrite", action="store_true")
    im.set_defaults(func=_cmd_import_h5)

    ex = sub.add_parser("export-h5", help="a store's features as CLAM h5_files/ and pt_files/")
    ex.add_argument("store", help="an existing tile store")
    ex.add_argument("--encoder", required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.set_defaults(func=_cmd_export_h5)

    lb = sub.add_parser("labels", help="per-tile labels from QuPath GeoJSON or ASAP XML annotations",
                        description="Write slides/<id>/labels/<name>: the fraction of each tile inside the "
                                    "annotated regions (positive if > 0.5). Files match slides by name "
                                    "(<slide_id>.geojson / .xml); slides without one are all negative.")
    lb.add_argument("store", help="an existing tile store")
    lb.add_argument("--annotations", nargs="+", required=True, type=Path,
                    help="annotation files or folders of them (.geojson, .json, .xml)")
    lb.add_argument("--name", default="tumor", help="the label's name in the store (default tumor)")
    lb.add_argument("--classes", default=None,
                    help="comma-separated classes to use (default: all but exclusions and QuPath's Ignore* and "
                         "Region*); a base class also picks its derived ones: Tumor picks 'Tumor: Positive'")
    lb.add_argument("--exclude-classes", default=None,
                    help="comma-separated classes subtracted from the regions like holes (e.g. "
                         "negative,background,artifact); _2 and Exclusion always are")
    lb.add_argument("--missing", choices=["negative", "skip"], default="negative",
                    help="slides without an annotation file: all negative (default) or left unlabelled")
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--no-progress", action="store_true")
    lb.set_defaults(func=_cmd_labels)

    s = sub.add_parser("synth", help="write a synthetic cohort with tumor annotations",
                       description="Pyramidal Aperio-like TIFFs textured with real H&E, labels.csv and GeoJSON "
                                   "tumor annotations (level-0 px) for every positive slide. --preset hard (or "
                                   "the options below) adds tumour grades, benign mimics, margin inflammation, "
                                   "small tumour fractions and clusters, stain, blur and JPEG variation; the "
                                   "non-tumour regions go to annotations/extra/ (not read by `wsi labels "
                                   "--annotations OUT/annotations`), what each slide got to synth.json.")
    s.add_argument("out", type=Path)
    s.add_argument("--slides", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=None, help="level-0 width in px (default: make_cohort's)")
    s.add_argument("--height", type=int, default=None, help="level-0 height in px (default: make_cohort's)")
    s.add_argument("--slide-mpp", type=positive_float, default=None, help="level-0 µm/px (default: make_cohort's, ≈ 40×)")
    s.add_argument("--tile-size", type=int, default=None, help="JPEG tile side in px (default: make_cohort's)")
    s.add_argument("--positive-fraction", type=float, default=0.5)
    s.add_argument("--workers", type=int, default=1)
    from .synthetic.difficulty import add_cli_options

    g = s.add_argument_group("difficulty (defaults: the preset's values)")
    s.set_defaults(func=_cmd_synth, synth_options=add_cli_options(g))
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
