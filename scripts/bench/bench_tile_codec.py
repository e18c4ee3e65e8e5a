"""Benchmark the store's tile codecs: JPEG at a few qualities against lossless (zstd level 1).

On the real sample slide (`cmu_small_region.svs`, 0.499 µm/px) and a synthetic Aperio-like slide
(default 30,000 × 24,000 px at 0.25 µm/px, written once into the work folder), both tiled at
0.5 µm/px with 256 px tiles:

1. bytes per tile: the size of `slides/<id>/tiles` on disk over the slide's tile count;
2. extraction speed, 1 worker: pathmil's tile filling (read + resize + encode + store) per codec
   against a plain `openslide.read_region` + resize loop over the same coordinates, in the same
   process, warm page cache, interleaved rounds; the ratio is the number to compare. Also the
   store write alone and the read-back (decode) per tile;
3. features: EfficientNet-Lite0 (ImageNet) features of JPEG tiles against those of the lossless
   tiles at the same coordinates: mean and 5th-percentile cosine similarity (and pixel PSNR); also
   JPEG with libjpeg's default 4:2:0 chroma subsampling (in memory; the store's JPEG is 4:4:4) and,
   for scale, the tile grid moved by 1 px;
4. that a plain zarr v3 + imagecodecs reader, without pathmil, reads the JPEG tiles (in a
   subprocess that never imports `wsi`), and the same through imagecodecs alone;
5. MIL (last): a small `wsi synth` cohort through the CLIs (`wsi tile --tile-codec`, `wsi embed`,
   `wsi labels`, `mil train --model abmil`), lossless and JPEG: bag and instance AUC.

    .venv/bin/python scripts/bench/bench_tile_codec.py [--quick] [--workdir DIR] [--json out.json]

Outputs go to --workdir (default /tmp/pathmil_bench_tile_codec), never into the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
BIN = REPO / ".venv" / "bin"
ENCODER = "efficientnet-lite0"
MPP, PATCH = 0.5, 256

# What a reader needs to open a JPEG tiles array with zarr v3 and imagecodecs, and nothing of pathmil.
# zarr knows the codec only by name ("numcodecs.imagecodecs_jpeg"): register imagecodecs' numcodecs
# codec under it, as an array-to-bytes codec (a chunk of k tiles is one k*P x P JPEG; zarr reshapes).
# `_NumcodecsArrayBytesCodec` is zarr 3.1's adapter for numcodecs codecs (a private name, checked here).
READER_SNIPPET = '''\
import imagecodecs.numcodecs, zarr, zarr.registry
from zarr.codecs.numcodecs import _NumcodecsArrayBytesCodec

imagecodecs.numcodecs.register_codecs()
class JpegTiles(_NumcodecsArrayBytesCodec, codec_name="imagecodecs_jpeg"):
    pass
zarr.registry.register_codec("numcodecs.imagecodecs_jpeg", JpegTiles)

tiles = zarr.open_array(f"{STORE}/slides/{SLIDE_ID}/tiles", mode="r")   # (N, 256, 256, 3) uint8
'''
# Without zarr: each chunk file is one JPEG of TILE_CHUNK tiles stacked top to bottom.
RAW_SNIPPET = '''\
import imagecodecs

chunk = 0   # tiles 8*chunk .. 8*chunk+7
raw = open(f"{STORE}/slides/{SLIDE_ID}/tiles/c/{chunk}/0/0/0", "rb").read()
first8 = imagecodecs.jpeg8_decode(raw).reshape(-1, 256, 256, 3)
'''


# ---- inputs ---------------------------------------------------------------------------------------
def synthetic_slide(workdir: Path, width: int, height: int) -> Path:
    """A synthetic 0.25 µm/px slide with two tumour regions, written once and kept in `workdir`."""
    from wsi.synthetic import write_slide

    path = workdir / f"synth_{width}x{height}.svs"
    if not path.exists():
        print(f"writing {path} (once; kept)", flush=True)
        part = path.with_suffix(".partial.svs")  # a killed run must not leave a half slide behind
        write_slide(part, width=width, height=height, mpp=0.25, n_tumor=2, seed=1, progress=False)
        part.replace(path)
    return path


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (plain file IO: what the tiles take on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- 1. bytes per tile ------------------------------------------------------------------------------
def tile_whole_slide(slide: Path, sid: str, codec: str, workdir: Path) -> dict:
    """Tile the whole slide with `codec` (1 worker) through the pipeline API; bytes per tile."""
    from wsi.cohort import SlideSource
    from wsi.pipeline import TilingConfig, tile_cohort

    store = workdir / f"{sid}_{codec}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    [res] = tile_cohort([SlideSource(slide, sid)], store, TilingConfig(MPP, PATCH, tile_codec=codec), workers=1,
                        progress=False)
    if res.status != "complete":
        raise RuntimeError(f"{slide}: tiling failed: {res.error}")
    n = res.n_tiles
    return {"store": str(store), "n_tiles": n, "bytes_per_tile": dir_bytes(store / "slides" / sid / "tiles") / n,
            "seconds": res.seconds, "read_method": res.method}


# ---- 2. speed ----------------------------------------------------------------------------------------
def baseline_loop(slide: Path, coords: np.ndarray, read: int) -> float:
    """tiles/s of a plain openslide loop: read_region at level 0, then an area resize to PATCH."""
    from bench_tiling import baseline_loop as loop  # this folder is on sys.path when run as a script

    return loop(slide, coords, read, PATCH)


def _new_view(slide, geom, coords: np.ndarray, codec: str, store_path: Path, sid: str = "bench"):
    from wsi.store import SlideMeta, TileStore

    shutil.rmtree(store_path, ignore_errors=True)
    store = TileStore.create(store_path)
    W, H = slide.dimensions
    view = store.begin_slide(SlideMeta(sid, source=str(slide.path), slide_mpp=slide.mpp, target_mpp=MPP,
                                       patch_size=PATCH, tile_size_level0=geom.patch_size_level0, width=W, height=H))
    view.write_arrays(coords, tile_codec=codec)
    return store, view


def pathmil_fill(slide_path: Path, coords: np.ndarray, codec: str, workdir: Path) -> tuple[float, str]:
    """tiles/s of pathmil's own tile filling with 1 worker (what `wsi tile --workers 1` runs per slide)."""
    from wsi.cohort import SlideSource
    from wsi.pipeline import fill_tiles
    from wsi.slide import open_slide
    from wsi.tiling import tile_geometry

    with open_slide(slide_path) as s:
        geom = tile_geometry(s, MPP, PATCH)
        store, _ = _new_view(s, geom, coords, codec, workdir / f"speed_{codec}.zarr")
        t0 = time.perf_counter()
        method = fill_tiles(store, SlideSource(slide_path, "bench"), s, geom, coords, None, True, progress=False)
        dt = time.perf_counter() - t0
    return len(coords) / dt, method


