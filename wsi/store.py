"""The Zarr v3 tile store: one group per slide holding coords, tissue, tiles, features, labels, predictions.

    cohort.zarr/                 attrs: pathmil_schema, pathmil_version
      slides/<slide_id>/         attrs: status, source, fingerprint, slide_mpp, mpp, patch_size, ...
        coords   int32 (N, 2)    level-0 top-left x, y
        tissue   uint8 (h, w)    low-resolution tissue mask; attrs: downsample
        tiles    uint8 (N, P, P, 3), TILE_CHUNK tiles per chunk
        features/<encoder>, labels/<name>, predictions/<run>

A slide's `status` is "writing" while its arrays are being written, "complete" only after all of
them are, and "failed" (with `error`) when it could not be processed. zarr's local store writes
every file atomically (temp file + rename), so a kill never leaves a half-written `zarr.json`.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
TILE_CHUNK = 8
WRITING, COMPLETE, FAILED = "writing", "complete", "failed"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
FEATURE_ROWS_PER_CHUNK = 4096


class StoreError(Exception):
    """The store is missing, of another kind, or asked for something it does not hold."""


def validate_slide_id(slide_id: str) -> str:
    """Return `slide_id` if it is a safe single path component, else raise ValueError."""
    if not isinstance(slide_id, str) or not _ID_RE.fullmatch(slide_id):
        raise ValueError(f"invalid slide id {slide_id!r}: use letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (at most 200 characters)")
    return slide_id


def feature_key(encoder: str) -> str:
    """The array name under `features/` for an encoder id: 'hf-hub:MahmoodLab/UNI' -> 'hf-hub_MahmoodLab_UNI'."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", encoder).strip("._-")
    if not key:
        raise ValueError(f"cannot make a feature name from encoder {encoder!r}")
    return key[:200]


def slide_id_from_path(path: str | Path) -> str:
    """A valid slide id from a file name: its stem with unsafe characters replaced by '_'."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    sid = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:200]
    if not sid:
        raise ValueError(f"{path}: cannot derive a slide id from this file name; give one in the cohort CSV")
    return validate_slide_id(sid)


def file_fingerprint(path: str | Path) -> str:
    """Size plus a hash of the first and last MiB: cheap, and changes when the file does."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()[:16]}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pathmil")
    except Exception:
        return "unknown"


