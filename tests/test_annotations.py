"""Annotations -> per-tile labels: readers, exact fractions on known shapes, the store, `wsi labels`."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_store
from wsi import annotations as ann
from wsi.annotations import (AnnotationError, Region, label_store, parse_geojson, read_annotations,
                             select_regions, tile_fractions, tiles_geojson)
from wsi.annotations import raster
from wsi.cli import main
from wsi.errors import PathmilError, StoreError
from wsi.store import SlideMeta, TileStore

T = 512  # tile side, level-0 px


def sq(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def grid(nx, ny, size=T, origin=(0, 0)) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(nx) * size + origin[0], np.arange(ny) * size + origin[1])
    return np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int32)


def feature(geometry: dict, cls: str | None = "Tumor", **props) -> dict:
    p = dict(props)
    if cls is not None:
        p["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **p}}


def oracle(regions: list[Region], coords: np.ndarray, size: float, k: int = 64) -> np.ndarray:
    """Independent reference: point sampling at k x k points per tile with matplotlib's point-in-polygon."""
    from matplotlib.path import Path as MPath

    off = (np.arange(k) + 0.5) / k * size
    px, py = np.meshgrid(off, off)
    out = []
    for x, y in coords:
        pts = np.stack([px.ravel() + x, py.ravel() + y], 1)
        inside = np.zeros(len(pts), bool)
        for r in regions:
            if r.exclude:
                continue
            m = MPath(r.exterior).contains_points(pts)
            for h in r.holes:
                m &= ~MPath(h).contains_points(pts)
            inside |= m
        for r in regions:
            if r.exclude:
                inside &= ~MPath(r.exterior).contains_points(pts)
        out.append(inside.mean())
    return np.array(out)


# ---- fractions on shapes with known areas -------------------------------------------------------
def test_square_covers_tile_a_fully_and_half_of_tile_b():
    regions = [Region("Tumor", np.array(sq(0, 0, 1.5 * T, T), float))]
    f = tile_fractions(regions, grid(3, 1), T)
    assert f.dtype == np.float32 and f.shape == (3,)
    np.testing.assert_allclose(f, [1.0, 0.5, 0.0], atol=1e-6)
    assert ((f > ann.POSITIVE_FRACTION) == [True, False, False]).all()   # exactly half is not positive


def test_polygon_with_hole_and_multipolygon_from_geojson(tmp_path):
    hole = {"type": "Polygon", "coordinates": [sq(0, 0, 2 * T, 2 * T), sq(T / 2, T / 2, 1.5 * T, 1.5 * T)]}
    multi = {"type": "MultiPolygon", "coordinates": [[sq(3 * T, 0, 4 * T, T)],
                                                     [sq(3 * T, T, 3.5 * T, 2 * T)]]}
    p = tmp_path / "s.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [feature(hole), feature(multi)]}))
    regions = read_annotations(p)
    assert [len(r.holes) for r in regions] == [1, 0, 0]
    assert regions[0].area() == pytest.approx(4 * T * T - T * T)
    f = tile_fractions(regions, grid(4, 2), T)
    # row 0: tiles (0,0) (1,0) lose a quarter each to the hole; (2,0) empty; (3,0) full
    np.testing.assert_allclose(f, [0.75, 0.75, 0, 1, 0.75, 0.75, 0, 0.5], atol=1e-6)


def test_holes_do_not_erase_other_regions():
    # an island inside another polygon's hole stays in (union of polygons minus their own holes)
    donut = Region("Tumor", np.array(sq(0, 0, 3 * T, 3 * T), float), (np.array(sq(T, T, 2 * T, 2 * T), float),))
    island = Region("Tumor", np.array(sq(T, T, 1.5 * T, 2 * T), float))
    f = tile_fractions([donut, island], grid(3, 3), T)
    assert f[4] == pytest.approx(0.5) and np.allclose(np.delete(f, 4), 1)