def store_io_ms(slide_path: Path, coords: np.ndarray, tiles: np.ndarray, codec: str, workdir: Path) -> tuple[float, float]:
    """ms per tile to write `tiles` chunk by chunk (as tiling does), and to read them back in batches of 64."""
    from wsi.slide import open_slide
    from wsi.store import TILE_CHUNK
    from wsi.tiling import tile_geometry

    with open_slide(slide_path) as s:
        _, view = _new_view(s, tile_geometry(s, MPP, PATCH), coords, codec, workdir / f"io_{codec}.zarr")
    t0 = time.perf_counter()
    for a in range(0, len(tiles), TILE_CHUNK):
        view.write_tiles(a, tiles[a:a + TILE_CHUNK])
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in range(0, len(tiles), 64):
        view.read_tiles(np.arange(a, min(a + 64, len(tiles))))
    read = time.perf_counter() - t0
    return 1000 * write / len(tiles), 1000 * read / len(tiles)


def bench_speed(slide: Path, coords: np.ndarray, codecs: list[str], workdir: Path, rounds: int) -> dict:
    """Rounds of baseline, codec, baseline, codec, ..., baseline (codec order rotated each round): each
    codec's ratio is against the mean of the two baseline runs around it; the median over rounds is reported."""
    from wsi.slide import open_slide
    from wsi.tiling import tile_geometry

    with open_slide(slide) as s:
        read = tile_geometry(s, MPP, PATCH).patch_size_level0
    baseline_loop(slide, coords, read)   # untimed: both sides then read from a warm page cache
    speeds: dict[str, list[float]] = {c: [] for c in codecs}
    ratios: dict[str, list[float]] = {c: [] for c in codecs}
    method = ""
    prev = baseline_loop(slide, coords, read)
    bases = [prev]
    for r in range(rounds):
        for c in codecs[r % len(codecs):] + codecs[:r % len(codecs)]:
            speed, method = pathmil_fill(slide, coords, c, workdir)
            nxt = baseline_loop(slide, coords, read)
            speeds[c].append(speed)
            ratios[c].append(speed / ((prev + nxt) / 2))
            bases.append(nxt)
            prev = nxt
    return {"n_tiles": len(coords), "rounds": rounds, "read_method": method, "baseline_tiles_per_s": bases,
            "tiles_per_s": speeds, "ratio_vs_baseline": {c: statistics.median(ratios[c]) for c in codecs},
            "ratio_all": {c: [round(x, 3) for x in ratios[c]] for c in codecs}}


