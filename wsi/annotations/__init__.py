"""Region annotations (QuPath GeoJSON, ASAP / Camelyon16 XML) into per-tile labels in the store.

    parse.py    reading GeoJSON / ASAP XML into `Region`s, choosing classes, finding files; and the
                QuPath GeoJSON writer for tiles (`tiles_geojson`, used by `mil heatmap`)
    raster.py   regions -> the fraction of each tile inside them (scan-line raster + box sums)
    labels.py   `wsi labels`: fractions written as `labels/<name>` of each slide of a store

Coordinates are level-0 pixels throughout (QuPath exports, ASAP, the store's `coords`).
"""
from ..errors import AnnotationError
from .labels import POSITIVE_FRACTION, LabelResult, label_slide, label_store, results_json, results_table
from .parse import (ANNOTATION_OBJECTS, ANNOTATION_SUFFIXES, EXCLUSION_CLASSES, IGNORED_CLASSES, Region,
                    annotation_files, class_matches, is_exclusion, is_ignored, object_type, parse_asap_xml,
                    parse_geojson, read_annotations, region_classes, select_regions, tiles_geojson)
from .raster import tile_fractions

__all__ = ["AnnotationError", "Region", "POSITIVE_FRACTION", "LabelResult", "ANNOTATION_OBJECTS",
           "ANNOTATION_SUFFIXES", "EXCLUSION_CLASSES", "IGNORED_CLASSES", "annotation_files", "class_matches",
           "is_exclusion", "is_ignored", "object_type", "region_classes", "parse_asap_xml", "parse_geojson",
           "read_annotations", "select_regions", "tiles_geojson",
           "tile_fractions", "label_slide", "label_store", "results_json", "results_table"]
