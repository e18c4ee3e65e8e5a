"""Benchmark `wsi embed` against the pure forward of the same encoder, same tiles, same batch size, same run.

    .venv/bin/python scripts/bench/bench_embed.py [--store demo_out/cohort.zarr] [--encoder efficientnet-lite0]

The floor: tiles already decoded and preprocessed in memory, only `encoder(x)` timed. The ratio
end-to-end / floor says what reading, decompression, preprocessing and writing cost on top.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=REPO / "demo_out" / "cohort.zarr")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    import numpy as np
    import torch

    from wsi.embed import EmbedConfig, embed_store
    from wsi.encoders import create_encoder
    from wsi.store import TileStore

    store = TileStore.open(a.store, readonly=True)
    ids = [s for s in store.complete_ids() if store[s].has_tiles]
    tiles = np.concatenate([t for s in ids for _, t in store[s].iter_tiles()])  # held whole: it is timed
    n = len(tiles)
    enc = create_encoder(a.encoder, pretrained=not a.random_weights)
    print(f"{n} tiles from {len(ids)} slides; {a.encoder}; batch {a.batch_size}; torch threads {torch.get_num_threads()}")

    with torch.inference_mode():
        batches = [enc.preprocess(torch.from_numpy(tiles[i:i + a.batch_size])) for i in range(0, n, a.batch_size)]
        enc(batches[0])  # warm-up
        t0 = time.perf_counter()
        for x in batches:
            enc(x)
        floor = time.perf_counter() - t0
    print(f"pure forward: {floor:.2f} s ({n / floor:.1f} tiles/s)")
    out = {"n_tiles": n, "encoder": a.encoder, "batch_size": a.batch_size, "floor_s": floor, "runs": {}}
    for w in a.num_workers:
        cfg = EmbedConfig(a.encoder, pretrained=not a.random_weights, batch_size=a.batch_size, num_workers=w,
                          device="cpu", overwrite=True)
        t0 = time.perf_counter()
        res = embed_store(a.store, cfg, ids, progress=False)
        e2e = time.perf_counter() - t0
        assert all(r.status == "embedded" for r in res), res
        print(f"wsi embed, {w} loader workers: {e2e:.2f} s ({n / e2e:.1f} tiles/s) = {e2e / floor:.2f}x the forward")
        out["runs"][w] = {"seconds": e2e, "ratio": e2e / floor}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
