"""Synthetic whole-slide cohorts with ground truth, for demos, tests and benchmarks.

Each slide is a pyramidal, Aperio-like TIFF (opens in OpenSlide as vendor
``aperio``) whose tissue is made of real H&E texture crops shipped in
``wsi/data``: normal skin everywhere in the tissue, carcinoma inside the tumor
regions of positive slides. Tumor regions are written as QuPath-style GeoJSON
polygons in level-0 pixel coordinates.

- `write_slide` (writer.py): one pyramidal TIFF; returns its tumor polygons.
- `make_cohort`, `SynthSlide` (cohort.py): a folder of slides, GeoJSON annotations and labels.csv.

Internals: layout.py (tissue/tumor masks on a coarse grid), textures.py (texture
crops, stain jitter, periodic tiling), render.py (the scene and its per-level tile
renderer), pyramid.py (level sizes and JPEG tile encoding).
"""

from .cohort import SynthSlide, make_cohort
from .writer import write_slide

__all__ = ["SynthSlide", "write_slide", "make_cohort"]
