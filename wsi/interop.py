"""Features between the tile store and the CLAM / TRIDENT ecosystem, both directions.

`import_h5` makes each slide of a CLAM or TRIDENT feature folder (layouts: `wsi.h5`) a
features-only slide of the store, its SlideMeta taken from the files' coords attributes.
`export_h5` writes CLAM's layout (h5_files/ + pt_files/), with coords attributes both CLAM-style
readers (patch_size x downsample x custom_downsample at patch_level) and TRIDENT's reader
(patch_size, level0_magnification, target_magnification) understand.

h5 files are only read as data (h5py, no pickles); .pt files are only written, never loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .h5 import (CLAM, H5Error, clam_patch_attrs, positive_number, read_features, read_header, require_h5py,
                 resolve_folder)
from .runtime import atomic_write
from .store import COMPLETE, FEATURES_ONLY, SlideMeta, SlideView, StoreError, TileStore, validate_slide_id

log = logging.getLogger(__name__)


@dataclass
class ImportResult:
    slide_id: str
    status: str                     # imported | skipped | failed
    n: int = 0                      # tiles (rows of features)
    error: str | None = None
    path: str | None = None         # the h5 file


@dataclass
class ExportResult:
    slide_id: str
    status: str                     # exported | failed
    n: int = 0
    error: str | None = None
    path: str | None = None         # the written h5 file


class ImportFileError(H5Error):
    """One h5 file cannot be imported into this store; the message says why."""


# ---- import ---------------------------------------------------------------------------------------------
_KEPT_H5_ATTRS = ("patch_level", "downsample", "custom_downsample", "target_magnification", "level0_magnification")


def slide_fields(a: dict[str, Any], mpp: float | None) -> dict[str, Any]:
    """SlideMeta fields of an imported slide from its coords attributes `a` (unknowns are None);
    `mpp` given by the user wins over anything the file says."""
    num = positive_number
    patch_size = num(a.get("patch_size"))
    ps0 = num(a.get("patch_size_level0"))
    tmag, l0mag = num(a.get("target_magnification")), num(a.get("level0_magnification"))
    if ps0 is None and patch_size is not None:
        if tmag and l0mag:                                      # TRIDENT
            ps0 = patch_size * l0mag / tmag
        else:                                                   # CLAM: patch_size px at patch_level
            ds = num(a.get("downsample")) if "downsample" in a else (1.0 if a.get("patch_level") == 0 else None)
            if ds is not None:
                ps0 = patch_size * ds * (num(a.get("custom_downsample")) or 1.0)
    approx = False
    if mpp is None:
        if num(a.get("mpp")) is not None:                      # written by export_h5
            mpp, approx = num(a.get("mpp")), bool(a.get("mpp_approximate"))
        elif tmag:
            mpp, approx = 10.0 / tmag, True                     # TRIDENT: mpp = 10 / magnification
    ov = a.get("overlap")
    w, h = num(a.get("level0_width")), num(a.get("level0_height"))
    return {"patch_size": None if patch_size is None else int(round(patch_size)),
            "tile_size_level0": None if ps0 is None else int(round(ps0)),
            "target_mpp": None if mpp is None else float(mpp), "mpp_approximate": approx,
            "slide_mpp": num(a.get("slide_mpp")),
            "overlap": int(ov) if isinstance(ov, (int, float)) and not isinstance(ov, bool) else 0,
            "width": int(w) if w and h else None, "height": int(h) if w and h else None}


def _check_same_tiles(view: SlideView, coords: np.ndarray, ps0: int | None) -> None:
    """An import into a complete slide must describe the same tiles (else the features belong elsewhere)."""
    have = view.coords
    if have.shape != coords.shape or not np.array_equal(have, coords):
        if have.shape != coords.shape:
            how = f"{len(have)} tiles in the store, {len(coords)} in the file"
        else:
            i = int(np.flatnonzero(np.any(have != coords, axis=1))[0])
            how = f"first at row {i}: {have[i].tolist()} in the store, {coords[i].tolist()} in the file"
        raise ImportFileError(f"coords differ from slide {view.slide_id!r} already in the store ({how}); these "
                              "features belong to other tiles: import them into a new store")
    stored = view.meta.tile_size_level0
    if stored and ps0 and abs(stored - ps0) > 1:
        raise ImportFileError(f"same coords but patch size at level 0 {ps0} px, the store's slide has "
                              f"{stored} px: import them into a new store")


def _import_one(store: TileStore, path: Path, layout: str, encoder: str, patches_dir: Path | None,
                h5_encoder: str | None, mpp: float | None, overwrite: bool) -> ImportResult:
    sid = path.stem
    try:
        validate_slide_id(sid)
    except ValueError as e:
        raise ImportFileError(str(e)) from None
    if Path(f"{path}.lock").exists():
        raise ImportFileError("locked: TRIDENT is still writing it (a .lock file sits next to it)")
    head = read_header(path)
    a = {**clam_patch_attrs(patches_dir, sid), **head.coords_attrs} if layout == CLAM else head.coords_attrs
    fields = slide_fields(a, mpp)

    view = store[sid] if store.status(sid) == COMPLETE else None
    if view is not None:
        _check_same_tiles(view, head.coords, fields["tile_size_level0"])
        if view.has_features(encoder) and not overwrite:
            return ImportResult(sid, "skipped", head.n, None, str(path))

    feats = read_features(path, head)   # before any write: a file that fails here leaves the store as it was
    source = str(path.resolve())
    if view is None:
        provenance = {"imported_from": layout, "h5_coords_attrs": {k: a[k] for k in _KEPT_H5_ATTRS if k in a}}
        view = store.add_slide(sid, head.coords, kind=FEATURES_ONLY, source=source, provenance=provenance, **fields)
    fattrs: dict[str, Any] = {"imported_from": layout, "source": source, "dim": head.dim, "h5_dtype": str(head.dtype)}
    orig = h5_encoder or head.feature_attrs.get("encoder")
    if orig:
        fattrs["original_encoder"] = str(orig)
    view.write_features(encoder, feats.astype(np.float16) if head.dtype == np.float16 else feats, fattrs)  # half kept
    return ImportResult(sid, "imported", head.n, None, str(path))


def import_h5(root: str | Path, store_path: str | Path, encoder: str, *, mpp: float | None = None,
              overwrite: bool = False, progress: bool = True) -> list[ImportResult]:
    """Import a CLAM or TRIDENT feature folder into the tile store as `features/<encoder>` of each
    slide. The store is made when the path is new (an import is how a features-only store is made);
    a path holding anything but a tile store raises StoreError. One bad file never stops the rest: it
    comes back "failed" with the reason (and is logged). Slides whose features are complete are skipped
    unless `overwrite`."""
    from tqdm.auto import tqdm

    folder = resolve_folder(root, encoder)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    files = sorted(p for p in folder.h5_dir.iterdir() if p.suffix == ".h5" and p.is_file())
    if not files:
        log.warning("%s: no .h5 files to import", folder.h5_dir)
        return []
    pt_dir = folder.h5_dir.parent / "pt_files" if folder.layout == CLAM else None
    store = TileStore.create(store_path)   # StoreError for a path that holds something else
    log.info("importing %d %s feature files from %s into %s as %r", len(files), folder.layout, folder.h5_dir,
             store_path, encoder)
    results: list[ImportResult] = []
    for path in tqdm(files, desc=f"import {folder.layout}", unit="slide", disable=not progress):
        if pt_dir is not None and pt_dir.is_dir() and not (pt_dir / f"{path.stem}.pt").exists():
            log.warning("%s: no pt_files/%s.pt next to it; CLAM writes that after the h5 is complete, "
                        "so this h5 may be partial", path.name, path.stem)
        try:
            r = _import_one(store, path, folder.layout, encoder, folder.patches_dir, folder.encoder, mpp, overwrite)
        except (KeyboardInterrupt, SystemExit):
            raise
        except (H5Error, StoreError, ValueError, OSError) as e:
            r = ImportResult(path.stem, "failed", 0, f"{path.name}: {e}", str(path))
        except Exception as e:  # anything else a damaged file can raise: still only this slide
            r = ImportResult(path.stem, "failed", 0, f"{path.name}: {type(e).__name__}: {e}", str(path))
        if r.status == "failed":
            log.error("import failed: %s", r.error)
        elif r.status == "skipped":
            log.info("%s: features %r already complete, skipped (pass overwrite to redo)", r.slide_id, encoder)
        results.append(r)
    counts = {k: sum(r.status == k for r in results) for k in ("imported", "skipped", "failed")}
    log.info("%d imported, %d skipped, %d failed, of %d files", counts["imported"], counts["skipped"],
             counts["failed"], len(results))
    return results


# ---- export ---------------------------------------------------------------------------------------------
def export_coords_attrs(m: SlideMeta) -> dict[str, Any]:
    """coords attributes for CLAM-style and TRIDENT readers (h5 cannot hold None: unknowns are left out)."""
    ps, ps0, mpp, slide_mpp = m.patch_size, m.tile_size_level0, m.target_mpp, m.slide_mpp
    out: dict[str, Any] = {"name": m.slide_id, "patch_level": 0, "downsample": np.array([1.0, 1.0])}
    if ps:
        out["patch_size"] = int(ps)
    if ps0:
        out["patch_size_level0"] = int(ps0)
    # level-0 px per patch px: CLAM / Fishing-Rod readers take patch_size x downsample x custom_downsample
    ratio = mpp / slide_mpp if (mpp and slide_mpp) else (ps0 / ps if (ps and ps0) else None)
    if ratio:
        out["custom_downsample"] = float(ratio)
    if mpp:
        out["mpp"] = float(mpp)
        if m.mpp_approximate:
            out["mpp_approximate"] = True
        out["target_magnification"] = 10.0 / mpp              # TRIDENT's convention: mpp = 10 / mag
        if ratio:
            out["level0_magnification"] = 10.0 / mpp * ratio
    if slide_mpp:
        out["slide_mpp"] = float(slide_mpp)
    out["overlap"] = int(m.overlap or 0)
    if m.width and m.height:
        out["level0_width"], out["level0_height"] = int(m.width), int(m.height)
    return out


def _export_one(view: SlideView, encoder: str, out: Path, h5py) -> int:
    import torch

    feats = np.ascontiguousarray(view.features(encoder), dtype=np.float32)
    coords = np.asarray(view.coords, np.int64)
    cattrs = export_coords_attrs(view.meta)
    fattrs = {"encoder": encoder, "name": view.slide_id}
    orig = view.feature_meta(encoder).get("original_encoder")
    if orig:
        fattrs["original_encoder"] = str(orig)

    def write_h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            fd = f.create_dataset("features", data=feats)
            for k, v in fattrs.items():
                fd.attrs[k] = v
            cd = f.create_dataset("coords", data=coords)
            for k, v in cattrs.items():
                cd.attrs[k] = v

    atomic_write(out / "h5_files" / f"{view.slide_id}.h5", write_h5)
    atomic_write(out / "pt_files" / f"{view.slide_id}.pt", lambda tmp: torch.save(torch.from_numpy(feats), tmp))
    return int(feats.shape[0])


def export_h5(store_path: str | Path, encoder: str, out: str | Path, *, progress: bool = True) -> list[ExportResult]:
    """Write CLAM's feature layout for every complete slide with complete `encoder` features:
    out/h5_files/<slide>.h5 (features float32 N×D, coords int64 N×2 with patching attributes) and
    out/pt_files/<slide>.pt (a float32 tensor N×D, as CLAM's extract_features_fp.py saves)."""
    from tqdm.auto import tqdm

    h5py = require_h5py()
    store = TileStore.open(store_path, readonly=True)
    out = Path(out)
    complete = store.complete_ids()
    todo = [s for s in complete if store[s].has_features(encoder)]
    missing = [s for s in complete if s not in todo]
    if missing:
        log.warning("%d of %d complete slides have no complete %r features and are not exported: %s",
                    len(missing), len(complete), encoder, ", ".join(missing))
    if not todo:
        log.warning("%s: nothing to export for %r", store_path, encoder)
        return []
    (out / "h5_files").mkdir(parents=True, exist_ok=True)
    (out / "pt_files").mkdir(parents=True, exist_ok=True)
    results: list[ExportResult] = []
    for sid in tqdm(todo, desc="export", unit="slide", disable=not progress):
        h5_path = out / "h5_files" / f"{sid}.h5"
        try:
            n = _export_one(store[sid], encoder, out, h5py)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one slide never stops the rest
            msg = f"{sid}: {type(e).__name__}: {e}"
            log.error("export failed: %s", msg)
            results.append(ExportResult(sid, "failed", 0, msg, str(h5_path)))
            continue
        results.append(ExportResult(sid, "exported", n, None, str(h5_path)))
    log.info("exported %d slides to %s", sum(r.status == "exported" for r in results), out)
    return results
