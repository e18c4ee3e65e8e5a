"""Reading CLAM and TRIDENT feature folders: layout detection, one slide's features and coords, attributes.

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

`mil` reads bags straight from such a folder with `h5_feature_files` + `read_h5_bag`; `wsi.interop`
imports them into a tile store. h5 files are only read as data (h5py, no pickles); .pt files are
never loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PathmilError
from .store.meta import feature_key

log = logging.getLogger(__name__)

CLAM, TRIDENT = "clam", "trident"
_FEATURES_PREFIX = "features_"      # TRIDENT: features_<encoder>; slide_features_<encoder> is not this
_INT32_MAX = np.iinfo(np.int32).max


class H5Error(PathmilError, ValueError):
    """A CLAM / TRIDENT feature folder or h5 file that cannot be read; the message says why."""


def require_h5py():
    """The h5py module, or an ImportError saying how to install it."""
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


def detect_layout(root: str | Path) -> str:
    """"clam" (root/h5_files/*.h5) or "trident" (features_<encoder>/*.h5 at, in or below root)."""
    root = Path(root)
    if not root.is_dir():
        raise H5Error(f"{root}: not a folder; give a CLAM feature folder (with h5_files/) or a TRIDENT "
                      "job folder (with features_<encoder>/)")
    clam = _clam_root(root) is not None
    trident = bool(_trident_feature_dirs(root))
    if clam and trident:
        raise H5Error(f"{root}: holds both CLAM h5_files/ and TRIDENT features_*/ folders; "
                      "give the one to import directly")
    if clam:
        return CLAM
    if trident:
        return TRIDENT
    raise H5Error(f"{root}: neither a CLAM feature folder (h5_files/<slide>.h5) nor a TRIDENT job folder "
                  "(<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5)")


@dataclass(frozen=True)
class H5Folder:
    """Where a CLAM / TRIDENT folder keeps the feature files of one encoder."""

    layout: str                     # clam | trident
    h5_dir: Path                    # the folder of <slide_id>.h5 feature files
    patches_dir: Path | None        # CLAM's patches/ (patching attributes), when present
    encoder: str | None             # TRIDENT: the encoder named by features_<encoder>


def resolve_folder(root: str | Path, encoder: str) -> H5Folder:
    """The feature files of `encoder` in a CLAM or TRIDENT folder (a TRIDENT job with several
    encoders needs `encoder` to match one features_<encoder> folder)."""
    root = Path(root)
    layout = detect_layout(root)
    if layout == CLAM:
        base = _clam_root(root)
        patches = base / "patches"
        return H5Folder(CLAM, base / "h5_files", patches if patches.is_dir() else None, None)
    dirs = _trident_feature_dirs(root)
    if len(dirs) > 1:
        want = feature_key(encoder)
        match = [d for d in dirs if feature_key(d.name[len(_FEATURES_PREFIX):] or "_") == want]
        if len(match) != 1:
            names = ", ".join(str(d.relative_to(root)) for d in dirs)
            raise H5Error(f"{root}: {len(dirs)} TRIDENT feature folders ({names}) and "
                          f"{'several' if match else 'none'} named features_{encoder}; "
                          "give the features_<encoder> folder to import directly")
        dirs = match
    d = dirs[0]
    return H5Folder(TRIDENT, d, None, d.name[len(_FEATURES_PREFIX):] or None)


# ---- attributes -----------------------------------------------------------------------------------------
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


def h5_attrs(dset) -> dict[str, Any]:
    """A dataset's attributes as plain JSON-able values; ones h5py cannot decode are left out."""
    out = {}
    for k in dset.attrs.keys():
        try:
            out[k] = _clean(dset.attrs[k])
        except Exception:  # an attribute h5py cannot decode: leave it out
            continue
    return out


def positive_number(v: Any) -> float | None:
    """A finite positive number from an attribute (the first of a pair), else None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (list, tuple)):
        return positive_number(v[0]) if v else None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def clam_patch_attrs(patches_dir: Path | None, slide_id: str) -> dict[str, Any]:
    """coords attrs of CLAM's create_patches_fp.py output for the slide, {} if absent or unreadable."""
    if patches_dir is None:
        return {}
    p = patches_dir / f"{slide_id}.h5"
    if not p.is_file():
        return {}
    h5py = require_h5py()
    try:
        with h5py.File(p, "r") as f:
            return h5_attrs(f["coords"]) if "coords" in f else {}
    except Exception as e:
        log.warning("%s: cannot read the patching attributes (%s); patch size left unknown", p, e)
        return {}


