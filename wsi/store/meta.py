"""What the store knows about a slide, typed: `SlideMeta`, and the names that make store paths safe.

`SlideMeta` is written once, by tiling (`wsi tile`) or by an import (`wsi import-h5`), and read
everywhere else; no module outside the store reads slide attributes by string key. On disk it is the
slide group's attributes (schema 2, the field names below). Schema-1 stores (pathmil 0.1) used other
names (`mpp`, `patch_size_level0`, `level0_size`, `imported_from`); `SlideMeta.from_attrs` reads both.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

WRITING, COMPLETE, FAILED = "writing", "complete", "failed"
TILED, FEATURES_ONLY = "tiled", "features-only"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class SlideMeta:
    """A slide of the store. Sizes are in pixels; `tile_size_level0` is a tile's side at level 0
    (`patch_size * target_mpp / slide_mpp`, rounded); coords are level-0 top-left corners."""

    slide_id: str
    status: str = WRITING               # writing | complete | failed
    kind: str = TILED                   # tiled (from a slide file) | features-only (imported h5)
    source: str | None = None           # the slide file (or, for imports, the h5 file)
    fingerprint: str | None = None      # size + head/tail hash of the source at tiling time
    slide_mpp: float | None = None      # µm/px of the slide's level 0
    target_mpp: float | None = None     # µm/px of the tiles
    patch_size: int | None = None       # tile side in px at target_mpp
    tile_size_level0: int | None = None
    width: int | None = None            # level-0 size
    height: int | None = None
    overlap: int = 0                    # px at target_mpp
    min_tissue: float | None = None
    tiles_stored: bool = False
    tile_codec: str | None = None       # "jpeg-<quality>" | "lossless" when tiles are stored
    n_tiles: int | None = None
    mpp_approximate: bool = False       # target_mpp derived from a magnification (imports)
    error: str | None = None            # why the slide failed
    provenance: Mapping[str, Any] = field(default_factory=dict)  # how it was made: reader, tissue, h5 attrs

    def __post_init__(self):
        object.__setattr__(self, "provenance", MappingProxyType(dict(self.provenance)))

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def features_only(self) -> bool:
        return self.kind == FEATURES_ONLY

    def to_attrs(self) -> dict[str, Any]:
        """The slide group's attributes (JSON)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "slide_id"}
        d["provenance"] = dict(self.provenance)
        return d

    def replace(self, **changes) -> "SlideMeta":
        return replace(self, **changes)

    @classmethod
    def from_attrs(cls, slide_id: str, attrs: Mapping[str, Any]) -> "SlideMeta":
        """Read schema-2 attributes, or schema-1 ones (mapped onto the typed fields)."""
        a = dict(attrs)
        if "kind" not in a:
            a = _from_schema1(a)
        names = {f.name for f in fields(cls)} - {"slide_id"}
        return cls(slide_id=slide_id, **{k: v for k, v in a.items() if k in names})


_V1_TYPED = {"status", "source", "fingerprint", "slide_mpp", "patch_size", "overlap", "min_tissue",
             "tiles_stored", "n_tiles", "mpp_approximate", "error"}


def _from_schema1(a: dict[str, Any]) -> dict[str, Any]:
    out = {k: a[k] for k in _V1_TYPED if k in a and a[k] is not None}
    out["kind"] = FEATURES_ONLY if a.get("imported_from") else TILED
    if a.get("mpp") is not None:
        out["target_mpp"] = a["mpp"]
    if a.get("patch_size_level0") is not None:
        out["tile_size_level0"] = a["patch_size_level0"]
    size = a.get("level0_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        out["width"], out["height"] = int(size[0]), int(size[1])
    if out.get("tiles_stored") and "tile_codec" not in a:
        out["tile_codec"] = "lossless"
    if a.get("tiles_stored") is None and not a.get("imported_from"):
        out["tiles_stored"] = True  # early schema-1 stores did not record it; they always stored tiles
    typed = set(out) | {"mpp", "patch_size_level0", "level0_size", "kind"}
    out["provenance"] = {k: v for k, v in a.items() if k not in typed}
    return out


# ---- names ---------------------------------------------------------------------------------------------
def validate_slide_id(slide_id: str) -> str:
    """Return `slide_id` if it is a safe single path component, else raise ValueError."""
    if not isinstance(slide_id, str) or not _ID_RE.fullmatch(slide_id):
        raise ValueError(f"invalid slide id {slide_id!r}: use letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (at most 200 characters)")
    return slide_id


def validate_name(name: str, what: str) -> str:
    """A label / prediction name: the same rule as slide ids."""
    try:
        return validate_slide_id(name)
    except ValueError:
        raise ValueError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit") from None


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