# ---- 3. features --------------------------------------------------------------------------------------
def embed_tiles(enc, tiles: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for a in range(0, len(tiles), batch):
            x = enc.preprocess(torch.from_numpy(np.ascontiguousarray(tiles[a:a + batch])))
            out.append(enc(x).float().numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-12)))


def in_memory_jpeg(tiles: np.ndarray, quality: int, subsampling: str) -> tuple[np.ndarray, float]:
    """Tiles through imagecodecs' JPEG one by one (not a store codec), and their mean bytes."""
    import imagecodecs

    blobs = [imagecodecs.jpeg8_encode(t, level=quality, subsampling=subsampling) for t in tiles]
    return np.stack([imagecodecs.jpeg8_decode(b) for b in blobs]), float(np.mean([len(b) for b in blobs]))


def shifted_tiles(slide_path: Path, coords: np.ndarray) -> np.ndarray:
    """The same tiles with the grid moved by one target pixel right and down (openslide path): a change
    as arbitrary as any tiler's choice of grid origin, to size the codecs' effect against."""
    from wsi.slide import open_slide
    from wsi.tiling import TileReader, tile_geometry

    with open_slide(slide_path) as s:
        geom = tile_geometry(s, MPP, PATCH)
        d = max(1, round(geom.patch_size_level0 / PATCH))
        reader = TileReader(s, geom, fast=False)
        return np.stack([reader.read_openslide(int(x) + d, int(y) + d) for x, y in coords])


def bench_features(enc, stores: dict[str, str], sid: str, idx: np.ndarray, ref: str, slide_path: Path,
                   qualities: list[int]) -> dict:
    """Cosine similarity of tile features to those of the reference codec's tiles, same coordinates: each
    store codec, JPEG with 4:2:0 chroma subsampling (in memory) and, for scale, a 1 px grid shift."""
    from wsi.store import TileStore

    views = {c: TileStore.open(p, readonly=True)[sid] for c, p in stores.items()}
    coords = views[ref].coords
    tiles_ref = views[ref].read_tiles(idx)
    f_ref = embed_tiles(enc, tiles_ref)
    variants: dict[str, tuple[np.ndarray, float | None]] = {}
    for c, v in views.items():
        if c != ref:
            if not np.array_equal(v.coords, coords):
                raise RuntimeError(f"{sid}: {c} and {ref} were tiled at different coordinates")
            variants[c] = (v.read_tiles(idx), None)
    for q in qualities:
        variants[f"jpeg-{q} 4:2:0*"] = in_memory_jpeg(tiles_ref, q, "420")
    variants["grid +1 px†"] = (shifted_tiles(slide_path, coords[idx]), None)
    out: dict = {"n_tiles": len(idx)}
    for name, (tiles, nbytes) in variants.items():
        f = embed_tiles(enc, tiles)
        cos = np.sum(f * f_ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(f_ref, axis=1))
        out[name] = {"cos_mean": float(cos.mean()), "cos_p5": float(np.percentile(cos, 5)),
                     "cos_min": float(cos.min()), "psnr_db": psnr(tiles, tiles_ref), "bytes_per_tile": nbytes}
        print(f"    {name:16s} cosine mean {out[name]['cos_mean']:.4f}, p5 {out[name]['cos_p5']:.4f}, "
              f"min {out[name]['cos_min']:.4f}, PSNR {out[name]['psnr_db']:.1f} dB"
              + (f", {nbytes / 1e3:.1f} KB/tile" if nbytes else ""), flush=True)
    return out


