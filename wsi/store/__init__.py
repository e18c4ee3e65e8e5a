"""The tile store: the only door to a cohort's tiles, features, labels and predictions.

    store = TileStore.open("cohort.zarr")          # existing only; TileStore.create(path) makes one
    view = store["slide_1"]                        # a SlideView; `for view in store` visits every slide
    view.meta.target_mpp, view.coords, view.read_tiles([0, 5, 9])
    for idx, tiles in view.iter_tiles(): ...      # every tile, a bounded chunk at a time
    view.features("uni"), view.labels("tumor"), view.predictions("abmil"), view.top_tiles("abmil", k=8)

No module outside this package imports zarr.
"""
from ..errors import StoreError
from .codecs import DEFAULT_TILE_CODEC, LOSSLESS, parse_tile_codec
from .meta import (COMPLETE, FAILED, FEATURES_ONLY, TILED, WRITING, SlideMeta, feature_key, file_fingerprint,
                   slide_id_from_path, validate_name, validate_slide_id)
from .tilestore import SCHEMA_VERSION, TileStore
from .view import FEATURE_ROWS_PER_CHUNK, TILE_CHUNK, TILES_PER_READ, FeatureWriter, SlideView, TopTiles

__all__ = ["TileStore", "SlideView", "SlideMeta", "TopTiles", "FeatureWriter", "StoreError", "SCHEMA_VERSION",
           "COMPLETE", "FAILED", "WRITING", "TILED", "FEATURES_ONLY", "TILE_CHUNK", "TILES_PER_READ", "FEATURE_ROWS_PER_CHUNK",
           "DEFAULT_TILE_CODEC", "LOSSLESS", "parse_tile_codec", "feature_key", "file_fingerprint",
           "slide_id_from_path", "validate_name", "validate_slide_id"]
