"""Features between the tile store and the CLAM / TRIDENT ecosystem, both directions.

Layouts read (dataset and attribute names as CLAM's and TRIDENT's own code writes them):

    CLAM     root/h5_files/<slide_id>.h5       features (N, D) float32, coords (N, 2) level-0 x, y
             root/pt_files/<slide_id>.pt       torch tensor (N, D) (extract_features_fp.py; not read here)
             root/patches/<slide_id>.h5        optional (create_patches_fp.py): coords with attrs
                                               patch_size, patch_level, downsample, downsampled_level_dim,
                                               level_dim, name, save_path
    TRIDENT  <job>/<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/<slide_id>.h5
                                               features (N, D) with attrs name, savetodir, encoder;
                                               coords (N, 2) with attrs patch_size, patch_size_level0,
                                               level0_magnification, target_magnification, overlap, name,
                                               savetodir, level0_width, level0_height

`root` for TRIDENT may be the job dir, the `<mag>x_..._overlap` dir or the `features_<encoder>` dir.

`export_h5` writes CLAM's layout (h5_files/ + pt_files/), with coords attributes both CLAM-style
readers (patch_size x downsample x custom_downsample at patch_level) and TRIDENT's reader
(patch_size, level0_magnification, target_magnification) understand.

h5 files are only read as data (h5py, no pickles); .pt files are only written, never loaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import COMPLETE, StoreError, TileStore, feature_key, validate_slide_id

log = logging.getLogger(__name__)

CLAM, TRIDENT = "clam", "trident"
_FEATURES_PREFIX = "features_"      # TRIDENT: features_<encoder>; slide_features_<encoder> is not this
_INT32_MAX = np.iinfo(np.int32).max


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


class ImportFileError(Exception):
    """One h5 file cannot be imported; the message says why."""


def _h5py():
    try:
        import h5py
    except ImportError as e:  # not a pathmil dependency for tiling; needed here only
        raise ImportError("reading and writing CLAM / TRIDENT files needs h5py: pip install h5py") from e
    return h5py


# ---- layout detection -------------------------------------------------------------------------------
def _has_h5(d: Path) -> bool:
    return any(p.suffix == ".h5" and p.is_file() for p in d.iterdir())


def _trident_feature_dirs(root: Path) -> list[Path]:
    """`features_*` folders at root, one level below, or root itself; only those holding .h5 files."""
    if root.name.startswith(_FEATURES_PREFIX):
        cands = [root]
    else:
        cands = []
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith(_FEATURES_PREFIX):
                cands.append(d)
            else:
                cands += [e for e in sorted(d.iterdir()) if e.is_dir() and e.name.startswith(_FEATURES_PREFIX)]
    return [d for d in cands if _has_h5(d)]


def _clam_root(root: Path) -> Path | None:
    if root.name == "h5_files" and root.is_dir():
        return root.parent
    return root if (root / "h5_files").is_dir() else None


def detect_layout(root: Path) -> str:
    """"clam" (root/h5_files/*.h5) or "trident" (features_<encoder>/*.h5 at, in or below root)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; give a CLAM feature folder (with h5_files/) or a TRIDENT "
                         "job folder (with features_<encoder>/)")
    clam = _clam_root(root) is not None
    trident = bool(_trident_feature_dirs(root))
    if clam and trident:
        raise ValueError(f"{root}: holds both CLAM h5_files/ and TRIDENT features_*/ folders; "
                         "give the one to import directly")
    if clam:
        return CLAM
    if trident:
        return TRIDENT
    raise ValueError(f"{root}: neither a CLAM feature folder (h5_files/<slide>.h5) nor a TRIDENT job folder "
                     "(<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5)")


