"""pathmil.wsi: slides in, a Zarr tile store out; the base every other pathmil package stands on.

- `TileStore`, `SlideView`, `SlideMeta` (store/): the only door to the store: typed slide views,
  tile reads, features, labels, predictions, top tiles, thumbnails.
- `TileDataset` (data.py): store tiles as a torch Dataset (embedding, PathoCLIP, the reasoner).
- `PathmilError` and its kinds (errors.py); device, precision, rank, seeding, atomic writes (runtime.py).
- `open_slide` (slide.py): openslide formats and plain images, resolution from metadata.
- `segment_tissue` (tissue.py): saturation-based tissue mask on a low-resolution level.
- `tile_geometry`, `plan_tiles`, `TileReader` (tiling.py): a grid at a physical resolution, tile pixels.
- `tile_cohort` (pipeline.py): the `wsi tile` command as a function; `embed_store` (embed.py): `wsi embed`.
- `create_encoder` (encoders/): the encoder registry (image and image-text models).
- `import_h5`, `export_h5` (interop.py) and h5 reading (h5.py): CLAM / TRIDENT features.
- `label_store`, `tile_fractions` (annotations/): QuPath GeoJSON / ASAP XML regions into per-tile labels.
- `make_cohort` (synthetic/): synthetic slides with tumor annotations.
- `tiling_overview` (viz.py): a picture of what was tiled.

Submodules import their heavy dependencies (torch, encoders) lazily; import what you use from them directly.
"""
from .cohort import SlideSource, resolve_sources
from .errors import PathmilError, SlideError, StoreError
from .pipeline import TilingConfig, tile_cohort
from .slide import Slide, open_slide
from .store import SlideMeta, SlideView, TileStore, validate_slide_id
from .tiling import TileReader, plan_tiles, tile_geometry
from .tissue import TissueParams, segment_tissue

__all__ = ["PathmilError", "Slide", "SlideError", "SlideMeta", "SlideSource", "SlideView", "StoreError",
           "TileReader", "TileStore", "TilingConfig", "TissueParams", "open_slide", "plan_tiles", "resolve_sources",
           "segment_tissue", "tile_cohort", "tile_geometry", "validate_slide_id"]