# ---- one feature file -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class H5Header:
    """Everything of a feature file but the feature values."""

    coords: np.ndarray              # (N, 2) int64 level-0 x, y
    n: int
    dim: int
    dtype: np.dtype
    coords_attrs: dict[str, Any]
    feature_attrs: dict[str, Any]


def read_header(path: Path) -> H5Header:
    """Coords, attributes and the features' shape (not their values). H5Error says what is wrong
    (without the file name: callers add it)."""
    h5py = require_h5py()
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise H5Error(f"cannot open as HDF5 (truncated or not an h5 file): {e}") from None
    with f:
        for name in ("features", "coords"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise H5Error(f"no '{name}' dataset (it holds: {', '.join(sorted(f.keys())) or 'nothing'})")
        fd, cd = f["features"], f["coords"]
        shape = fd.shape
        if len(shape) == 3 and shape[0] == 1:   # a leading batch axis of 1
            shape = shape[1:]
        if len(shape) != 2:
            raise H5Error(f"'features' has shape {fd.shape}; expected (N, D)")
        if fd.dtype.kind != "f":
            raise H5Error(f"'features' has dtype {fd.dtype}; expected floating point")
        if len(cd.shape) != 2 or cd.shape[1] != 2:
            raise H5Error(f"'coords' has shape {cd.shape}; expected (N, 2)")
        if shape[0] != cd.shape[0]:
            raise H5Error(f"'features' has {shape[0]} rows but 'coords' has {cd.shape[0]}")
        if shape[0] == 0:
            raise H5Error("no patches (0 rows)")
        try:
            coords = cd[:]
        except Exception as e:
            raise H5Error(f"cannot read 'coords' (truncated file?): {e}") from None
        if coords.dtype.kind == "f":
            if not np.all(np.isfinite(coords)) or not np.array_equal(coords, np.round(coords)):
                raise H5Error("'coords' are not whole level-0 pixel positions")
        elif coords.dtype.kind not in "iu":
            raise H5Error(f"'coords' has dtype {coords.dtype}; expected integers")
        if coords.size and (coords.min() < -_INT32_MAX or coords.max() > _INT32_MAX):
            raise H5Error("'coords' do not fit in int32")
        return H5Header(coords.astype(np.int64), int(shape[0]), int(shape[1]), fd.dtype, h5_attrs(cd), h5_attrs(fd))


def read_features(path: Path, head: H5Header) -> np.ndarray:
    """The (N, D) features: float16 / float32 as float32 (exact), float64 kept (no silent precision loss)."""
    h5py = require_h5py()
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
    except Exception as e:
        raise H5Error(f"cannot read 'features' (truncated file?): {e}") from None
    if feats.ndim == 3:
        feats = feats[0]
    if feats.shape != (head.n, head.dim):
        raise H5Error(f"'features' read as {feats.shape}, expected {(head.n, head.dim)}")
    return feats if feats.dtype == np.float64 else feats.astype(np.float32, copy=False)


def h5_feature_files(root: str | Path, encoder: str) -> dict[str, Path]:
    """The feature h5 file of each slide in a CLAM or TRIDENT folder, by slide id (the file's stem).
    Files TRIDENT is still writing (a `.lock` beside them) are left out with a warning."""
    h5_dir = resolve_folder(root, encoder).h5_dir
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
    feature file; a damaged or malformed file raises H5Error (a ValueError) naming it and why."""
    path = Path(path)
    try:
        head = read_header(path)
        feats = read_features(path, head)
    except H5Error as e:
        raise H5Error(f"{path}: {e}; re-extract its features or remove the file") from None
    return feats, head.coords


__all__ = ["CLAM", "TRIDENT", "H5Error", "H5Folder", "H5Header", "require_h5py", "detect_layout",
           "resolve_folder", "h5_attrs", "positive_number", "clam_patch_attrs", "read_header", "read_features",
           "h5_feature_files", "read_h5_bag"]
