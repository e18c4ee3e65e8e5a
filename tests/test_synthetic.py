"""Tests for wsi.synthetic: the slides must be real Aperio-like pyramids that
OpenSlide reads, and the ground truth must match the pixels."""

from __future__ import annotations

import csv
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from skimage.draw import polygon as draw_polygon
from skimage.morphology import isotropic_dilation, isotropic_erosion

from wsi.synthetic import SynthSlide, make_cohort, write_slide
from wsi.synthetic.render import _Scene

W, H, MPP = 4096, 3072, 0.25
SEED = 11


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[SynthSlide]]:
    out = tmp_path_factory.mktemp("cohort")
    return out, make_cohort(out, n_slides=3, seed=SEED, width=W, height=H, mpp=MPP, progress=False)


@pytest.fixture(scope="module")
def pixels(cohort) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Level 0 and level 1 of every cohort slide, as OpenSlide decodes them."""
    out = {}
    for s in cohort[1]:
        with openslide.OpenSlide(s.path) as slide:
            out[s.slide_id] = (_read(slide, 0), _read(slide, 1))
    return out


def _tumor_slides(slides: list[SynthSlide]) -> list[SynthSlide]:
    return [s for s in slides if s.label == "tumor"]


def _polygons(slide: SynthSlide) -> list[np.ndarray]:
    data = json.loads(slide.annotation_path.read_text())
    return [np.asarray(f["geometry"]["coordinates"][0], float) for f in data["features"]]


def _is_background(rgb: np.ndarray) -> np.ndarray:
    """Bright and grey: the scanner background, not (even pale) stained tissue."""
    rgb = rgb.astype(int)
    return (rgb.min(-1) > 215) & (rgb.max(-1) - rgb.min(-1) < 15)


def _read(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


def _mask(polygons: list[np.ndarray], shape: tuple[int, int], downsample: float) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for poly in polygons:
        rr, cc = draw_polygon(poly[:, 1] / downsample, poly[:, 0] / downsample, shape)
        mask[rr, cc] = True
    return mask


# --------------------------------------------------------------------------- #
# cohort files
# --------------------------------------------------------------------------- #


def test_labels_csv_and_files(cohort):
    out, slides = cohort
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["slide_id", "label"]
    assert rows[1:] == [[f"synth_{i:03d}", s.label] for i, s in enumerate(slides)]
    assert [s.slide_id for s in slides] == ["synth_000", "synth_001", "synth_002"]
    assert sorted(s.label for s in slides) == ["normal", "tumor", "tumor"]  # round(3 * 0.5) = 2
    for s in slides:
        assert s.path == out / f"{s.slide_id}.svs" and s.path.is_file()
        assert (s.width, s.height, s.mpp) == (W, H, MPP)
        ann = out / "annotations" / f"{s.slide_id}.geojson"
        if s.label == "tumor":
            assert s.annotation_path == ann and ann.is_file()
        else:
            assert s.annotation_path is None and not ann.exists()


@pytest.mark.parametrize(
    ("n_slides", "fraction", "n_tumor"),
    [(5, 0.4, 2), (2, 0.0, 1), (2, 1.0, 1), (1, 0.5, 0)],
)
def test_class_balance(tmp_path, n_slides, fraction, n_tumor):
    slides = make_cohort(tmp_path, n_slides=n_slides, positive_fraction=fraction, width=256, height=256, progress=False)
    assert sum(s.label == "tumor" for s in slides) == n_tumor
    assert len(list((tmp_path / "annotations").glob("*.geojson"))) == n_tumor


def test_geojson_is_qupath_style(cohort):
    _, slides = cohort
    for s in _tumor_slides(slides):
        data = json.loads(s.annotation_path.read_text())
        assert data["type"] == "FeatureCollection"
        assert 1 <= len(data["features"]) <= 3
        for feature in data["features"]:
            assert feature["type"] == "Feature"
            assert feature["properties"] == {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            }
            assert feature["geometry"]["type"] == "Polygon"
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert ring.shape[1] == 2 and len(ring) >= 4
            assert np.array_equal(ring[0], ring[-1])  # closed
            assert (ring[:, 0] > 0).all() and (ring[:, 0] < W).all()
            assert (ring[:, 1] > 0).all() and (ring[:, 1] < H).all()


# --------------------------------------------------------------------------- #
# the TIFF
# --------------------------------------------------------------------------- #


def test_opens_as_aperio_with_mpp_and_levels(cohort):
    _, slides = cohort
    for s in slides:
        with openslide.OpenSlide(s.path) as slide:
            props = slide.properties
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == MPP
            assert float(props["openslide.mpp-y"]) == MPP
            assert float(props["aperio.MPP"]) == MPP
            assert props["openslide.objective-power"] == "40"
            assert slide.level_count == 2
            assert slide.level_dimensions == ((W, H), (W // 4, H // 4))
            assert slide.level_downsamples == pytest.approx((1.0, 4.0))
            assert props["openslide.level[0].tile-width"] == "256"
            assert "thumbnail" in slide.associated_images


@pytest.mark.parametrize(
    ("width", "height", "mpp", "downsamples"),
    [(2048, 1536, 0.25, (1,)), (1536, 2560, 0.5, (1, 4)), (9000, 512, 0.5, (1, 4, 16))],
)
def test_level_count(tmp_path, width, height, mpp, downsamples):
    path = tmp_path / "s.svs"
    write_slide(path, width=width, height=height, mpp=mpp, progress=False)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == mpp
        assert slide.properties["openslide.objective-power"] == ("40" if mpp < 0.375 else "20")
        assert slide.level_downsamples == pytest.approx(downsamples, rel=1e-3)
        assert max(slide.level_dimensions[-1]) <= 2048


def test_pixels_decode_with_correct_colours(cohort, pixels):
    """OpenSlide's level 0 equals the pre-JPEG render (a YCbCr/RGB mix-up would be off by tens)."""
    _, slides = cohort
    s = _tumor_slides(slides)[0]
    # The cohort derives each slide's seed from (cohort seed, index); rebuild that slide's scene.
    index = int(s.slide_id.split("_")[1])
    seed = int(np.random.SeedSequence([SEED, index]).generate_state(1)[0])
    scene = _Scene.create(width=W, height=H, mpp=MPP, tile_size=256, n_tumor=len(_polygons(s)), seed=seed)
    renderer = scene.renderer(1.0)
    # A 1024 px block around a tumour boundary: tumour, normal tissue and maybe background.
    x, y = _polygons(s)[0][0]
    x0, y0 = (min(max(int(x) - 512, 0), W - 1024) // 256) * 256, (min(max(int(y) - 512, 0), H - 1024) // 256) * 256
    expected = np.empty((1024, 1024, 3))
    for ty in range(0, 1024, 256):
        for tx in range(0, 1024, 256):
            tile = renderer.render(y0 + ty, x0 + tx, 256, 256)
            expected[ty : ty + 256, tx : tx + 256] = scene.background if tile is None else tile
    got = pixels[s.slide_id][0][y0 : y0 + 1024, x0 : x0 + 1024].astype(float)
    assert np.abs(got - expected).mean() < 3.0
    assert np.abs((got - expected).reshape(-1, 3).mean(0)).max() < 1.0


def test_background_is_scanner_white(cohort):
    _, slides = cohort
    with openslide.OpenSlide(slides[0].path) as slide:
        corner = np.asarray(slide.read_region((0, 0), 0, (64, 64)).convert("RGB")).reshape(-1, 3)
    assert _is_background(corner).all()
    assert np.abs(corner.mean(0) - 240).max() < 6


def test_levels_are_downsamples_of_level0(cohort, pixels):
    level0, level1 = pixels[_tumor_slides(cohort[1])[0].slide_id]
    boxed = level0.reshape(H // 4, 4, W // 4, 4, 3).sum(axis=(1, 3), dtype=np.int32) / 16.0
    # JPEG noise on fine texture is a few grey levels; a layout or texture
    # placement mismatch between levels would be tens.
    assert np.abs(level1 - boxed).mean() < 6.0


# --------------------------------------------------------------------------- #
# content and ground truth
# --------------------------------------------------------------------------- #


def _blocks(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k * k, img.shape[1] // k * k
    return img[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))


def test_tissue_covers_a_plausible_fraction(pixels):
    for _, level1 in pixels.values():
        tissue = ~_is_background(_blocks(level1, 8))
        assert 0.25 < tissue.mean() < 0.7


def test_annotations_lie_inside_tissue(cohort, pixels):
    _, slides = cohort
    for s in _tumor_slides(slides):
        # 8 µm blocks: real lumens inside the carcinoma crop are rarely that large.
        level1 = _blocks(pixels[s.slide_id][1], 8)
        inside = _mask(_polygons(s), level1.shape[:2], 32.0)
        assert inside.sum() > 100
        assert _is_background(level1[inside]).mean() < 0.05
        # Tissue continues beyond the tumour: a ring around it is tissue too.
        ring = isotropic_dilation(inside, 2) & ~inside
        assert _is_background(level1[ring]).mean() < 0.05
        assert _is_background(level1).mean() > 0.3  # the criterion does see background


def _colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    hist, _ = np.histogramdd(pixels.reshape(-1, 3), bins=bins, range=[(0, 256)] * 3)
    return hist.ravel() / hist.sum()


def test_tumor_pixels_look_like_tumor_texture(cohort, pixels):
    """Level-0 pixels inside annotations match the carcinoma crop, pixels elsewhere in tissue a normal crop."""

    def reference(name: str) -> np.ndarray:
        with (files("wsi") / "data" / name).open("rb") as fh:
            return _colour_histogram(np.asarray(Image.open(fh).convert("RGB")))

    refs = {name: reference(f"{name}.jpg") for name in ("normal_0", "normal_1", "normal_2", "tumor_0")}

    def nearest(hist: np.ndarray) -> str:
        return min(refs, key=lambda k: np.abs(refs[k] - hist).sum())

    rng = np.random.default_rng(0)
    tumor_slides = _tumor_slides(cohort[1])
    assert tumor_slides
    for s in tumor_slides:
        level0, level1 = pixels[s.slide_id]
        # Masks at level 1, pixels from level 0.
        tumor = _mask(_polygons(s), level1.shape[:2], 4.0)
        tissue = ~_is_background(level1)
        tumor_core = isotropic_erosion(tumor, 8)
        normal = isotropic_erosion(tissue, 8) & ~isotropic_dilation(tumor, 16)

        def sample(mask: np.ndarray) -> np.ndarray:
            px = level0[np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1)]
            assert len(px) > 50_000
            return px[rng.choice(len(px), 100_000)]

        tumor_hist = _colour_histogram(sample(tumor_core))
        normal_hist = _colour_histogram(sample(normal))
        assert nearest(tumor_hist) == "tumor_0"
        assert nearest(normal_hist).startswith("normal")
        assert np.abs(tumor_hist - normal_hist).sum() > 0.3


# --------------------------------------------------------------------------- #
# determinism and API
# --------------------------------------------------------------------------- #


def _snapshot(out: Path) -> tuple[str, dict[str, str], dict[str, bytes]]:
    labels = (out / "labels.csv").read_text()
    annotations = {p.name: p.read_text() for p in sorted((out / "annotations").glob("*.geojson"))}
    slides = {p.name: p.read_bytes() for p in sorted(out.glob("*.svs"))}
    return labels, annotations, slides


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path):
    kwargs = dict(n_slides=2, width=1024, height=768, progress=False)
    make_cohort(tmp_path / "a", seed=3, **kwargs)
    make_cohort(tmp_path / "b", seed=3, workers=2, **kwargs)
    make_cohort(tmp_path / "c", seed=4, **kwargs)
    a, b, c = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b"), _snapshot(tmp_path / "c")
    assert a == b  # labels, annotation coordinates and slide bytes
    assert a[1]  # there are annotations to compare
    assert a[1] != c[1] or a[0] != c[0]


def test_write_slide_returns_the_annotated_polygons(tmp_path):
    polygons = write_slide(tmp_path / "t.svs", width=2048, height=1536, n_tumor=3, seed=5, progress=False)
    assert len(polygons) == 3
    for poly in polygons:
        assert poly.ndim == 2 and poly.shape[1] == 2 and poly.dtype.kind == "f"
        assert np.array_equal(poly[0], poly[-1])
    masks = [_mask([p], (1536, 2048), 1.0) for p in polygons]
    assert all(m.sum() > 0 for m in masks)
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any() and not (masks[0] & masks[2]).any()
    assert write_slide(tmp_path / "n.svs", width=1024, height=1024, n_tumor=0, progress=False) == []