# ---- 5. MIL through the CLIs ---------------------------------------------------------------------------
def run_cli(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def bench_mil(codecs: list[str], workdir: Path, a: argparse.Namespace) -> dict:
    """A small synthetic cohort, tiled with each codec, embedded, labelled, and ABMIL cross-validated."""
    env = {**os.environ, "PATHMIL_CACHE": os.environ.get("PATHMIL_CACHE", str(REPO / ".cache"))}
    wsi, mil = str(BIN / "wsi"), str(BIN / "mil")
    help_text = subprocess.run([wsi, "tile", "--help"], env=env, capture_output=True, text=True).stdout
    if "--tile-codec" not in help_text:
        raise RuntimeError("`wsi tile` has no --tile-codec option yet; the MIL comparison needs it")
    synth = workdir / f"mil_synth_{a.mil_slides}x{a.mil_size}"
    if not (synth / "labels.csv").is_file():
        shutil.rmtree(synth, ignore_errors=True)
        run_cli([wsi, "-q", "synth", str(synth), "--slides", str(a.mil_slides), "--seed", "0", "--width",
                 str(a.mil_size), "--height", str(a.mil_size * 3 // 4), "--workers", "2"], env)
    slides = sorted(str(p) for p in synth.glob("*.svs"))
    out = {"slides": len(slides), "size": [a.mil_size, a.mil_size * 3 // 4], "folds": a.folds, "epochs": a.epochs}
    for c in codecs:
        store, run = workdir / f"{synth.name}_{c}.zarr", workdir / f"{synth.name}_run_{c}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        t = {"tile": run_cli([wsi, "-q", "tile", *slides, "--store", str(store), "--tile-codec", c,
                              "--workers", "2", "--no-progress"], env)}
        t["embed"] = run_cli([wsi, "-q", "embed", str(store), "--encoder", ENCODER, "--no-progress"], env)
        t["labels"] = run_cli([wsi, "-q", "labels", str(store), "--annotations", str(synth / "annotations"),
                               "--name", "tumor", "--no-progress"], env)
        t["train"] = run_cli([mil, "train", "--store", str(store), "--labels", str(synth / "labels.csv"),
                              "--encoder", ENCODER, "--instance-labels", "tumor", "--model", "abmil",
                              "--folds", str(a.folds), "--epochs", str(a.epochs), "--seed", "0", "--out", str(run)],
                             env)
        m = json.loads((run / "metrics.json").read_text())
        from wsi.store import TileStore

        out["tiles"] = sum(v.n_tiles for v in TileStore.open(store, readonly=True))
        out[c] = {k: m[k]["mean"] for k in ("bag_auc", "instance_auc", "instance_auc_attention")}
        out[c]["folds_bag_auc"] = m["bag_auc"]["folds"]
        out[c]["folds_instance_auc"] = m["instance_auc"]["folds"]
        out[c]["seconds"] = {k: round(v, 1) for k, v in t.items()}
        print(f"    {c:9s} bag AUC {out[c]['bag_auc']:.3f}  instance AUC {out[c]['instance_auc']:.3f} "
              f"(attention {out[c]['instance_auc_attention']:.3f})  {out[c]['seconds']}", flush=True)
    return out


# ---- 4. a reader without pathmil --------------------------------------------------------------------------
def verify_plain_readers(store: str, sid: str, expected: np.ndarray, workdir: Path) -> dict:
    """Run READER_SNIPPET and RAW_SNIPPET in a fresh interpreter that never imports `wsi`; compare."""
    ref = workdir / "reader_expected.npy"
    np.save(ref, expected)
    check = (f"import sys, numpy as np\nSTORE, SLIDE_ID = {store!r}, {sid!r}\n{READER_SNIPPET}{RAW_SNIPPET}"
             f"exp = np.load({str(ref)!r})\n"
             "assert tiles.dtype == np.uint8 and tiles.shape[1:] == (256, 256, 3), (tiles.dtype, tiles.shape)\n"
             "assert np.array_equal(tiles[:len(exp)], exp), 'zarr reader differs from pathmil'\n"
             "assert np.array_equal(first8, exp[:8]), 'raw reader differs from pathmil'\n"
             "assert not any(m == 'wsi' or m.startswith('wsi.') for m in sys.modules), 'wsi was imported'\n"
             "print('ok', tiles.shape)\n")
    # cwd outside the repository, so `wsi` is not even importable there
    p = subprocess.run([sys.executable, "-c", check], cwd=workdir, capture_output=True, text=True)
    ok = p.returncode == 0
    print(f"    plain zarr v3 + imagecodecs reader (no pathmil import): {'ok' if ok else 'FAILED'} "
          f"{p.stdout.strip() if ok else p.stderr.strip()[-800:]}", flush=True)
    return {"ok": ok, "stdout": p.stdout.strip(), "stderr": p.stderr.strip()[-2000:]}


# ---- report ------------------------------------------------------------------------------------------------
def report(out: dict, codecs: list[str], ref: str) -> str:
    from wsi.cli_common import format_table
    from wsi.store.codecs import DEFAULT_TILE_CODEC

    lines = []
    for name, r in out["slides"].items():
        sp, ft = r.get("speed"), r["features"]
        lines.append(f"\n{name}: {r['description']}; {r['bytes'][ref]['n_tiles']} tiles; speed over "
                     f"{sp['n_tiles'] if sp else '-'} tiles ({sp['read_method'] if sp else '-'}), features over "
                     f"{ft['n_tiles']} tiles")
        if sp:
            lines.append(f"  baseline read_region + resize: {', '.join(f'{b:.0f}' for b in sp['baseline_tiles_per_s'])} "
                         "tiles/s (run before, between and after the codecs)")
        rows = [("codec", "KB/tile", f"vs {ref}", "tiles/s (1 worker)", "vs read_region loop", "write ms/tile",
                 "read ms/tile", "cos mean", "cos p5", "PSNR dB")]
        base_bpt = r["bytes"][ref]["bytes_per_tile"]
        for c in codecs:
            b = r["bytes"][c]
            f = ft.get(c, {})
            rows.append((c, f"{b['bytes_per_tile'] / 1e3:.1f}", f"{base_bpt / b['bytes_per_tile']:.1f}x smaller"
                         if c != ref else "1.0x",
                         "/".join(f"{v:.0f}" for v in sp["tiles_per_s"][c]) if sp else "-",
                         f"{sp['ratio_vs_baseline'][c]:.2f}x" if sp else "-",
                         f"{r['io_ms'][c][0]:.2f}" if "io_ms" in r else "-",
                         f"{r['io_ms'][c][1]:.2f}" if "io_ms" in r else "-",
                         f"{f['cos_mean']:.4f}" if f else "(ref)", f"{f['cos_p5']:.4f}" if f else "(ref)",
                         f"{f['psnr_db']:.1f}" if f else "(ref)"))
        for variant, f in ft.items():
            if isinstance(f, dict) and variant not in codecs:
                kb = f["bytes_per_tile"]
                rows.append((variant, f"{kb / 1e3:.1f}" if kb else "-", f"{base_bpt / kb:.1f}x smaller" if kb else "-",
                             "-", "-", "-", "-", f"{f['cos_mean']:.4f}", f"{f['cos_p5']:.4f}", f"{f['psnr_db']:.1f}"))
        lines.append(format_table(rows))
    lines.append("* JPEG with libjpeg's default 4:2:0 chroma subsampling (the store's codec is 4:4:4), encoded in "
                 "memory tile by tile, not a store codec.\n† the lossless tiles read with the grid moved 1 px "
                 "(at 0.5 µm/px) right and down: the size of an arbitrary change, for scale.")
    if "mil" in out:
        m = out["mil"]
        lines.append(f"\nMIL: {m['slides']} synthetic slides {m['size'][0]}x{m['size'][1]} px at 0.25 µm/px "
                     f"({m.get('tiles', '?')} tiles), "
                     f"{ENCODER} features, ABMIL, {m['folds']}-fold CV, {m['epochs']} epochs, seed 0")
        if out["quick"]:
            lines.append("(--quick: a smoke run of the commands; these numbers mean nothing)")
        rows = [("codec", "bag AUC", "instance AUC (student)", "instance AUC (attention)")]
        for c in [c for c in m if isinstance(m[c], dict)]:
            rows.append((c, f"{m[c]['bag_auc']:.3f}", f"{m[c]['instance_auc']:.3f}", f"{m[c]['instance_auc_attention']:.3f}"))
        lines.append(format_table(rows))
    if "reader" in out:
        lines.append(f"\nplain zarr v3 + imagecodecs reader, no pathmil: {'ok' if out['reader']['ok'] else 'FAILED'}; "
                     "it needs:\n" + READER_SNIPPET)
    lines.append(f"\nNoise: {os.cpu_count()}-core machine, possibly shared; absolute tiles/s vary from run to run, "
                 "compare the ratios (each taken against a baseline run in the same process, same round). "
                 f"Store default: {DEFAULT_TILE_CODEC}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pathmil_bench_tile_codec"))
    p.add_argument("--quick", action="store_true", help="small slide, few tiles, one round, tiny MIL cohort")
    p.add_argument("--qualities", default="80,90,95", help="JPEG qualities to compare with lossless")
    p.add_argument("--width", type=int, default=None, help="synthetic slide width (default 30000; quick 12000)")
    p.add_argument("--tiles", type=int, default=None, help="tiles in the speed comparison (default 1500; quick 300)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved speed rounds (default 2; quick 1)")
    p.add_argument("--feature-tiles", type=int, default=None, help="synthetic-slide tiles embedded per codec "
                                                                   "(default 384; quick 64; the real slide: all)")
    p.add_argument("--mil-codecs", default="lossless,jpeg-90")
    p.add_argument("--mil-slides", type=int, default=None, help="default 12; quick 6")
    p.add_argument("--mil-size", type=int, default=None, help="synthetic slide width (default 8192; quick 4096)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default 30; quick 5")
    p.add_argument("--no-mil", action="store_true", help="skip the MIL comparison")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    q = a.quick
    a.width = a.width or (12_000 if q else 30_000)
    a.tiles = a.tiles or (300 if q else 1500)
    a.rounds = a.rounds or (1 if q else 2)
    a.feature_tiles = a.feature_tiles or (64 if q else 384)
    a.mil_slides = a.mil_slides or (6 if q else 12)
    a.mil_size = a.mil_size or (4096 if q else 8192)
    a.epochs = a.epochs or (5 if q else 30)
    os.environ.setdefault("PATHMIL_CACHE", str(REPO / ".cache"))

    from wsi.samples import fetch_sample
    from wsi.encoders import create_encoder
    from wsi.store import LOSSLESS, TileStore, parse_tile_codec

    ref = LOSSLESS
    qualities = [int(x) for x in a.qualities.split(",")]
    codecs = [ref] + [parse_tile_codec(f"jpeg-{q}") for q in qualities]
    a.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    height = a.width * 4 // 5
    slides = {"real": (fetch_sample("cmu_small_region.svs"), "cmu_small_region.svs (real Aperio H&E, 2220x2967 px, "
                                                             "0.499 µm/px), tiled at 0.5 µm/px"),
              "synthetic": (synthetic_slide(a.workdir, a.width, height),
                            f"synthetic Aperio-like {a.width}x{height} px at 0.25 µm/px (JPEG q80), tiled at 0.5 µm/px")}
    enc = create_encoder(ENCODER)
    out: dict = {"quick": q, "codecs": codecs, "slides": {}}
    stage = out["stage_seconds"] = {}
    for name, (path, desc) in slides.items():
        t0 = time.perf_counter()
        sid = f"{name}_slide"
        r: dict = {"path": str(path), "description": desc, "bytes": {}}
        print(f"{name}: {desc}", flush=True)
        print("  1. whole slide tiled with each codec (bytes per tile)", flush=True)
        for c in codecs:
            r["bytes"][c] = tile_whole_slide(path, sid, c, a.workdir)
            print(f"    {c:9s} {r['bytes'][c]['n_tiles']} tiles, {r['bytes'][c]['bytes_per_tile'] / 1e3:6.1f} KB/tile, "
                  f"{r['bytes'][c]['seconds']:.1f} s", flush=True)
        stores = {c: r["bytes"][c]["store"] for c in codecs}
        ref_view = TileStore.open(stores[ref], readonly=True)[sid]
        n = ref_view.n_tiles
        # a slide with fewer tiles than asked (the real one has 43) has them repeated, up to 15 times
        pick = np.linspace(0, n - 1, a.tiles).astype(int) if n >= a.tiles else np.resize(np.arange(n), min(a.tiles, 15 * n))
        coords = ref_view.coords[pick]
        print(f"  2. extraction speed over {len(coords)} tiles, 1 worker, {a.rounds} interleaved round(s)", flush=True)
        r["speed"] = bench_speed(path, coords, codecs, a.workdir, a.rounds)
        for c in codecs:
            print(f"    {c:9s} {statistics.median(r['speed']['tiles_per_s'][c]):6.1f} tiles/s, "
                  f"{r['speed']['ratio_vs_baseline'][c]:.2f}x the read_region loop", flush=True)
        tiles = ref_view.read_tiles(pick)
        r["io_ms"] = {c: store_io_ms(path, coords, tiles, c, a.workdir) for c in codecs}
        print("    store write / read-back ms per tile: " +
              ", ".join(f"{c} {w:.2f}/{rd:.2f}" for c, (w, rd) in r["io_ms"].items()), flush=True)
        fidx = np.linspace(0, n - 1, min(a.feature_tiles, n)).astype(int) if name == "synthetic" else np.arange(n)
        print(f"  3. {ENCODER} features of {len(fidx)} tiles per codec", flush=True)
        r["features"] = bench_features(enc, stores, sid, fidx, ref, path, qualities)
        out["slides"][name] = r
        stage[name] = round(time.perf_counter() - t0, 1)
    jpeg = [c for c in codecs if c != ref]
    view = TileStore.open(out["slides"]["real"]["bytes"][jpeg[0]]["store"], readonly=True)["real_slide"]
    print("4. a reader without pathmil", flush=True)
    out["reader"] = verify_plain_readers(str(view.store.path), "real_slide", view.read_tiles(np.arange(min(16, view.n_tiles))),
                                         a.workdir)
    if not a.no_mil:
        print("5. MIL through the CLIs (wsi synth, tile, embed, labels; mil train)", flush=True)
        t0 = time.perf_counter()
        out["mil"] = bench_mil([parse_tile_codec(c) for c in a.mil_codecs.split(",")], a.workdir, a)
        stage["mil"] = round(time.perf_counter() - t0, 1)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    print(report(out, codecs, ref))
    print(f"({out['seconds']:.0f} s in all: {stage}; work folder {a.workdir})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
