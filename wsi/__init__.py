"""pathmil.wsi: slides in, a Zarr tile store out.

- `open_slide` (slide.py): openslide formats and plain images, resolution from metadata.
- `segment_tissue` (tissue.py): saturation-based tissue mask on a low-resolution level.
- `tile_geometry`, `plan_tiles`, `TileReader` (tiling.py): a grid at a physical resolution, tile pixels.
- `TileStore` (store.py): the Zarr v3 store shared by every pathmil package.
- `tile_cohort` (pipeline.py): the `wsi tile` command as a function.
- `make_cohort` (synthetic/): synthetic slides with tumor annotations.
- `label_store`, `tile_fractions` (annotations.py): QuPath GeoJSON / ASAP XML regions into per-tile labels.
- `tiling_overview` (viz.py): a picture of what was tiled.

Submodules import their heavy dependencies lazily; import what you use from them directly.
"""
from .cohort import SlideSource, resolve_sources
from .pipeline import TilingConfig, tile_cohort
from .slide import Slide, SlideError, open_slide
from .store import TileStore, validate_slide_id
from .tiling import TileReader, plan_tiles, tile_geometry
from .tissue import TissueParams, segment_tissue

__all__ = ["Slide", "SlideError", "SlideSource", "TileReader", "TileStore", "TilingConfig", "TissueParams",
           "open_slide", "plan_tiles", "resolve_sources", "segment_tissue", "tile_cohort", "tile_geometry",
           "validate_slide_id"]