def _resolve(root: Path, encoder: str) -> tuple[str, Path, Path | None, str | None]:
    """(layout, folder of feature h5 files, CLAM patches folder or None, TRIDENT encoder name or None)."""
    layout = detect_layout(root)
    if layout == CLAM:
        base = _clam_root(root)
        patches = base / "patches"
        return CLAM, base / "h5_files", patches if patches.is_dir() else None, None
    dirs = _trident_feature_dirs(root)
    if len(dirs) > 1:
        want = feature_key(encoder)
        match = [d for d in dirs if feature_key(d.name[len(_FEATURES_PREFIX):] or "_") == want]
        if len(match) != 1:
            names = ", ".join(str(d.relative_to(root)) for d in dirs)
            raise ValueError(f"{root}: {len(dirs)} TRIDENT feature folders ({names}) and "
                             f"{'several' if match else 'none'} named features_{encoder}; "
                             "give the features_<encoder> folder to import directly")
        dirs = match
    d = dirs[0]
    return TRIDENT, d, None, d.name[len(_FEATURES_PREFIX):] or None


# ---- reading one h5 -----------------------------------------------------------------------------------
def _clean(v: Any) -> Any:
    """An h5 attribute as a plain JSON-able Python value (TRIDENT stores None as the string 'None')."""
    if isinstance(v, (bytes, np.bytes_)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        return None if v == "None" else v
    if isinstance(v, np.ndarray):
        return [_clean(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _attrs(dset) -> dict[str, Any]:
    out = {}
    for k in dset.attrs.keys():
        try:
            out[k] = _clean(dset.attrs[k])
        except Exception:  # an attribute h5py cannot decode: leave it out
            continue
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (list, tuple)):
        return _num(v[0]) if v else None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(round(x))


@dataclass
class _H5:
    coords: np.ndarray
    n: int
    dim: int
    dtype: np.dtype
    coords_attrs: dict[str, Any]
    feature_attrs: dict[str, Any]


def _read_head(path: Path) -> _H5:
    """Coords, attributes and the features' shape (not their values); raises ImportFileError."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise ImportFileError(f"cannot open as HDF5 (truncated or not an h5 file): {e}") from None
    with f:
        for name in ("features", "coords"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise ImportFileError(f"no '{name}' dataset (it holds: {', '.join(sorted(f.keys())) or 'nothing'})")
        fd, cd = f["features"], f["coords"]
        shape = fd.shape
        if len(shape) == 3 and shape[0] == 1:   # a leading batch axis of 1
            shape = shape[1:]
        if len(shape) != 2:
            raise ImportFileError(f"'features' has shape {fd.shape}; expected (N, D)")
        if fd.dtype.kind != "f":
            raise ImportFileError(f"'features' has dtype {fd.dtype}; expected floating point")
        if len(cd.shape) != 2 or cd.shape[1] != 2:
            raise ImportFileError(f"'coords' has shape {cd.shape}; expected (N, 2)")
        if shape[0] != cd.shape[0]:
            raise ImportFileError(f"'features' has {shape[0]} rows but 'coords' has {cd.shape[0]}")
        if shape[0] == 0:
            raise ImportFileError("no patches (0 rows)")
        try:
            coords = cd[:]
        except Exception as e:
            raise ImportFileError(f"cannot read 'coords' (truncated file?): {e}") from None
        if coords.dtype.kind == "f":
            if not np.all(np.isfinite(coords)) or not np.array_equal(coords, np.round(coords)):
                raise ImportFileError("'coords' are not whole level-0 pixel positions")
        elif coords.dtype.kind not in "iu":
            raise ImportFileError(f"'coords' has dtype {coords.dtype}; expected integers")
        if coords.size and (coords.min() < -_INT32_MAX or coords.max() > _INT32_MAX):
            raise ImportFileError("'coords' do not fit in int32")
        return _H5(coords.astype(np.int64), int(shape[0]), int(shape[1]), fd.dtype, _attrs(cd), _attrs(fd))


def _read_features(path: Path) -> np.ndarray:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
    except Exception as e:
        raise ImportFileError(f"cannot read 'features' (truncated file?): {e}") from None
    if feats.ndim == 3:
        feats = feats[0]
    # float16 / float32 -> float32 exactly; float64 kept as it is (no silent precision loss)
    return feats if feats.dtype == np.float64 else feats.astype(np.float32, copy=False)


def h5_feature_files(root: str | Path, encoder: str) -> dict[str, Path]:
    """The feature h5 file of each slide in a CLAM or TRIDENT folder, by slide id (the file's stem).
    Files TRIDENT is still writing (a `.lock` beside them) are left out with a warning."""
    _, h5_dir, _, _ = _resolve(Path(root), encoder)
    files: dict[str, Path] = {}
    locked = []
    for p in sorted(h5_dir.iterdir()):
        if p.suffix != ".h5" or not p.is_file():
            continue
        if Path(f"{p}.lock").exists():
            locked.append(p.name)
            continue
        files[p.stem] = p
    if locked:
        log.warning("%s: %d files still being written (.lock beside them) left out: %s", h5_dir, len(locked),
                    ", ".join(locked[:10]) + (" ..." if len(locked) > 10 else ""))
    return files


def read_h5_bag(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32 (float64 kept), coords (N, 2) int64 level-0 x, y) of one CLAM / TRIDENT
    feature file; a damaged or malformed file raises ValueError naming it and why."""
    path = Path(path)
    try:
        head = _read_head(path)
        feats = _read_features(path)
    except ImportFileError as e:
        raise ValueError(f"{path}: {e}; re-extract its features or remove the file") from None
    if feats.shape != (head.n, head.dim):
        raise ValueError(f"{path}: 'features' read as {feats.shape}, expected {(head.n, head.dim)}; "
                         "re-extract its features or remove the file")
    return feats, head.coords


def _clam_patch_attrs(patches_dir: Path | None, slide_id: str) -> dict[str, Any]:
    """coords attrs of CLAM's create_patches_fp.py output for the slide, {} if absent or unreadable."""
    if patches_dir is None:
        return {}
    p = patches_dir / f"{slide_id}.h5"
    if not p.is_file():
        return {}
    h5py = _h5py()
    try:
        with h5py.File(p, "r") as f:
            return _attrs(f["coords"]) if "coords" in f else {}
    except Exception as e:
        log.warning("%s: cannot read the patching attributes (%s); patch size left unknown", p, e)
        return {}


def _slide_meta(layout: str, a: dict[str, Any], mpp: float | None) -> dict[str, Any]:
    """Store attributes of an imported slide from the coords attributes `a`."""
    patch_size = _num(a.get("patch_size"))
    ps0 = _num(a.get("patch_size_level0"))
    tmag, l0mag = _num(a.get("target_magnification")), _num(a.get("level0_magnification"))
    if ps0 is None and patch_size is not None:
        if tmag and l0mag:                                      # TRIDENT
            ps0 = patch_size * l0mag / tmag
        else:                                                   # CLAM: patch_size px at patch_level
            ds = _num(a.get("downsample")) if "downsample" in a else (1.0 if a.get("patch_level") == 0 else None)
            if ds is not None:
                ps0 = patch_size * ds * (_num(a.get("custom_downsample")) or 1.0)
    meta: dict[str, Any] = {"patch_size": _int_or_none(patch_size), "patch_size_level0": _int_or_none(ps0)}
    approx = False
    if mpp is None:
        if _num(a.get("mpp")) is not None:                      # written by export_h5
            mpp, approx = _num(a.get("mpp")), bool(a.get("mpp_approximate"))
        elif tmag:
            mpp, approx = 10.0 / tmag, True                     # TRIDENT: mpp = 10 / magnification
    meta["mpp"] = float(mpp) if mpp is not None else None
    if approx:
        meta["mpp_approximate"] = True
    slide_mpp = _num(a.get("slide_mpp"))
    if slide_mpp is not None:
        meta["slide_mpp"] = slide_mpp
    ov = a.get("overlap")
    if isinstance(ov, (int, float)) and not isinstance(ov, bool):
        meta["overlap"] = int(ov)
    w, h = _num(a.get("level0_width")), _num(a.get("level0_height"))
    if w and h:
        meta["level0_size"] = [int(w), int(h)]
    keep = ("patch_level", "downsample", "custom_downsample", "target_magnification", "level0_magnification")
    meta["h5_coords_attrs"] = {k: a[k] for k in keep if k in a}
    return meta


# ---- import ---------------------------------------------------------------------------------------------
def _import_one(store: TileStore, path: Path, layout: str, encoder: str, patches_dir: Path | None,
                h5_encoder: str | None, mpp: float | None, overwrite: bool) -> ImportResult:
    sid = path.stem
    try:
        validate_slide_id(sid)
    except ValueError as e:
        raise ImportFileError(str(e)) from None
    if Path(f"{path}.lock").exists():
        raise ImportFileError("locked: TRIDENT is still writing it (a .lock file sits next to it)")
    head = _read_head(path)
    a = {**_clam_patch_attrs(patches_dir, sid), **head.coords_attrs} if layout == CLAM else head.coords_attrs
    meta = _slide_meta(layout, a, mpp)

    if store.status(sid) == COMPLETE:
        have = store.coords(sid)
        if have.shape != head.coords.shape or not np.array_equal(have.astype(np.int64), head.coords):
            if have.shape != head.coords.shape:
                how = f"{len(have)} tiles in the store, {head.n} in the file"
            else:
                i = int(np.flatnonzero(np.any(have != head.coords, axis=1))[0])
                how = f"first at row {i}: {have[i].tolist()} in the store, {head.coords[i].tolist()} in the file"
            raise ImportFileError(f"coords differ from slide {sid!r} already in the store ({how}); these features "
                                  "belong to other tiles: import them into a new store")
        stored_ps0 = store.slide(sid).attrs.get("patch_size_level0")
        if stored_ps0 and meta["patch_size_level0"] and abs(stored_ps0 - meta["patch_size_level0"]) > 1:
            raise ImportFileError(f"same coords but patch size at level 0 {meta['patch_size_level0']} px, "
                                  f"the store's slide has {stored_ps0} px: import them into a new store")
        if store.has_features(sid, encoder) and not overwrite:
            return ImportResult(sid, "skipped", head.n, None, str(path))
        new_slide = False
    else:
        new_slide = True

    feats = _read_features(path)   # before any write: a file that fails here leaves the store as it was
    if feats.shape != (head.n, head.dim):
        raise ImportFileError(f"'features' read as {feats.shape}, expected {(head.n, head.dim)}")
    if new_slide:
        attrs = {"source": str(path.resolve()), "imported_from": layout, **meta, "tiles_stored": False}
        store.begin_slide(sid, {"source": attrs["source"], "imported_from": layout})
        store.write_slide_arrays(sid, head.coords.astype(np.int32), np.zeros((1, 1), np.uint8),
                                 {"downsample": [0, 0], "imported": True}, patch_size=None)
        store.mark_complete(sid, **attrs, n_tiles=head.n)
    fattrs: dict[str, Any] = {"imported_from": layout, "source": str(path.resolve()), "dim": head.dim,
                              "h5_dtype": str(head.dtype)}
    orig = h5_encoder or head.feature_attrs.get("encoder")
    if orig:
        fattrs["original_encoder"] = str(orig)
    store.write_features(sid, encoder, feats, fattrs)
    return ImportResult(sid, "imported", head.n, None, str(path))


def import_h5(root: str | Path, store_path: str | Path, encoder: str, *, mpp: float | None = None,
              overwrite: bool = False, progress: bool = True) -> list[ImportResult]:
    """Import a CLAM or TRIDENT feature folder into the tile store (created if missing) as
    `features/<encoder>` of each slide. One bad file never stops the rest: it comes back "failed"
    with the reason (and is logged). Slides whose features are complete are skipped unless `overwrite`."""
    from tqdm.auto import tqdm

    root = Path(root)
    layout, h5_dir, patches_dir, h5_encoder = _resolve(root, encoder)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    files = sorted(p for p in h5_dir.iterdir() if p.suffix == ".h5" and p.is_file())
    if not files:
        log.warning("%s: no .h5 files to import", h5_dir)
        return []
    pt_dir = h5_dir.parent / "pt_files" if layout == CLAM else None
    store = TileStore(store_path)
    log.info("importing %d %s feature files from %s into %s as %r", len(files), layout, h5_dir, store_path, encoder)
    results: list[ImportResult] = []
    for path in tqdm(files, desc=f"import {layout}", unit="slide", disable=not progress):
        if pt_dir is not None and pt_dir.is_dir() and not (pt_dir / f"{path.stem}.pt").exists():
            log.warning("%s: no pt_files/%s.pt next to it; CLAM writes that after the h5 is complete, "
                        "so this h5 may be partial", path.name, path.stem)
        try:
            r = _import_one(store, path, layout, encoder, patches_dir, h5_encoder, mpp, overwrite)
        except (KeyboardInterrupt, SystemExit):
            raise
        except (ImportFileError, StoreError, ValueError, OSError) as e:
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
def _export_coords_attrs(sid: str, a: dict[str, Any]) -> dict[str, Any]:
    """coords attributes for CLAM-style and TRIDENT readers (h5 cannot hold None: unknowns are left out)."""
    ps = a.get("patch_size")
    ps0 = a.get("patch_size_level0")
    mpp, slide_mpp = _num(a.get("mpp")), _num(a.get("slide_mpp"))
    out: dict[str, Any] = {"name": sid, "patch_level": 0, "downsample": np.array([1.0, 1.0])}
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
        if a.get("mpp_approximate"):
            out["mpp_approximate"] = True
        out["target_magnification"] = 10.0 / mpp              # TRIDENT's convention: mpp = 10 / mag
        if ratio:
            out["level0_magnification"] = 10.0 / mpp * ratio
    if slide_mpp:
        out["slide_mpp"] = float(slide_mpp)
    if a.get("overlap") is not None:
        out["overlap"] = int(a["overlap"])
    size = a.get("level0_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        out["level0_width"], out["level0_height"] = int(size[0]), int(size[1])
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_h5(store_path: str | Path, encoder: str, out: str | Path, *, progress: bool = True) -> list[ExportResult]:
    """Write CLAM's feature layout for every complete slide with complete `encoder` features:
    out/h5_files/<slide>.h5 (features float32 N×D, coords int64 N×2 with patching attributes) and
    out/pt_files/<slide>.pt (a float32 tensor N×D, as CLAM's extract_features_fp.py saves)."""
    import torch
    from tqdm.auto import tqdm

    h5py = _h5py()
    store = TileStore(store_path, mode="r")
    out = Path(out)
    complete = [s for s in store.slide_ids() if store.status(s) == COMPLETE]
    todo = [s for s in complete if store.has_features(s, encoder)]
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
            feats = np.ascontiguousarray(store.features(sid, encoder), dtype=np.float32)
            coords = store.coords(sid).astype(np.int64)
            a = dict(store.slide(sid).attrs)
            cattrs = _export_coords_attrs(sid, a)
            fattrs = {"encoder": encoder, "name": sid}
            src_attrs = dict(store.slide(sid)["features"][feature_key(encoder)].attrs)
            if src_attrs.get("original_encoder"):
                fattrs["original_encoder"] = str(src_attrs["original_encoder"])

            def write_h5(tmp: Path) -> None:
                with h5py.File(tmp, "w") as f:
                    fd = f.create_dataset("features", data=feats)
                    for k, v in fattrs.items():
                        fd.attrs[k] = v
                    cd = f.create_dataset("coords", data=coords)
                    for k, v in cattrs.items():
                        cd.attrs[k] = v

            _atomic(h5_path, write_h5)
            _atomic(out / "pt_files" / f"{sid}.pt", lambda tmp: torch.save(torch.from_numpy(feats), tmp))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one slide never stops the rest
            msg = f"{sid}: {type(e).__name__}: {e}"
            log.error("export failed: %s", msg)
            results.append(ExportResult(sid, "failed", 0, msg, str(h5_path)))
            continue
        results.append(ExportResult(sid, "exported", int(feats.shape[0]), None, str(h5_path)))
    log.info("exported %d slides to %s", sum(r.status == "exported" for r in results), out)
    return results
