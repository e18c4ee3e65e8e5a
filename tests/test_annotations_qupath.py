"""Annotations as QuPath really writes them (0.2, 0.3 and >= 0.4 GeoJSON): which objects are regions,
their classes, excluded and ignored classes, and what `wsi labels` says about them. Each snippet is in
the exact shape of that QuPath version's export."""
from __future__ import annotations

import json
import logging

import numpy as np

from test_annotations import T, annotated_store, grid, sq
from wsi.annotations import label_store, object_type, read_annotations, select_regions, tile_fractions
from wsi.cli import main
from wsi.store import TileStore


def polygon(col: int, frac: float = 1.0) -> dict:
    """A square over the left `frac` of tile `col` of a row of T px tiles."""
    return {"type": "Polygon", "coordinates": [sq(col * T, 0, col * T + frac * T, T)]}


def qupath02(kind: str, col: int, cls: str | None = "Tumor", **extra) -> dict:
    """QuPath 0.2: the Java class in "id", no objectType, classification {name, colorRGB}."""
    props = {"isLocked": False, "measurements": []}
    if cls is not None:
        props["classification"] = {"name": cls, "colorRGB": -3670016}
    return {"type": "Feature", "id": kind, "geometry": polygon(col), "properties": props, **extra}


def qupath04(col: int, classification: dict | None, obj: str = "annotation", frac: float = 1.0) -> dict:
    """QuPath >= 0.4: a UUID "id", properties.objectType, classification {name | names, color}."""
    props: dict = {"objectType": obj}
    if classification is not None:
        props["classification"] = {**classification, "color": [200, 0, 0]}
    return {"type": "Feature", "id": f"0b6a2c1e-6d1f-4c1e-9a55-00000000000{col % 10}", "geometry": polygon(col, frac),
            "properties": props}


def write(path, features: list[dict], collection: bool = True):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features} if collection else features))
    return path


def fractions(regions, n: int) -> list[float]:
    return tile_fractions(regions, grid(n, 1), T).tolist()


def test_qupath_02_object_type_in_id_and_legacy_object_type(tmp_path):
    """0.2 wrote the object type as the feature's "id", 0.3 as `object_type`: only annotations are regions."""
    feats = [qupath02("PathAnnotationObject", 0),
             qupath02("PathDetectionObject", 1),
             qupath02("PathCellObject", 2, nucleusGeometry=polygon(2, 0.5)),
             qupath02("PathTileObject", 3, cls=None),
             {"type": "Feature", "id": "PathDetectionObject", "geometry": polygon(4),
              "properties": {"object_type": "detection", "classification": {"name": "Tumor", "colorRGB": -3670016}}},
             {"type": "Feature", "id": "PathAnnotationObject", "geometry": polygon(5),
              "properties": {"object_type": "annotation", "isLocked": False,
                             "classification": {"name": "Tumor", "colorRGB": -3670016}}},
             {"type": "Feature", "geometry": polygon(6), "properties": {"object_type": "cell"}}]
    assert [object_type(f) for f in feats] == ["annotation", "detection", "cell", "tile", "detection", "annotation",
                                              "cell"]
    p = write(tmp_path / "qp02.json", feats, collection=False)       # 0.2 exported a bare list
    regions = read_annotations(p)
    assert [r.name for r in regions] == ["Tumor", "Tumor"]
    assert fractions(select_regions(regions), 7) == [1, 0, 0, 0, 0, 1, 0]
    # the types are told apart, not dropped: asking for cells gives the two cells
    assert fractions(read_annotations(p, object_types={"cell"}), 7) == [0, 0, 1, 0, 0, 0, 1]


def test_qupath_derived_classes_04_names_and_03_parent_class(tmp_path, caplog):
    """>= 0.4 `names: [base, ...]` and <= 0.3 `parentClass` give "Tumor: Positive"; `--classes Tumor` matches
    it by its base class, `--classes "Tumor: Positive"` by its full name."""
    feats = [qupath04(0, {"names": ["Tumor", "Positive"]}),
             qupath04(1, {"names": ["Tumor", "Negative"]}),
             qupath04(2, {"name": "Stroma"}),
             {"type": "Feature", "id": "PathAnnotationObject", "geometry": polygon(3),
              "properties": {"object_type": "annotation", "classification": {
                  "parentClass": {"name": "Tumor", "colorRGB": -3670016}, "name": "Positive", "colorRGB": -377282}}}]
    p = write(tmp_path / "s1.geojson", feats)
    regions = read_annotations(p)
    assert [r.name for r in regions] == ["Tumor: Positive", "Tumor: Negative", "Stroma", "Tumor: Positive"]
    assert fractions(select_regions(regions, ["Tumor"]), 4) == [1, 1, 0, 1]
    assert fractions(select_regions(regions, ["tumor: positive"]), 4) == [1, 0, 0, 1]
    store = annotated_store(tmp_path / "s.zarr", {"s1": grid(4, 1)})
    with caplog.at_level(logging.WARNING, logger="wsi.annotations"):
        (res,) = label_store(store, p, classes=["Tumor"], progress=False)
    assert res.n_positive == 3 and res.classes == ["Tumor: Negative", "Tumor: Positive"]
    assert res.ignored == ["Stroma"] and "found in no annotation file" not in caplog.text
    meta = TileStore.open(store, readonly=True)["s1"].label_meta("tumor")
    assert meta["classes"] == ["Tumor: Negative", "Tumor: Positive"] and meta["ignored_classes"] == ["Stroma"]


