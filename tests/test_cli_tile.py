"""`wsi tile` and `wsi info` from the command line, on a real slide and faulty inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_png
from wsi.cli import main
from wsi.store import TileStore


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi.cli", *args], capture_output=True, text=True)


@pytest.fixture()
def faulty_cohort(tmp_path, cmu_slide, ihc_image) -> Path:
    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(cmu_slide, d / "good.svs")
    data = cmu_slide.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 3])
    (d / "notes.svs").write_text("not a slide at all\n")
    write_png(d / "ihc.png", ihc_image)
    csv = tmp_path / "cohort.csv"
    csv.write_text("path,slide_id,mpp\n"
                   "slides/good.svs,good,\n"
                   "slides/truncated.svs,truncated,\n"
                   "slides/notes.svs,notes,\n"
                   "slides/ihc.png,ihc,0.5\n")
    return csv


def test_bad_slides_reported_good_ones_completed(tmp_path, faulty_cohort):
    store = tmp_path / "c.zarr"
    r = run_cli("tile", str(faulty_cohort), "--store", str(store), "--workers", "2", "--no-progress",
                "--viz", str(tmp_path / "viz"))
    assert r.returncode == 1, r.stderr
    assert "2 tiled, 0 skipped (already complete), 2 failed, of 4 slides" in r.stdout
    # each failure is named with its file and a reason
    for name in ("truncated.svs", "notes.svs"):
        assert any(name in line and "failed" in line for line in r.stderr.splitlines()), r.stderr
    s = TileStore.open(store, readonly=True)
    assert s.status("good") == "complete" and s.status("ihc") == "complete"
    assert s.status("truncated") == "failed" and "truncated.svs" in s["truncated"].meta.error
    good = s["good"]
    tiles = good.read_tiles(np.arange(good.n_tiles))
    assert good.has_tiles and good.meta.tile_codec == "jpeg-90"
    assert tiles.shape[1:] == (256, 256, 3) and tiles.shape[0] == good.coords.shape[0] == good.meta.n_tiles
    assert tiles.reshape(tiles.shape[0], -1).max(axis=1).min() > 0      # every tile written
    assert (tmp_path / "viz" / "good.png").stat().st_size > 10_000
    assert not (tmp_path / "viz" / "notes.png").exists()

    # re-run: complete slides are skipped, failed ones retried (and still fail)
    r2 = run_cli("tile", str(faulty_cohort), "--store", str(store), "--workers", "1", "--no-progress")
    assert r2.returncode == 1
    assert "0 tiled, 2 skipped (already complete), 2 failed" in r2.stdout


def test_info_json(tmp_path, faulty_cohort):
    store = tmp_path / "c.zarr"
    main(["-q", "tile", str(faulty_cohort), "--store", str(store), "--workers", "1", "--no-progress"])
    r = run_cli("info", str(store), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    by_id = {s["id"]: s for s in info["slides"]}
    assert set(by_id) == {"good", "ihc", "notes", "truncated"}
    g = by_id["good"]
    assert g["status"] == "complete" and g["mpp"] == 0.5 and g["patch_size"] == 256
    assert g["kind"] == "tiled" and g["tile_codec"] == "jpeg-90"
    assert g["slide_mpp"] == pytest.approx(0.499) and g["features"] == [] and g["labels"] == []
    assert g["predictions"] == []
    assert g["n_tiles"] == TileStore.open(store, readonly=True)["good"].coords.shape[0] > 0
    assert Path(g["source"]).name == "good.svs"
    assert by_id["ihc"]["slide_mpp"] == 0.5 and by_id["ihc"]["n_tiles"] > 0
    assert by_id["notes"]["status"] == "failed" and "notes.svs" in by_id["notes"]["error"]
    table = run_cli("info", str(store))
    assert "good" in table.stdout and "4 slides, 2 complete" in table.stdout and "jpeg-90" in table.stdout


def test_missing_mpp_fails_that_slide_only(tmp_path, cmu_slide, ihc_image):
    png = write_png(tmp_path / "ihc.png", ihc_image)
    store = tmp_path / "s.zarr"
    r = run_cli("tile", str(png), str(cmu_slide), "--store", str(store), "--workers", "1", "--no-progress")
    assert r.returncode == 1
    assert f"{png}: no resolution (µm/px) in its metadata; pass it with --slide-mpp" in r.stderr
    r = run_cli("tile", str(png), "--slide-mpp", "0.5", "--store", str(store), "--workers", "1", "--no-progress")
    assert r.returncode == 0 and "1 tiled" in r.stdout
    assert TileStore.open(store, readonly=True)["ihc"].meta.slide_mpp == 0.5


def test_no_tiles_and_changed_settings(tmp_path, cmu_slide):
    store = tmp_path / "s.zarr"
    assert main(["-q", "tile", str(cmu_slide), "--store", str(store), "--no-tiles", "--no-progress"]) == 0
    v = TileStore.open(store, readonly=True)["cmu_small_region"]
    assert not v.has_tiles and v.n_tiles > 0 and v.meta.tiles_stored is False and v.meta.tile_codec is None
    r = run_cli("tile", str(cmu_slide), "--store", str(store), "--mpp", "1.0", "--no-progress")
    assert r.returncode == 0 and "--overwrite" in r.stderr       # told how to redo it, not silently mixed
    r = run_cli("tile", str(cmu_slide), "--store", str(store), "--mpp", "1.0", "--overwrite", "--no-progress")
    assert r.returncode == 0
    assert TileStore.open(store, readonly=True)["cmu_small_region"].meta.target_mpp == 1.0
    r = run_cli("tile", str(cmu_slide), "--store", str(store), "--mpp", "1.0", "--tile-codec", "lossless", "--no-progress")
    assert r.returncode == 0 and "tile_codec jpeg-90 (asked lossless)" in r.stderr   # codecs are not mixed silently


def test_store_path_that_is_not_a_store(tmp_path, cmu_slide):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.csv").write_text("a,b\n")
    r = run_cli("tile", str(cmu_slide), "--store", str(tmp_path / "taken"))
    assert r.returncode == 2 and "exists and is not a tile store" in r.stderr and "Traceback" not in r.stderr


def test_nothing_to_tile_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("tile", str(tmp_path / "empty"), "--store", str(tmp_path / "s.zarr"))
    assert r.returncode == 2 and "no slides found" in r.stderr


def test_damaged_slide_is_shown_and_tiled_again(tmp_path, cmu_slide):
    store = tmp_path / "s.zarr"
    args = ["tile", str(cmu_slide), "--store", str(store), "--mpp", "2", "--tile-codec", "lossless", "--workers", "1",
            "--no-progress"]
    assert main(["-q", *args]) == 0
    n = TileStore.open(store, readonly=True)["cmu_small_region"].n_tiles
    (store / "slides" / "cmu_small_region" / "zarr.json").write_bytes(b"\x00garbage")
    r = run_cli("info", str(store), "--json")
    assert r.returncode == 0, r.stderr
    (s,) = json.loads(r.stdout)["slides"]
    assert s["id"] == "cmu_small_region" and s["status"] == "damaged" and "damaged" in s["error"]
    table = run_cli("info", str(store)).stdout
    assert "damaged" in table and "1 slides, 0 complete, 1 damaged" in table
    r = run_cli(*args)
    assert r.returncode == 0 and "1 tiled, 0 skipped" in r.stdout and "damaged" in r.stderr
    v = TileStore.open(store, readonly=True)["cmu_small_region"]
    assert v.meta.status == "complete" and v.n_tiles == n and v.read_tiles([0]).shape == (1, 256, 256, 3)