@pytest.mark.parametrize("angle", [0.3, 0.9])
def test_rotated_square_and_triangle_match_analytic_area(angle):
    c, s = math.cos(angle), math.sin(angle)
    half = 1.3 * T
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]]) @ [[c, s], [-s, c]]
    rot = Region("Tumor", corners + 3 * T + 17)
    tri = Region("Tumor", np.array([[7 * T + 5, 100], [11 * T - 30, 400], [8 * T, 4 * T + 77]], float))
    coords = grid(12, 6, origin=(0, 0))
    for r in (rot, tri):
        f = tile_fractions([r], coords, T)
        assert f.sum() * T * T == pytest.approx(r.area(), rel=0.03)
        np.testing.assert_allclose(f, oracle([r], coords, T), atol=0.05)


def test_asap_xml_tumor_group_minus_exclusion(tmp_path):
    def coords_xml(pts):
        return "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts))

    outer = [(0, 0), (2 * T, 0), (2 * T, 2 * T), (0, 2 * T)]
    excl = [(T / 2, T / 2), (1.5 * T, T / 2), (1.5 * T, 1.5 * T), (T / 2, 1.5 * T)]
    rect = [(3 * T, 0), (3.5 * T, 0), (3.5 * T, T), (3 * T, T)]
    spline = [(f"{x}".replace(".", ","), y) for x, y in [(0, 3 * T), (T, 3 * T), (T, 4 * T), (0, 4 * T)]]
    xml = ('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
           f'<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">'
           f'<Coordinates>{coords_xml(outer[::-1])}</Coordinates></Annotation>'
           f'<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2"><Coordinates>'
           f'{coords_xml(excl)}</Coordinates></Annotation>'
           f'<Annotation Name="Annotation 2" Type="Rectangle" PartOfGroup="Tumor"><Coordinates>'
           f'{coords_xml(rect)}</Coordinates></Annotation>'
           f'<Annotation Name="Annotation 3" Type="Spline" PartOfGroup="_1"><Coordinates>'
           f'{coords_xml(spline)}</Coordinates></Annotation>'
           '<Annotation Name="d" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="1" Y="1"/>'
           '</Coordinates></Annotation>'
           '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None"/></AnnotationGroups>'
           '</ASAP_Annotations>')
    p = tmp_path / "tumor_001.xml"
    p.write_text(xml)
    regions = read_annotations(p)
    assert [(r.name, r.exclude) for r in regions] == [("_0", False), ("_2", True), ("Tumor", False), ("_1", False)]
    f = tile_fractions(regions, grid(4, 4), T)
    np.testing.assert_allclose(f.reshape(4, 4), [[0.75, 0.75, 0, 0.5], [0.75, 0.75, 0, 0],
                                                [0, 0, 0, 0], [1, 0, 0, 0]], atol=1e-6)
    # exclusions apply whatever classes are chosen
    only0 = select_regions(regions, ["_0"])
    assert [r.name for r in only0] == ["_0", "_2"]
    assert tile_fractions(only0, grid(2, 1), T).tolist() == [0.75, 0.75]


def test_qupath_list_of_features_classes_and_object_types(tmp_path):
    feats = [
        feature({"type": "Polygon", "coordinates": [sq(0, 0, T, T)]}, "Tumor"),
        feature({"type": "Polygon", "coordinates": [sq(T, 0, 2 * T, T)]}, "Stroma"),
        feature({"type": "Polygon", "coordinates": [sq(2 * T, 0, 3 * T, T)]}, "Ignore*"),
        feature({"type": "Polygon", "coordinates": [sq(3 * T, 0, 4 * T, T)]}, None, name="my tumor"),
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [sq(4 * T, 0, 5 * T, T)]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}},
        feature({"type": "Point", "coordinates": [10, 10]}, "Tumor"),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Tumor"),
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    p = tmp_path / "slide.geojson"
    p.write_text(json.dumps(feats))   # QuPath's "export as list of features"
    regions = read_annotations(p)
    assert [r.name for r in regions] == ["Tumor", "Stroma", "Ignore*", "my tumor"]
    coords = grid(5, 1)
    assert tile_fractions(select_regions(regions), coords, T).tolist() == [1, 1, 0, 1, 0]
    assert tile_fractions(select_regions(regions, ["tumor"]), coords, T).tolist() == [1, 0, 0, 0, 0]
    assert tile_fractions(select_regions(regions, ["Ignore*", "Stroma"]), coords, T).tolist() == [0, 1, 1, 0, 0]
    # a single Feature and a bare geometry read too
    assert len(parse_geojson(json.dumps(feats[0]))) == 1
    assert len(parse_geojson(json.dumps(feats[0]["geometry"]))) == 1


