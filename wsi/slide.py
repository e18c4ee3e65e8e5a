"""Open a slide (any openslide format, or a plain image) and know its resolution.

Everything is addressed in level-0 pixels, as openslide, CLAM and TRIDENT do; `Slide.mpp` is the
level-0 resolution in µm/px. A slide whose resolution is unknown is an error, never a guess.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError  # re-exported: `from wsi.slide import SlideError` keeps working

# Resolutions outside this range are metadata defaults (72 dpi, 1 px/cm), not scanner values.
_PLAUSIBLE_MPP = (0.05, 50.0)
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif", ".dcm", ".qptiff"} | PLAIN_IMAGE_SUFFIXES


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


class Slide:
    """A read-only whole-slide image: pyramid levels, resolution and region reads (RGB uint8)."""

    path: Path
    mpp: float
    levels: list[Level]
    vendor: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is not coarser than `downsample` (1 % tolerance)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.01:
                best = i
        return best

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of `size` (w, h) at `level`, top-left `xy` in level-0 pixels; (h, w, 3) uint8."""
        raise NotImplementedError

    def read_level(self, level: int) -> np.ndarray:
        lv = self.levels[level]
        return self.read_region((0, 0), level, (lv.width, lv.height))

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({self.path.name}, {w}x{h}, {self.mpp:.3f} µm/px, {len(self.levels)} levels)"


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp):
        return None
    return float(mpp) if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def _mpp_from_resolution(xres: float | None, unit: str | int | None) -> float | None:
    """µm/px from a TIFF/PNG resolution (pixels per unit)."""
    if not xres:
        return None
    unit = str(unit).lower()
    per_unit_um = {"centimeter": 1e4, "3": 1e4, "cm": 1e4, "inch": 25400.0, "2": 25400.0,
                   "millimeter": 1e3, "mm": 1e3, "micrometer": 1.0}.get(unit)
    return _plausible(per_unit_um / float(xres)) if per_unit_um else None


def _mpp_from_description(desc: str) -> float | None:
    m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc or "")
    return _plausible(float(m.group(1))) if m else None


class OpenSlideSlide(Slide):
    """Any format openslide reads (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, DICOM, ...)."""

    def __init__(self, path: Path, mpp: float | None = None):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except Exception as e:  # openslide's errors do not name the file
            raise SlideError(f"{path}: openslide cannot open it ({e}); is the file complete?") from e
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.levels = [Level(int(w), int(h), float(d)) for (w, h), d in
                       zip(self._osr.level_dimensions, self._osr.level_downsamples)]
        found = None
        for key in ("openslide.mpp-x", "aperio.MPP"):
            try:
                found = _plausible(float(props[key]))
            except (KeyError, ValueError):
                continue
            if found:
                break
        if found is None:
            found = _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
        self.mpp = _require_mpp(path, mpp if mpp is not None else found)
        self.properties = dict(props)

    def read_region(self, xy, level, size):
        import openslide

        try:
            rgba = self._osr.read_region((int(xy[0]), int(xy[1])), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: read failed at {xy} level {level} ({e}); the file may be truncated") from e
        arr = np.asarray(rgba)
        # openslide returns premultiplied RGBA; transparent pixels (outside the scanned area) are
        # background, so show them white as a scanner would, not black.
        rgb = arr[..., :3].copy()
        rgb[arr[..., 3] == 0] = 255
        return rgb

    def close(self) -> None:
        self._osr.close()


class ImageSlide(Slide):
    """A plain image (PNG, JPEG, non-pyramidal TIFF) held in memory as a one-level slide."""

    def __init__(self, path: Path, mpp: float | None = None):
        self.path = path
        self.vendor = "image"
        try:
            with warnings.catch_warnings():
                # a broken file gets one clear error below, not library noise
                warnings.simplefilter("ignore")
                arr, found = self._load(path)
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"{path}: not a readable slide or image ({type(e).__name__}: {e})") from e
        self._img = _to_rgb(arr, path)
        h, w = self._img.shape[:2]
        self.levels = [Level(w, h, 1.0)]
        self.mpp = _require_mpp(path, mpp if mpp is not None else found)
        self.properties = {}

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, float | None]:
        """Pixels and the resolution the file states (None when it states none)."""
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                arr = page.asarray()
                found = _mpp_from_description(page.description)
                if found is None and "XResolution" in page.tags:
                    num, den = page.tags["XResolution"].value
                    unit = page.tags["ResolutionUnit"].value if "ResolutionUnit" in page.tags else None
                    found = _mpp_from_resolution(num / den if den else None, unit)
            return arr, found
        from PIL import Image

        with Image.open(path) as im:
            dpi = im.info.get("dpi")
            arr = np.asarray(im.convert("RGB"))
        return arr, _mpp_from_resolution(float(dpi[0]), "inch") if dpi else None

    def read_region(self, xy, level, size):
        if level != 0:
            raise SlideError(f"{self.path}: a plain image has only level 0")
        x, y = int(xy[0]), int(xy[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self._img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._img[y0:y1, x0:x1]
        return out


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(f"{path}: expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise SlideError(f"{path}: expected 8-bit RGB, got {arr.dtype}; convert it to 8-bit first")
    return np.ascontiguousarray(arr[..., :3])


def _require_mpp(path: Path, mpp: float | None) -> float:
    if mpp is None:
        raise SlideError(f"{path}: no resolution (µm/px) in its metadata; pass it with --slide-mpp "
                         "(or an 'mpp' column in the cohort CSV)")
    if not (mpp > 0 and np.isfinite(mpp)):
        raise SlideError(f"{path}: invalid resolution {mpp!r} µm/px; --slide-mpp must be a positive number")
    return float(mpp)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open `path` with openslide when it can, else as a plain image. `mpp` overrides the metadata."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    # openslide reads plain TIFFs only when they are tiled ("generic-tiff"); stripped ones go to PIL.
    if fmt is not None:
        return OpenSlideSlide(path, mpp)
    return ImageSlide(path, mpp)