class TileStore:
    """A cohort's tile store on disk (or any fsspec URL zarr accepts)."""

    def __init__(self, path: str | Path, mode: str = "a"):
        import zarr

        self.path = Path(path) if "://" not in str(path) else path
        if mode == "r":
            if not (Path(path) / "zarr.json").exists() and "://" not in str(path):
                raise StoreError(f"{path}: no tile store here; create one with `wsi tile SLIDES --store {path}`")
            self.root = zarr.open_group(str(path), mode="r")
        else:
            local = Path(path) if "://" not in str(path) else None
            if local is not None and local.exists() and not (local / "zarr.json").exists() and \
                    (not local.is_dir() or any(local.iterdir())):
                raise StoreError(f"{path}: exists and is not a tile store; choose a new path for --store")
            self.root = zarr.open_group(str(path), mode="a", zarr_format=3)
        if "pathmil_schema" not in self.root.attrs:
            if mode == "r" or len(list(self.root.keys())):
                raise StoreError(f"{path}: a Zarr group, but not a pathmil tile store; choose a new path for --store")
            self.root.attrs.update({"pathmil_schema": SCHEMA_VERSION, "pathmil_version": _version()})
        elif self.root.attrs["pathmil_schema"] > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer pathmil (schema {self.root.attrs['pathmil_schema']}); upgrade pathmil")
        if mode != "r" and "slides" not in self.root:
            self.root.create_group("slides")

    # -- reading ---------------------------------------------------------------------------
    def slide_ids(self) -> list[str]:
        if "slides" not in self.root:
            return []
        return sorted(k for k, _ in self.root["slides"].groups())

    def __contains__(self, slide_id: str) -> bool:
        return validate_slide_id(slide_id) in self.slide_ids()

    def slide(self, slide_id: str):
        """The zarr group of a slide."""
        validate_slide_id(slide_id)
        try:
            return self.root["slides"][slide_id]
        except KeyError:
            raise StoreError(f"{self.path}: no slide {slide_id!r}; it holds {len(self.slide_ids())} slides "
                             "(see `wsi info`)") from None

    def status(self, slide_id: str) -> str | None:
        try:
            return self.slide(slide_id).attrs.get("status")
        except StoreError:
            return None
        except Exception:  # unreadable metadata: treat as not written
            return None

    def coords(self, slide_id: str) -> np.ndarray:
        return self.slide(slide_id)["coords"][:]

    def slide_info(self, slide_id: str) -> dict[str, Any]:
        g = self.slide(slide_id)
        a = dict(g.attrs)
        feats = sorted(k for k, _ in g["features"].arrays()) if "features" in g else []
        return {"id": slide_id, "status": a.get("status"),
                "n_tiles": int(g["coords"].shape[0]) if "coords" in g else 0,
                "mpp": a.get("mpp"), "patch_size": a.get("patch_size"), "slide_mpp": a.get("slide_mpp"),
                "source": a.get("source"), "features": feats, "tiles": "tiles" in g,
                "labels": sorted(k for k, _ in g["labels"].arrays()) if "labels" in g else [],
                "predictions": self.prediction_names(slide_id),
                "error": a.get("error")}

    def info(self) -> list[dict[str, Any]]:
        return [self.slide_info(s) for s in self.slide_ids()]

    # -- writing ---------------------------------------------------------------------------
    def begin_slide(self, slide_id: str, attrs: dict[str, Any]):
        """Start (or restart) a slide: any previous content is removed, status becomes "writing"."""
        validate_slide_id(slide_id)
        slides = self.root["slides"]
        if slide_id in slides:
            del slides[slide_id]
        return slides.create_group(slide_id, attributes={**attrs, "status": WRITING})

    def write_slide_arrays(self, slide_id: str, coords: np.ndarray, tissue: np.ndarray,
                           tissue_attrs: dict, patch_size: int | None, tissue_fraction: np.ndarray | None = None):
        """coords, tissue mask and (if patch_size) an empty tiles array to be filled chunk by chunk."""
        g = self.slide(slide_id)
        n = len(coords)
        g.create_array("coords", data=np.asarray(coords, np.int32), chunks=(max(1, min(n, 65536)), 2))
        g.create_array("tissue", data=np.asarray(tissue, np.uint8),
                       chunks=tuple(max(1, min(s, 1024)) for s in tissue.shape), attributes=tissue_attrs)
        if tissue_fraction is not None:
            g.create_array("tissue_fraction", data=np.asarray(tissue_fraction, np.float32),
                           chunks=(max(1, min(n, 65536)),))
        if patch_size:
            from zarr.codecs import ZstdCodec

            # Lossless compression buys only ~1.2x on H&E tiles; zstd level 1 gets nearly all of it
            # for less CPU than the default level, and any zarr client reads it.
            g.create_array("tiles", shape=(n, patch_size, patch_size, 3), dtype="uint8",
                           chunks=(TILE_CHUNK, patch_size, patch_size, 3), fill_value=0,
                           compressors=[ZstdCodec(level=1)])

    # -- features ----------------------------------------------------------------------------
    def create_features(self, slide_id: str, encoder: str, n: int, dim: int, attrs: dict[str, Any],
                        dtype: str = "float32"):
        """An empty `features/<encoder>` array (N, D) to fill batch by batch; `complete` is False until
        `finish_features`. Any earlier array of that name is replaced."""
        g = self.slide(slide_id)
        feats = g["features"] if "features" in g else g.create_group("features")
        key = feature_key(encoder)
        if key in feats:
            del feats[key]
        return feats.create_array(key, shape=(n, dim), dtype=dtype,
                                  chunks=(max(1, min(n, FEATURE_ROWS_PER_CHUNK)), dim),
                                  attributes={**attrs, "encoder": encoder, "complete": False})

    def write_features(self, slide_id: str, encoder: str, features: np.ndarray, attrs: dict[str, Any]) -> None:
        """Write a whole (N, D) feature array at once and mark it complete."""
        if features.ndim != 2 or features.shape[0] != self.slide(slide_id)["coords"].shape[0]:
            raise ValueError(f"{slide_id}: features of shape {features.shape} do not match "
                             f"{self.slide(slide_id)['coords'].shape[0]} tiles")
        arr = self.create_features(slide_id, encoder, features.shape[0], features.shape[1], attrs,
                                   dtype=str(features.dtype))
        arr[:] = features
        self.finish_features(slide_id, encoder)

    def finish_features(self, slide_id: str, encoder: str) -> None:
        self.slide(slide_id)["features"][feature_key(encoder)].attrs["complete"] = True

    def has_features(self, slide_id: str, encoder: str) -> bool:
        """True only for a complete feature array."""
        try:
            return bool(self.slide(slide_id)["features"][feature_key(encoder)].attrs.get("complete"))
        except (KeyError, StoreError):
            return False

    def features(self, slide_id: str, encoder: str) -> np.ndarray:
        if not self.has_features(slide_id, encoder):
            raise StoreError(f"{self.path}: slide {slide_id!r} has no complete features for {encoder!r}; "
                             f"run `wsi embed {self.path} --encoder {encoder}`")
        return self.slide(slide_id)["features"][feature_key(encoder)][:]

    # -- labels ------------------------------------------------------------------------------
    def write_labels(self, slide_id: str, name: str, values: np.ndarray, attrs: dict[str, Any]) -> None:
        """Write `labels/<name>`: float32 (N,) per tile, one value per row of coords (replaced if present)."""
        try:
            validate_slide_id(name)
        except ValueError:
            raise ValueError(f"invalid label name {name!r}: use letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit") from None
        g = self.slide(slide_id)
        values = np.asarray(values, np.float32)
        n = g["coords"].shape[0] if "coords" in g else None
        if values.ndim != 1 or values.shape[0] != n:
            raise ValueError(f"{slide_id}: labels of shape {values.shape} do not match {n} tiles")
        labels = g["labels"] if "labels" in g else g.create_group("labels")
        if name in labels:
            del labels[name]
        labels.create_array(name, data=values, chunks=(max(1, min(len(values), 65536)),), attributes=attrs)

    def labels(self, slide_id: str, name: str) -> np.ndarray | None:
        """`labels/<name>` of a slide, or None when it has none of that name."""
        validate_slide_id(name)
        g = self.slide(slide_id)
        if "labels" not in g or name not in g["labels"]:
            return None
        return g["labels"][name][:]

    def label_names(self, slide_id: str) -> list[str]:
        g = self.slide(slide_id)
        return sorted(k for k, _ in g["labels"].arrays()) if "labels" in g else []

    # -- predictions -------------------------------------------------------------------------
    def write_predictions(self, slide_id: str, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Write `predictions/<name>`: per-tile arrays (N,) and the run's attrs; `complete` is set last,
        so an interrupted write never looks finished."""
        try:
            validate_slide_id(name)
        except ValueError:
            raise ValueError(f"invalid prediction name {name!r}: use letters, digits, '.', '_' or '-'") from None
        g = self.slide(slide_id)
        n = g["coords"].shape[0]
        arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        for key, values in arrays.items():  # checked before the old predictions are dropped
            if values.shape[:1] != (n,):
                raise ValueError(f"{slide_id}: prediction {key!r} of shape {values.shape} does not match {n} tiles")
        preds = g["predictions"] if "predictions" in g else g.create_group("predictions")
        if name in preds:
            del preds[name]
        grp = preds.create_group(name, attributes={**attrs, "complete": False})
        for key, values in arrays.items():
            grp.create_array(key, data=values, chunks=(max(1, min(n, 65536)),) + values.shape[1:])
        grp.attrs["complete"] = True

    def predictions(self, slide_id: str, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(per-tile arrays, attrs) of `predictions/<name>`; StoreError when absent or unfinished."""
        validate_slide_id(name)
        g = self.slide(slide_id)
        if "predictions" not in g or name not in g["predictions"] or \
                not g["predictions"][name].attrs.get("complete"):
            raise StoreError(f"{self.path}: slide {slide_id!r} has no predictions {name!r} (it has: "
                             f"{', '.join(self.prediction_names(slide_id)) or 'none'}); make them with "
                             f"`mil predict --store {self.path} --run RUN_DIR --name {name}`")
        grp = g["predictions"][name]
        return {k: a[:] for k, a in grp.arrays()}, dict(grp.attrs)

    def prediction_names(self, slide_id: str) -> list[str]:
        """Names of the slide's complete predictions."""
        g = self.slide(slide_id)
        if "predictions" not in g:
            return []
        return sorted(k for k, grp in g["predictions"].groups() if grp.attrs.get("complete"))

    def tiles_array_path(self, slide_id: str) -> str:
        return f"{self.path}/slides/{validate_slide_id(slide_id)}/tiles"

    def mark_complete(self, slide_id: str, **attrs) -> None:
        self.slide(slide_id).attrs.update({**attrs, "status": COMPLETE})

    def mark_failed(self, slide_id: str, error: str, attrs: dict[str, Any] | None = None) -> None:
        validate_slide_id(slide_id)
        slides = self.root["slides"]
        if slide_id in slides:
            del slides[slide_id]
        slides.create_group(slide_id, attributes={**(attrs or {}), "status": FAILED, "error": error})