@pytest.mark.parametrize("name,text,match", [
    ("a.geojson", "{not json", "not valid JSON"),
    ("b.geojson", json.dumps({"type": "Topology"}), "expected a GeoJSON FeatureCollection"),
    ("c.geojson", json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry":
                              {"type": "Polygon", "coordinates": [[["x", 1], [2, 3], [4, 5]]]}}]}),
     "feature 0: a ring is not a list"),
    ("d.geojson", json.dumps([{"type": "Feature", "geometry": {"type": "Curve", "coordinates": []}}]),
     "unsupported geometry type 'Curve'"),
    ("e.xml", "<ASAP_Annotations><Annotations>", "not valid XML"),
    ("f.xml", "<svg></svg>", r"not an ASAP annotation file \(root element <svg>"),
    ("g.xml", '<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon"><Coordinates>'
              '<Coordinate Order="0" X="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
     "annotation 'A': a Coordinate without numeric X and Y"),
    ("h.json", json.dumps({"type": "FeatureCollection", "features": [3]}), "item 0 is not a GeoJSON Feature"),
])
def test_malformed_files_give_one_line_errors(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(AnnotationError, match=match) as e:
        read_annotations(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_empty_inputs_bounded_canvas_and_strips(monkeypatch):
    r = Region("Tumor", np.array([[100, 50], [3000, 400], [1800, 2900]], float))
    assert tile_fractions([r], np.zeros((0, 2)), T).shape == (0,)
    assert tile_fractions([], grid(2, 2), T).tolist() == [0, 0, 0, 0]
    assert tile_fractions([r], grid(2, 2, origin=(10 * T, 0)), T).tolist() == [0, 0, 0, 0]  # far away
    coords = grid(7, 7, size=300)
    ref = tile_fractions([r], coords, 300)
    monkeypatch.setattr(raster, "STRIP_PX", 500)          # many strips: the same answer
    np.testing.assert_array_equal(tile_fractions([r], coords, 300), ref)
    monkeypatch.setattr(raster, "MAX_CANVAS_PX", 5_000)   # coarser raster: still close
    coarse = tile_fractions([r], coords, 300)
    assert np.abs(coarse - ref).max() < 0.2 and coarse.sum() == pytest.approx(ref.sum(), rel=0.02)


# ---- the QuPath GeoJSON writer, read back ----------------------------------------------------------
def test_tiles_geojson_reads_back_exactly(tmp_path):
    coords = np.array([[0, 0], [T, 0], [3 * T + 7, 2 * T + 1], [123457, 98765]], np.int64)
    score = np.array([0.1, 0.123456, 0.99999, 0.5])
    p = tmp_path / "s1_run.geojson"
    p.write_text(json.dumps(tiles_geojson(coords, T, {"instance_score": score}), separators=(",", ":")))
    assert read_annotations(p) == []                      # tiles are not annotations: never taken for labels
    regions = read_annotations(p, object_types={"tile"})
    assert [r.name for r in regions] == [f"tile {i}" for i in range(len(coords))]
    for r, (x, y) in zip(regions, coords.tolist()):
        np.testing.assert_array_equal(r.exterior, [[x, y], [x + T, y], [x + T, y + T], [x, y + T], [x, y]])
        assert r.holes == () and not r.exclude and r.area() == T * T
    # each tile is exactly covered by its own polygon and untouched by the others
    assert tile_fractions(regions, coords, T).tolist() == [1, 1, 1, 1]
    assert tile_fractions(regions[1:2], coords, T).tolist() == [0, 1, 0, 0]
    feats = json.loads(p.read_text())["features"]
    assert [f["properties"]["measurements"]["instance_score"] for f in feats] == [0.1, 0.1235, 1.0, 0.5]
    assert {f["properties"]["objectType"] for f in feats} == {"tile"}


# ---- the store -----------------------------------------------------------------------------------
def annotated_store(path: Path, slides: dict[str, np.ndarray], size0: int = T) -> Path:
    """Slides tiled at 0.5 µm/px from 0.25 µm/px: 256 px tiles covering `size0` level-0 px."""
    make_store(path, {sid: {"coords": c} for sid, c in slides.items()}, tile_size=size0 // 2, size0=size0)
    return path


def test_store_label_methods(tmp_path):
    view = TileStore.open(annotated_store(tmp_path / "s.zarr", {"a": grid(3, 1)}))["a"]
    assert view.labels("tumor") is None and view.label_names() == []
    view.write_labels("tumor", [0.0, 0.6, 1.0], {"n_positive": 2})
    view.write_labels("tumor", np.array([0.0, 0.25, 1.0]), {"n_positive": 1})   # replaced
    view.write_labels("stroma", np.zeros(3), {})
    got = view.labels("tumor")
    assert got.dtype == np.float32 and got.tolist() == [0, 0.25, 1]
    assert view.label_names() == ["stroma", "tumor"] and view.label_meta("tumor")["n_positive"] == 1
    assert TileStore.open(tmp_path / "s.zarr", readonly=True)["a"].info()["labels"] == ["stroma", "tumor"]
    with pytest.raises(ValueError, match="do not match 3 tiles"):
        view.write_labels("tumor", np.zeros(4), {})
    with pytest.raises(ValueError, match="invalid label name"):
        view.write_labels("../evil", np.zeros(3), {})


def test_label_store_matches_files_and_reports(tmp_path, caplog):
    store_path = annotated_store(tmp_path / "s.zarr", {"tumor_001": grid(3, 1), "normal_001": grid(2, 2),
                                                       "broken": grid(1, 1), "dup": grid(1, 1)})
    TileStore.open(store_path).begin_slide(SlideMeta("writing_one"))     # never completed: skipped
    d = tmp_path / "ann"
    d.mkdir()
    (d / "tumor_001.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [feature({"type": "Polygon", "coordinates": [sq(0, 0, 1.5 * T, T)]})]}))
    (d / "broken.xml").write_text("<ASAP_Annotations>")
    (d / "dup.geojson").write_text("[]")
    (d / "dup.svs.geojson").write_text("[]")
    (d / "orphan.xml").write_text("<ASAP_Annotations/>")
    (d / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.INFO, logger="wsi.annotations"):
        res = label_store(store_path, d, progress=False)
    by = {r.slide_id: r for r in res}
    assert {k: r.status for k, r in by.items()} == {"tumor_001": "labelled", "normal_001": "negative",
                                                    "broken": "failed", "dup": "failed",
                                                    "writing_one": "skipped"}
    assert "broken.xml: not valid XML" in by["broken"].error and "2 annotation files" in by["dup"].error
    assert "1 annotation files match no slide" in caplog.text and "orphan.xml" in caplog.text
    assert "1 slides have no annotation file; labelled all negative" in caplog.text
    store = TileStore.open(store_path, readonly=True)
    assert store["tumor_001"].labels("tumor").tolist() == [1, 0.5, 0]
    assert store["normal_001"].labels("tumor").tolist() == [0, 0, 0, 0]
    assert store["broken"].labels("tumor") is None
    a = store["tumor_001"].label_meta("tumor")
    assert a["source"].endswith("tumor_001.geojson") and a["classes"] == ["Tumor"] and a["n_positive"] == 1
    assert a["rule"] == "positive if fraction > 0.5" and a["tile_size_level0"] == T
    assert store["normal_001"].label_meta("tumor")["source"] is None
    # --missing skip, another name, an explicit file list
    res = label_store(store_path, [d / "tumor_001.geojson"], name="t2", missing="skip", progress=False)
    assert {r.slide_id: r.status for r in res}["normal_001"] == "skipped"
    assert TileStore.open(store_path, readonly=True)["normal_001"].label_names() == ["tumor"]
    with pytest.raises(AnnotationError, match="no such file or folder"):
        label_store(store_path, tmp_path / "nope", progress=False)


def test_label_store_needs_the_tile_size_and_an_existing_store(tmp_path):
    # a features-only import whose h5 files gave no patch size: no tile side at level 0 to label with
    store_path = tmp_path / "s.zarr"
    make_store(store_path, {"imp": {"coords": grid(2, 1)}, "ok": {"coords": grid(2, 1)}}, tile_size=T // 2,
               size0=T)
    make_store(store_path, {"imp": {"coords": grid(2, 1)}}, kind="features-only", tile_size_level0=None,
               patch_size=None)
    assert TileStore.open(store_path, readonly=True)["imp"].meta.tile_size_level0 is None
    square = [feature({"type": "Polygon", "coordinates": [sq(0, 0, T, T)]})]
    for sid in ("imp", "ok"):
        (tmp_path / f"{sid}.geojson").write_text(json.dumps(square))
    res = {r.slide_id: r for r in label_store(store_path, [tmp_path / "imp.geojson", tmp_path / "ok.geojson"],
                                              progress=False)}
    assert res["ok"].status == "labelled" and res["ok"].n_positive == 1
    assert res["imp"].status == "failed"
    assert "slide 'imp' does not record its tile size at level 0; import it again" in res["imp"].error
    assert TileStore.open(store_path, readonly=True)["imp"].labels("tumor") is None
    # label_store only opens: a typo is an error, not a new empty store
    with pytest.raises(StoreError, match="typo.zarr: no tile store here") as e:
        label_store(tmp_path / "typo.zarr", tmp_path / "ok.geojson", progress=False)
    assert isinstance(e.value, PathmilError) and not (tmp_path / "typo.zarr").exists()


def test_wsi_labels_cli(tmp_path, capsys):
    store_path = annotated_store(tmp_path / "s.zarr", {"s1": grid(2, 1), "s2": grid(2, 1)})
    f = tmp_path / "s1.geojson"
    f.write_text(json.dumps([feature({"type": "Polygon", "coordinates": [sq(0, 0, T, T)]}, "Tumor"),
                             feature({"type": "Polygon", "coordinates": [sq(T, 0, 2 * T, T)]}, "Stroma")]))
    assert main(["-q", "labels", str(store_path), "--annotations", str(f), "--classes", "Tumor"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:-2]}
    assert rows == {"s1": ["labelled", "2", "1", "s1.geojson"], "s2": ["negative", "2", "0", "-"]}
    assert "1 labelled from annotations, 1 all negative" in out
    assert out.splitlines()[-1] == "classes used: Tumor (1 slide); excluded: none; ignored: Stroma (1 slide)"
    assert main(["-q", "labels", str(store_path), "--annotations", str(f), "--name", "all", "--json"]) == 0
    assert {r["slide_id"]: r["n_positive"] for r in json.loads(capsys.readouterr().out)} == {"s1": 2, "s2": 0}
    assert main(["-q", "labels", str(tmp_path / "none.zarr"), "--annotations", str(f)]) == 2
    err = capsys.readouterr().err
    assert "none.zarr: no tile store here" in err and err.count("\n") == 1 and not (tmp_path / "none.zarr").exists()
    assert main(["-q", "labels", str(store_path), "--annotations", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


# ---- a synthetic cohort, end to end --------------------------------------------------------------
def test_synth_cohort_labels_follow_the_geojson(tmp_path, synth_cohort):
    store_path = tmp_path / "synth.zarr"
    assert main(["-q", "tile", str(synth_cohort), "--store", str(store_path), "--no-tiles", "--no-progress",
                 "--workers", "1", "--patch-size", "128"]) == 0
    assert main(["-q", "labels", str(store_path), "--annotations", str(synth_cohort / "annotations"),
                 "--no-progress"]) == 0
    store = TileStore.open(store_path, readonly=True)
    truth = dict(line.split(",") for line in (synth_cohort / "labels.csv").read_text().split()[1:])
    for sid, label in truth.items():
        view = store[sid]
        lab = view.labels("tumor")
        assert lab is not None and lab.shape == (view.n_tiles,)
        if label == "normal":
            assert not lab.any()
            continue
        regions = read_annotations(synth_cohort / "annotations" / f"{sid}.geojson")
        size = view.meta.tile_size_level0
        assert (lab > 0.5).sum() > 0
        np.testing.assert_allclose(lab, oracle(regions, view.coords, size, k=32), atol=0.06)