def test_a_file_of_only_cells_and_detections_warns_naming_it(tmp_path, caplog):
    p = write(tmp_path / "s1.geojson", [qupath04(0, {"name": "Tumor"}, obj="cell"),
                                        qupath04(1, {"name": "Tumor"}, obj="cell"),
                                        qupath04(2, {"name": "Tumor"}, obj="detection")])
    store = annotated_store(tmp_path / "s.zarr", {"s1": grid(3, 1)})
    with caplog.at_level(logging.WARNING, logger="wsi.annotations"):
        (res,) = label_store(store, p, progress=False)
    assert res.status == "labelled" and res.n_positive == 0
    warned = [r.getMessage() for r in caplog.records if "s1.geojson" in r.getMessage()]
    assert len(warned) == 1 and "only 2 cell, 1 detection objects" in warned[0], caplog.text
    assert "convert the detections to annotations" in warned[0]
    # a file with annotations among its cells says nothing of the kind
    caplog.clear()
    write(p, [qupath04(0, {"name": "Tumor"}), qupath04(1, {"name": "Tumor"}, obj="cell")])
    with caplog.at_level(logging.WARNING, logger="wsi.annotations"):
        (res,) = label_store(store, p, progress=False)
    assert res.n_positive == 1 and "only" not in caplog.text


def test_exclude_classes_are_subtracted_and_the_summary_names_every_class(tmp_path, capsys, caplog):
    """`--exclude-classes artifact,background` subtracts like a hole; `_2` still is; the summary names the
    classes used, excluded and ignored."""
    feats = [qupath04(0, {"name": "Tumor"}), qupath04(1, {"name": "Tumor"}),
             qupath04(0, {"name": "artifact"}, frac=0.5),
             {"type": "Feature", "id": "1", "geometry": {"type": "Polygon", "coordinates": [
                 sq(T, 0, 1.25 * T, T)]}, "properties": {"objectType": "annotation", "classification": {"name": "_2"}}},
             qupath04(2, {"name": "Stroma"})]
    p = write(tmp_path / "s1.geojson", feats)
    store = annotated_store(tmp_path / "s.zarr", {"s1": grid(3, 1)})
    regions = read_annotations(p)
    assert fractions(select_regions(regions, ["Tumor"]), 3) == [1, 0.75, 0]          # artifact counts as nothing
    assert fractions(select_regions(regions, ["Tumor"], exclude=["Artifact"]), 3) == [0.5, 0.75, 0]
    with caplog.at_level(logging.WARNING, logger="wsi.annotations"):
        assert main(["-q", "labels", str(store), "--annotations", str(p), "--classes", "Tumor",
                     "--exclude-classes", "artifact,background"]) == 0
    out = capsys.readouterr().out
    assert TileStore.open(store, readonly=True)["s1"].labels("tumor").tolist() == [0.5, 0.75, 0]
    assert out.splitlines()[-1] == ("classes used: Tumor (1 slide); excluded: _2 (1 slide), artifact (1 slide); "
                                    "ignored: Stroma (1 slide)")
    assert "exclude classes found in no annotation file: background" in caplog.text
    meta = TileStore.open(store, readonly=True)["s1"].label_meta("tumor")
    assert meta["excluded_classes"] == ["_2", "artifact"] and meta["exclude_classes"] == ["artifact", "background"]
    # a class both chosen and excluded: one line, exit 2
    assert main(["-q", "labels", str(store), "--annotations", str(p), "--classes", "Tumor,artifact",
                 "--exclude-classes", "artifact"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "class artifact is both chosen (--classes) and subtracted" in err


def test_ignore_rule_is_qupaths_literal_region_and_ignore_classes(tmp_path):
    feats = [qupath04(0, {"name": "Regional metastasis"}), qupath04(1, {"name": "Region*"}),
             qupath04(2, {"name": "Ignore*"}), qupath04(3, {"name": "Ignored margin"}),
             qupath04(4, {"names": ["Region*", "Positive"]})]
    p = write(tmp_path / "s1.geojson", feats)
    regions = read_annotations(p)
    assert fractions(select_regions(regions), 5) == [1, 0, 0, 1, 0]
    store = annotated_store(tmp_path / "s.zarr", {"s1": grid(5, 1)})
    (res,) = label_store(store, p, progress=False)
    assert res.classes == ["Ignored margin", "Regional metastasis"]
    assert res.ignored == ["Ignore*", "Region*", "Region*: Positive"]


def test_warning_listing_a_files_classes_names_unclassified_regions(tmp_path, caplog):
    feats = [qupath04(0, None), qupath04(1, {"name": "Stroma"}),
             qupath02("PathAnnotationObject", 2, cls=None)]
    p = write(tmp_path / "s1.geojson", feats)
    store = annotated_store(tmp_path / "s.zarr", {"s1": grid(3, 1)})
    with caplog.at_level(logging.WARNING, logger="wsi.annotations"):
        (res,) = label_store(store, p, classes=["Tumor"], progress=False)
    assert f"{p}: no region of the chosen classes (Tumor); it has: Stroma, unclassified" in caplog.text
    assert res.n_positive == 0 and res.ignored == ["Stroma", "unclassified"]
    # by default unclassified regions count, and are named so; `--classes unclassified` picks them alone
    (res,) = label_store(store, p, progress=False)
    assert res.classes == ["Stroma", "unclassified"] and res.n_positive == 3
    assert fractions(select_regions(read_annotations(p), ["unclassified"]), 3) == [1, 0, 1]
    assert np.array_equal(TileStore.open(store, readonly=True)["s1"].labels("tumor"), [1, 1, 1])
