"""Benchmark `wsi tile` on a large synthetic slide (default 100,000 × 80,000 px at 0.25 µm/px).

A. Tissue segmentation + coordinates, as the whole command (`wsi tile --no-tiles`): wall seconds and
   peak RSS of the process, median of a few runs.
B. Tile extraction into the store (0.5 µm/px, 256 px) against a plain loop of
   `openslide.read_region` (512 px at level 0) + resize to 256 over the same coordinates, in the
   same run: tiles/s for the baseline, for pathmil with 1 and 2 workers, and for pathmil forced
   onto its openslide path.

    .venv/bin/python scripts/bench/bench_tiling.py [--slide PATH] [--tiles 1500] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, ru.ru_maxrss / 1024


def bench_segmentation(slide: Path, workdir: Path, repeats: int) -> dict:
    store = workdir / "coords.zarr"
    cmd = [str(REPO / ".venv/bin/wsi"), "-q", "tile", str(slide), "--store", str(store), "--no-tiles",
           "--no-progress", "--overwrite", "--workers", "1"]
    runs = [run_measured(cmd) for _ in range(repeats)]
    from wsi.store import TileStore

    n = TileStore.open(store, readonly=True)[slide.stem].n_tiles
    return {"seconds_median": statistics.median(r[0] for r in runs), "seconds_all": [round(r[0], 3) for r in runs],
            "peak_rss_mib_max": max(r[1] for r in runs), "n_tiles": n, "store": str(store)}


def baseline_loop(slide: Path, coords: np.ndarray, read: int, size: int) -> float:
    """tiles/s of a plain openslide loop: read_region at level 0, then resize."""
    import cv2
    import openslide

    osr = openslide.OpenSlide(str(slide))
    t0 = time.perf_counter()
    for x, y in coords:
        rgb = np.asarray(osr.read_region((int(x), int(y)), 0, (read, read)).convert("RGB"))
        cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    dt = time.perf_counter() - t0
    osr.close()
    return len(coords) / dt


def pathmil_fill(slide: Path, coords: np.ndarray, workdir: Path, workers: int, fast: bool,
                 codec: str = "jpeg") -> float:
    """tiles/s of pathmil's own tile writing (read + resize + compress + store) over `coords`."""
    from wsi.cohort import SlideSource
    from wsi.pipeline import fill_tiles, make_pool
    from wsi.slide import open_slide
    from wsi.store import SlideMeta, TileStore
    from wsi.tiling import tile_geometry

    store = TileStore.create(workdir / f"tiles_{workers}_{fast}_{codec}.zarr")
    src = SlideSource(slide, "bench")
    with open_slide(slide) as s:
        geom = tile_geometry(s, 0.5, 256)
        view = store.begin_slide(SlideMeta("bench", patch_size=256, target_mpp=0.5, slide_mpp=s.mpp))
        view.write_arrays(coords, tile_codec=codec)
        pool = make_pool(workers) if workers > 1 else None
        if pool is not None:  # start the processes before timing: a cohort pays this once
            pool.map(abs, range(workers))
        try:
            t0 = time.perf_counter()
            method = fill_tiles(store, src, s, geom, coords, pool, fast, progress=False)
            dt = time.perf_counter() - t0
        finally:
            if pool is not None:
                pool.terminate()
    print(f"    pathmil {method:11s} workers={workers} {codec:8s}: {len(coords) / dt:7.1f} tiles/s", flush=True)
    return len(coords) / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=None)
    p.add_argument("--width", type=int, default=100_000)
    p.add_argument("--height", type=int, default=80_000)
    p.add_argument("--tiles", type=int, default=1500, help="tiles in the extraction comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    slide = a.slide
    if slide is None:
        from wsi.synthetic import write_slide

        slide = REPO / ".cache" / "bench" / f"synth_{a.width}x{a.height}.svs"
        if not slide.exists():
            slide.parent.mkdir(parents=True, exist_ok=True)
            print(f"writing {slide} (once; cached)", flush=True)
            t0 = time.perf_counter()
            part = slide.with_suffix(".partial.svs")  # a killed run must not leave a cached half slide
            write_slide(part, width=a.width, height=a.height, mpp=0.25, n_tumor=2, seed=1)
            part.replace(slide)
            print(f"  {time.perf_counter() - t0:.0f} s, {slide.stat().st_size / 2**30:.2f} GiB", flush=True)

    out: dict = {"slide": str(slide)}
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        work = Path(tmp)
        print("A. segmentation + coordinates, whole command (wsi tile --no-tiles)", flush=True)
        seg = bench_segmentation(slide, work, a.repeats)
        out["segmentation"] = seg
        print(f"    {seg['seconds_median']:.2f} s (runs {seg['seconds_all']}), peak RSS {seg['peak_rss_mib_max']:.0f} MiB, "
              f"{seg['n_tiles']} tiles", flush=True)

        from wsi.store import TileStore

        coords = TileStore.open(seg["store"], readonly=True)[slide.stem].coords
        pick = np.linspace(0, len(coords) - 1, min(a.tiles, len(coords))).astype(int)
        coords = coords[pick]
        print(f"B. tile extraction over the same {len(coords)} coordinates", flush=True)
        baseline_loop(slide, coords, 512, 256)  # untimed: both sides then read from a warm page cache
        base = baseline_loop(slide, coords, 512, 256)
        print(f"    baseline openslide read_region(512) + resize: {base:7.1f} tiles/s", flush=True)
        res = {"baseline_tiles_per_s": base, "n_tiles": len(coords)}
        for w in (1, 2):
            res[f"pathmil_w{w}_tiles_per_s"] = pathmil_fill(slide, coords, work, w, True)
        res["pathmil_w1_lossless_tiles_per_s"] = pathmil_fill(slide, coords, work, 1, True, "lossless")
        res["pathmil_openslide_path_w1_tiles_per_s"] = pathmil_fill(slide, coords, work, 1, False)
        res["ratio_w1_vs_baseline"] = res["pathmil_w1_tiles_per_s"] / base
        res["ratio_w1_lossless_vs_baseline"] = res["pathmil_w1_lossless_tiles_per_s"] / base
        res["ratio_w2_vs_baseline"] = res["pathmil_w2_tiles_per_s"] / base
        res["scaling_w2_vs_w1"] = res["pathmil_w2_tiles_per_s"] / res["pathmil_w1_tiles_per_s"]
        out["extraction"] = res
        print(f"    per worker vs baseline: {res['ratio_w1_vs_baseline']:.2f}x (lossless tiles: "
              f"{res['ratio_w1_lossless_vs_baseline']:.2f}x); 2 workers vs 1: "
              f"{res['scaling_w2_vs_w1']:.2f}x (this machine has {os.cpu_count()} cores)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
