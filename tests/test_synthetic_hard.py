"""The hard synthetic cohort (`make_cohort(preset="hard")`, `wsi synth --preset hard`): small tumour
fractions and clusters, several tumour textures, benign mimics in both classes, an inflammation
confounder gathered at tumour margins, per-slide stain / blur / JPEG variation -- and ground truth that
stays tumour only."""

from __future__ import annotations

import json
import re

import numpy as np
import openslide
import pytest
from skimage.draw import polygon as draw_polygon
from skimage.morphology import isotropic_dilation

from wsi.annotations import read_annotations
from wsi.cli import main
from wsi.store import TileStore
from wsi.synthetic import make_cohort
from wsi.synthetic.difficulty import PRESETS, Difficulty, resolve

W, H, MPP = 6144, 4608, 0.5  # 3 x 2.3 mm
DS = 16  # level-0 px per analysis pixel (8 µm)
SEED = 0
N = 12


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard")
    slides = make_cohort(out, n_slides=N, seed=SEED, width=W, height=H, mpp=MPP, preset="hard", workers=2,
                         progress=False)
    return out, slides, json.loads((out / "synth.json").read_text())


@pytest.fixture(scope="module")
def masks(hard):
    """Per slide, on an 8 µm grid: tissue (from the pixels), tumour, inflammation and mimic (from the files)."""
    out, slides, _ = hard
    shape = (H // DS, W // DS)
    res = {}
    for s in slides:
        with openslide.OpenSlide(s.path) as osr:
            level1 = np.asarray(osr.read_region((0, 0), 1, osr.level_dimensions[1]).convert("RGB")).astype(int)
        k = DS // 4
        blocks = level1[: shape[0] * k, : shape[1] * k].reshape(shape[0], k, shape[1], k, 3).mean(axis=(1, 3))
        tissue = ~((blocks.min(-1) > 215) & (blocks.max(-1) - blocks.min(-1) < 15))
        by_class = {"Tumor": [], "Inflammation": [], "Mimic": []}
        for path in (s.annotation_path, s.extra_annotation_path):
            if path is not None:
                for r in read_annotations(path):
                    by_class[r.name].append(r.exterior)
        res[s.slide_id] = {"tissue": tissue, "mean": level1[_full(tissue, level1.shape[:2], k)].mean(0),
                           **{c: _raster(p, shape) for c, p in by_class.items()}, "polygons": by_class}
    return res


def _full(mask: np.ndarray, shape, k: int) -> np.ndarray:
    full = np.zeros(shape, bool)
    up = np.repeat(np.repeat(mask, k, 0), k, 1)
    full[: up.shape[0], : up.shape[1]] = up
    return full


def _raster(polygons, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    for p in polygons:
        rr, cc = draw_polygon(p[:, 1] / DS, p[:, 0] / DS, shape)
        m[rr, cc] = True
    return m


def _area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _by_label(slides, label):
    return [s for s in slides if s.label == label]


def test_presets_and_options():
    assert PRESETS["easy"] == Difficulty()
    d = resolve("hard", mimics=(3, 3), blur=None)
    assert d.mimics == (3, 3) and d.blur == PRESETS["hard"].blur
    assert resolve("easy", jpeg_quality=70).jpeg_quality == (70, 70)
    with pytest.raises(TypeError, match="unknown cohort option"):
        resolve("easy", tumour=1)
    with pytest.raises(ValueError):
        resolve("nope")
    with pytest.raises(ValueError):
        resolve("hard", tumor_fraction=(0.1, 0.01))
    assert "inflammation_elsewhere" in make_cohort.__doc__ and "hard 0.005,0.05" in make_cohort.__doc__


def test_easy_is_the_plain_cohort(tmp_path):
    """The default writes no extra files but the record, and the explicit easy preset is the same cohort."""
    kw = dict(n_slides=2, seed=1, width=1024, height=768, progress=False)
    a = make_cohort(tmp_path / "a", **kw)
    make_cohort(tmp_path / "b", preset="easy", jpeg_quality=80, **kw)
    assert not (tmp_path / "a" / "annotations" / "extra").exists()
    assert all(s.extra_annotation_path is None and s.quality == 80 for s in a)
    for s in a:
        assert s.path.read_bytes() == (tmp_path / "b" / s.path.name).read_bytes()
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["preset"] == "easy"


def test_small_tumour_fractions_and_clusters(hard, masks):
    _, slides, record = hard
    tumour = _by_label(slides, "tumor")
    assert len(tumour) == N // 2
    n_small = 0
    for s in tumour:
        m = masks[s.slide_id]
        recorded = record["slides"][s.slide_id]["tumor_fraction"]
        assert 0.004 <= recorded <= 0.06, (s.slide_id, recorded)
        # Measured independently: polygon area over the tissue seen in the pixels.
        measured = sum(_area(p) for p in m["polygons"]["Tumor"]) / (m["tissue"].sum() * DS * DS)
        assert 0.003 <= measured <= 0.065, (s.slide_id, measured)
        n_small += sum(_area(p) * MPP**2 < 250.0**2 for p in m["polygons"]["Tumor"])  # under ~(250 µm)²
    assert n_small >= 3  # isolated clusters, a tile or a few at 0.5 µm/px
    assert sum(record["slides"][s.slide_id]["clusters"] for s in tumour) >= 3


def test_several_tumour_textures(hard):
    _, slides, record = hard
    per_slide = [record["slides"][s.slide_id]["tumor_textures"] for s in _by_label(slides, "tumor")]
    assert all(per_slide)
    assert len({t for ts in per_slide for t in ts}) >= 3
    assert any(len(ts) >= 2 for ts in per_slide)
    assert all(not record["slides"][s.slide_id]["tumor_textures"] for s in _by_label(slides, "normal"))


def test_inflammation_gathers_at_tumour_margins_and_occurs_in_normal_slides(hard, masks):
    _, slides, record = hard
    band_px = 200.0 / (DS * MPP)  # 200 µm: rims are 40-150 µm wide
    near = far = near_area = far_area = 0.0
    for s in _by_label(slides, "tumor"):
        m = masks[s.slide_id]
        band = isotropic_dilation(m["Tumor"], band_px) & ~m["Tumor"] & m["tissue"]
        rest = m["tissue"] & ~m["Tumor"] & ~band
        near += (m["Inflammation"] & band).sum()
        far += (m["Inflammation"] & rest).sum()
        near_area += band.sum()
        far_area += rest.sum()
        assert (m["Inflammation"] & m["Tumor"]).sum() <= 0.1 * m["Tumor"].sum()  # around the tumour, not on it
    assert near / near_area > 5 * far / far_area  # density at margins vs elsewhere in tumour slides
    assert near > far
    normal_with = [s for s in _by_label(slides, "normal") if masks[s.slide_id]["polygons"]["Inflammation"]]
    tumour_with = [s for s in _by_label(slides, "tumor") if masks[s.slide_id]["polygons"]["Inflammation"]]
    assert 1 <= len(normal_with) < len(tumour_with)

    def frac(label):
        return np.mean([record["slides"][s.slide_id]["inflammation_fraction"] for s in _by_label(slides, label)])

    assert frac("tumor") > 3 * frac("normal") > 0


def test_mimics_in_both_classes_and_not_on_tumour(hard, masks):
    _, slides, _ = hard
    for label in ("tumor", "normal"):
        assert any(masks[s.slide_id]["polygons"]["Mimic"] for s in _by_label(slides, label)), label
    for s in slides:
        m = masks[s.slide_id]
        assert (m["Mimic"] & m["Tumor"]).sum() <= 0.02 * max(m["Mimic"].sum(), 1)
        assert m["tissue"][m["Mimic"]].mean() > 0.95 if m["Mimic"].any() else True


def test_stain_blur_and_jpeg_vary_per_slide(hard, masks, tmp_path):
    _, slides, record = hard
    info = record["slides"]
    stains = np.array([info[s.slide_id]["stain"] for s in slides])
    assert stains.min() >= 0.75 and stains.max() <= 1.25 and stains.std(0).min() > 0.05
    assert len({round(info[s.slide_id]["blur_um"], 3) for s in slides}) == N
    # Mean tissue colour against the same cohort without stain jitter (same layouts, same draws otherwise):
    # the stain moves it, and by a different amount on every slide.
    plain = make_cohort(tmp_path, n_slides=N, seed=SEED, width=W, height=H, mpp=MPP, preset="hard", stain_jitter=0,
                        workers=2, progress=False)
    shift = []
    for s, p in zip(slides, plain):
        assert info[s.slide_id]["tumor_fraction"] == json.loads((tmp_path / "synth.json").read_text())[
            "slides"][p.slide_id]["tumor_fraction"]  # the same layout
        with openslide.OpenSlide(p.path) as osr:
            level1 = np.asarray(osr.read_region((0, 0), 1, osr.level_dimensions[1]).convert("RGB")).astype(int)
        tissue = _full(masks[s.slide_id]["tissue"], level1.shape[:2], DS // 4)
        shift.append(masks[s.slide_id]["mean"] - level1[tissue].mean(0))
    shift = np.array(shift)
    assert np.linalg.norm(shift, axis=1).mean() > 5.0  # grey levels
    assert shift.std(0).max() > 4.0
    # JPEG quality: drawn per slide, recorded, and the one the TIFF says it has.
    qualities = [s.quality for s in slides]
    assert len(set(qualities)) >= 4 and 60 <= min(qualities) and max(qualities) <= 95
    for s in slides:
        assert info[s.slide_id]["quality"] == s.quality
        with openslide.OpenSlide(s.path) as osr:
            assert re.search(r"Q=(\d+)", osr.properties["tiff.ImageDescription"]).group(1) == str(s.quality)


def test_extra_regions_are_separate_and_wsi_labels_labels_only_tumour(hard, masks, tmp_path):
    out, slides, _ = hard
    assert not list((out / "annotations").glob("*.geojson.*"))
    assert {p.stem for p in (out / "annotations").glob("*.geojson")} == {s.slide_id for s in _by_label(slides, "tumor")}
    classes = {r.name for s in slides if s.extra_annotation_path for r in read_annotations(s.extra_annotation_path)}
    assert classes == {"Inflammation", "Mimic"}
    store_path = tmp_path / "hard.zarr"
    assert main(["-q", "tile", str(out), "--store", str(store_path), "--no-tiles", "--no-progress", "--workers", "1",
                 "--patch-size", "64"]) == 0
    assert main(["-q", "labels", str(store_path), "--annotations", str(out / "annotations"), "--no-progress"]) == 0
    store = TileStore.open(store_path, readonly=True)
    n_confounder_tiles = 0
    for s in slides:
        view = store[s.slide_id]
        lab = np.asarray(view.labels("tumor"))
        centre = (np.asarray(view.coords) + view.meta.tile_size_level0 / 2) // DS
        cy = np.clip(centre[:, 1].astype(int), 0, H // DS - 1)
        cx = np.clip(centre[:, 0].astype(int), 0, W // DS - 1)
        m = masks[s.slide_id]
        other = (m["Inflammation"] | m["Mimic"])[cy, cx] & ~isotropic_dilation(m["Tumor"], 4)[cy, cx]
        n_confounder_tiles += other.sum()
        assert not (lab[other] > 0).any(), s.slide_id  # inflammation and mimics are not tumour
        if s.label == "normal":
            assert not lab.any()
        else:
            assert (lab > 0.5).sum() >= 1
            assert m["Tumor"][cy, cx][lab > 0.5].mean() > 0.9
    assert n_confounder_tiles > 100


def test_hard_is_deterministic_and_independent_of_workers(tmp_path):
    kw = dict(n_slides=3, seed=4, width=2048, height=1536, mpp=0.5, preset="hard", progress=False)
    make_cohort(tmp_path / "a", **kw)
    make_cohort(tmp_path / "b", workers=2, **kw)
    for p in sorted((tmp_path / "a").rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p.name


def test_texture_variants_are_real_transformed_pixels():
    """Grades differ from the carcinoma crop; the reactive mimic is closer to it than any normal crop, not
    equal; the inflammation texture has more dark-nuclear area in smaller pieces than tumour or normal skin."""
    from skimage import color, measure

    from wsi.synthetic.textures import (INFLAMMATION_TEXTURE, MIMIC_TEXTURES, TUMOR_TEXTURES, _load_texture,
                                        _native_mpp)

    def hist(name):
        h, _ = np.histogramdd(_load_texture(name).reshape(-1, 3), bins=8, range=[(0, 256)] * 3)
        return h.ravel() / h.sum()

    def dist(a, b):
        return float(np.abs(hist(a) - hist(b)).sum())

    normals = ("normal_0.jpg", "normal_1.jpg", "normal_2.jpg")
    tumour = TUMOR_TEXTURES[0]
    for name in (*TUMOR_TEXTURES[1:], *MIMIC_TEXTURES, INFLAMMATION_TEXTURE):
        img = _load_texture(name)
        assert img.dtype == np.uint8 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
        assert img.std() > 20  # texture, not a flat colour
    assert all(dist(t, tumour) > 0.1 for t in TUMOR_TEXTURES[1:])
    assert 0.1 < dist("mimic_reactive", tumour) < min(dist(n, tumour) for n in normals)

    threshold = np.quantile(color.rgb2hed(_load_texture(tumour))[..., 0], 0.8)

    def nuclei(name):  # dark-nuclear area fraction, median piece area in µm²
        dark = color.rgb2hed(_load_texture(name))[..., 0] > threshold
        areas = np.bincount(measure.label(dark).ravel())[1:]
        return dark.mean(), np.median(areas[areas > 5]) * _native_mpp(name) ** 2

    frac, size = nuclei(INFLAMMATION_TEXTURE)
    for other in (tumour, *normals):
        f, s = nuclei(other)
        assert frac > f and size < 0.5 * s, other
