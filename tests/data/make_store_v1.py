"""How tests/data/store_v1.zarr was made: a schema-1 store written by pathmil 0.1's own store code.

    git -C . show 028e340:wsi/store.py > /tmp/old_store.py
    python tests/data/make_store_v1.py /tmp/old_store.py tests/data/store_v1.zarr

Two slides, with the attributes pathmil 0.1 wrote: "tiled_a" as `wsi tile` made it (tiles, tissue,
features, labels, predictions) and "imported_b" as `wsi import-h5` made it (features only).
tests/test_store_api.py checks that the current store reads and migrates it without loss.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np


def tiled_values(n: int = 5, p: int = 16):
    rng = np.random.default_rng(1)
    coords = np.array([[i % 3 * 32, i // 3 * 32] for i in range(n)], np.int32)
    tiles = rng.integers(0, 256, (n, p, p, 3), dtype=np.uint8)
    feats = rng.standard_normal((n, 4)).astype(np.float16)
    labels = np.linspace(0, 1, n).astype(np.float32)
    score = np.linspace(0.9, 0.1, n).astype(np.float32)
    return coords, tiles, feats, labels, score


def imported_values(n: int = 3):
    rng = np.random.default_rng(2)
    return np.array([[0, 0], [512, 0], [0, 512]], np.int32)[:n], rng.standard_normal((n, 6)).astype(np.float32)


def main(old_store_py: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("old_store", old_store_py)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    assert old.SCHEMA_VERSION == 1
    shutil.rmtree(out, ignore_errors=True)
    store = old.TileStore(out)

    coords, tiles, feats, labels, score = tiled_values()
    attrs = {"source": "/data/slides/tiled_a.svs", "fingerprint": "1234:abcdef0123456789", "slide_mpp": 0.25,
             "slide_mpp_source": "metadata", "level0_size": [96, 64], "vendor": "aperio", "mpp": 0.5,
             "patch_size": 16, "overlap": 0, "min_tissue": 0.25, "tiles_stored": True, "patch_size_level0": 32,
             "read_level": 0, "read_size": 32, "tissue_params": {"seg_mpp": 8.0}}
    store.begin_slide("tiled_a", attrs)
    store.write_slide_arrays("tiled_a", coords, np.ones((4, 6), np.uint8), {"downsample": [16.0, 16.0], "mpp": 4.0,
                                                                            "threshold": 12}, 16,
                             np.ones(len(coords), np.float32))
    store.slide("tiled_a")["tiles"][:] = tiles
    store.mark_complete("tiled_a", n_tiles=len(coords), seconds=0.1, read_method="openslide")
    store.write_features("tiled_a", "timm:resnet18", feats, {"weights": "sha256:00", "precision": "fp32"})
    store.write_labels("tiled_a", "tumor", labels, {"source": "tiled_a.geojson", "n_positive": 2})
    store.write_predictions("tiled_a", "abmil", {"instance_score": score, "attention": score[::-1].copy()},
                            {"run": "abmil", "model": "abmil", "bag_probs": [0.2, 0.8], "predicted_class": "tumor"})

    icoords, ifeats = imported_values()
    src = "/data/clam/h5_files/imported_b.h5"
    store.begin_slide("imported_b", {"source": src, "imported_from": "clam"})
    store.write_slide_arrays("imported_b", icoords, np.zeros((1, 1), np.uint8), {"downsample": [0, 0], "imported": True},
                             patch_size=None)
    store.mark_complete("imported_b", source=src, imported_from="clam", patch_size=256, patch_size_level0=512, mpp=0.5,
                        mpp_approximate=True, level0_size=[1024, 1024], slide_mpp=0.25,
                        h5_coords_attrs={"patch_level": 0, "downsample": [1.0, 1.0]}, tiles_stored=False,
                        n_tiles=len(icoords))
    store.write_features("imported_b", "uni", ifeats, {"imported_from": "clam", "source": src, "dim": 6,
                                                       "h5_dtype": "float32"})


if __name__ == "__main__":
    main(*sys.argv[1:3])
