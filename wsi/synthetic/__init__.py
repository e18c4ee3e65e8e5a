"""Synthetic whole-slide cohorts with ground truth, for demos, tests and benchmarks.

Each slide is a pyramidal, Aperio-like TIFF (opens in OpenSlide as vendor
``aperio``) whose tissue is made of real H&E texture crops shipped in
``wsi/data``: normal skin everywhere in the tissue, carcinoma inside the tumor
regions of positive slides. Tumor regions are written as QuPath-style GeoJSON
polygons in level-0 pixel coordinates.

- `write_slide` (writer.py): one pyramidal TIFF; returns its tumor polygons.
- `make_cohort`, `SynthSlide` (cohort.py): a folder of slides, GeoJSON annotations and labels.csv.
- `Difficulty`, `PRESETS` (difficulty.py): the options that make a cohort hard (tumour grades,
  benign mimics, margin inflammation, small tumour fractions and clusters, stain, blur and JPEG
  variation), the "easy" (default) and "hard" presets, and the per-slide draw (`SlideSpec`).

Internals: layout.py (tissue/tumor masks on a coarse grid, and the hard parts' regions),
textures.py (texture crops and their variants, stain jitter, blur, periodic tiling), render.py
(the scene and its per-level tile renderer), pyramid.py (level sizes and JPEG tile encoding).
"""

from __future__ import annotations

import importlib

# Loaded on first use, so that `wsi` builds its parser (which reads difficulty.py for the `synth`
# options) without importing the writer's dependencies (skimage, tifffile).
_EXPORTS = {"SynthSlide": "cohort", "make_cohort": "cohort", "write_slide": "writer",
            "Difficulty": "difficulty", "PRESETS": "difficulty"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
