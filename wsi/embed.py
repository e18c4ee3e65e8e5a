"""`wsi embed` as a Python API: tiles of a store -> `slides/<id>/features/<encoder>`.

DataLoader workers read (and decompress, or decode from the slide) whole store chunks; pinned memory
and non-blocking copies feed the model; preprocessing runs batched on the device; mixed precision per
encoder on an accelerator. Per slide: a claim file so that two processes (or torchrun ranks) never
embed the same slide, features marked complete only when every row is written, failures skipped.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .store import COMPLETE, FEATURE_ROWS_PER_CHUNK, TILE_CHUNK, TileStore, feature_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    encoder: str
    weights: str | None = None      # local safetensors instead of the hub
    pretrained: bool = True         # False: random weights (tests, benchmarks)
    batch_size: int = 64
    num_workers: int | None = None  # None: 0 on CPU (compute already uses every core), 4 on an accelerator
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (the encoder's on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    overwrite: bool = False


@dataclass
class EmbedResult:
    slide_id: str
    status: str                     # embedded | skipped | claimed | failed
    n_tiles: int = 0
    seconds: float = 0.0
    error: str | None = None


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{distributed_rank()[2]}"
    return torch.device(device)


# ---- claims: one process per (slide, encoder) ------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextmanager
def claim(store_path: Path, slide_id: str, key: str):
    """Yield True if this process holds the claim on (slide, encoder), False if another live one does.

    A claim is a file created with O_EXCL; one left by a dead process on this host is taken over."""
    d = Path(store_path) / ".claims"
    d.mkdir(exist_ok=True)
    path = d / f"{slide_id}.{key}.claim"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and other.get("pid") and not _pid_alive(int(other["pid"])):
                path.unlink(missing_ok=True)  # stale: its process died
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


# ---- data ----------------------------------------------------------------------------------------
class TileBatches:
    """A map-style dataset whose items are whole batches of one slide's tiles (uint8, B×P×P×3).

    Batches are aligned to the store's chunks, so each chunk is decompressed once. Without stored
    tiles, the pixels are read from the slide through the coords, as `wsi tile` would."""

    def __init__(self, store_path: str, slide_id: str, batch_size: int):
        self.store_path, self.slide_id = str(store_path), slide_id
        self.batch_size = max(TILE_CHUNK, batch_size - batch_size % TILE_CHUNK)
        g = TileStore(store_path, mode="r").slide(slide_id)
        self.n = int(g["coords"].shape[0])
        self.from_slide = "tiles" not in g
        if self.from_slide and g.attrs.get("imported_from"):
            raise ValueError(f"imported from {g.attrs['imported_from']} with features only, so there are no tile "
                             "pixels to embed; tile its slide with `wsi tile` into a store first")
        self._src = None

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _source(self):
        if self._src is None:  # opened lazily, once per DataLoader worker
            store = TileStore(self.store_path, mode="r")
            g = store.slide(self.slide_id)
            if not self.from_slide:
                self._src = g["tiles"]
            else:
                from .slide import open_slide
                from .tiling import TileReader, tile_geometry

                a = g.attrs
                slide = open_slide(a["source"], a.get("slide_mpp"))
                geom = tile_geometry(slide, a["mpp"], a["patch_size"], a.get("overlap", 0))
                self._src = (TileReader(slide, geom), g["coords"][:])
        return self._src

    def __getitem__(self, i: int):
        import torch

        s = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))
        src = self._source()
        arr = src[s] if not self.from_slide else src[0].read_many(src[1][s])
        return torch.from_numpy(np.ascontiguousarray(arr))


def _autocast(device, precision: str, preferred: str):
    import torch

    p = preferred if precision == "auto" else precision
    if device.type == "cpu" and precision == "auto":
        p = "fp32"
    if p == "fp32":
        return nullcontext(), "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[p]
    return torch.autocast(device_type=device.type, dtype=dtype), p


def embed_slide(store: TileStore, slide_id: str, encoder, device, cfg: EmbedConfig, progress: bool = True) -> int:
    """Embed one slide's tiles; returns the number of tiles."""
    import torch
    from tqdm.auto import tqdm

    ds = TileBatches(store.path, slide_id, cfg.batch_size)
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if device.type == "cpu" else 4)
    workers = workers if ds.n > ds.batch_size else 0
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    amp, precision = _autocast(device, cfg.precision, encoder.spec.precision)
    attrs = {"weights": encoder.weights, "weights_digest": encoder.digest(), "transform": encoder.transform_attrs(),
             "dim": encoder.spec.dim, "precision": precision, "license": encoder.spec.license,
             "source": "tiles" if not ds.from_slide else "slide"}
    arr = store.create_features(slide_id, cfg.encoder, ds.n, encoder.spec.dim, attrs)
    buf = np.empty((min(ds.n, FEATURE_ROWS_PER_CHUNK), encoder.spec.dim), np.float32)
    done = flushed = 0
    with tqdm(total=ds.n, desc=f"{slide_id} [{cfg.encoder}]", unit="tile", disable=not progress, leave=False) as bar, \
            torch.inference_mode():
        for batch in loader:
            x = encoder.preprocess(batch.to(device, non_blocking=True))
            with amp:
                f = encoder(x)
            f = f.float().cpu().numpy()
            # Rows are flushed to the store one whole feature chunk at a time.
            k = 0
            while k < len(f):
                take = min(len(f) - k, len(buf) - (done - flushed))
                buf[done - flushed:done - flushed + take] = f[k:k + take]
                done, k = done + take, k + take
                if done - flushed == len(buf) or done == ds.n:
                    arr[flushed:done] = buf[:done - flushed]
                    flushed = done
            bar.update(len(f))
    if done != ds.n:
        raise RuntimeError(f"{slide_id}: embedded {done} of {ds.n} tiles")
    store.finish_features(slide_id, cfg.encoder)
    return ds.n


def embed_store(store_path: str | Path, cfg: EmbedConfig, slide_ids: list[str] | None = None,
                progress: bool = True) -> list[EmbedResult]:
    """Embed every complete slide of the store (or `slide_ids`). Under torchrun, ranks take disjoint
    slides; claims keep concurrent processes from duplicating work. Failures are recorded and skipped."""
    from .encoders import create_encoder

    store = TileStore(store_path)
    rank, world, _ = distributed_rank()
    ids = slide_ids or [s for s in store.slide_ids() if store.status(s) == COMPLETE]
    ids = ids[rank::world]
    key = feature_key(cfg.encoder)
    todo = [s for s in ids if cfg.overwrite or not store.has_features(s, cfg.encoder)]
    results = [EmbedResult(s, "skipped", int(store.slide(s)["coords"].shape[0])) for s in ids if s not in todo]
    if not todo:
        return results
    device = resolve_device(cfg.device)
    encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained, weights=cfg.weights)
    encoder.model.to(device)
    log.info("%s on %s: %d slides to embed (rank %d of %d)", cfg.encoder, device, len(todo), rank, world)
    for sid in todo:
        t0 = time.perf_counter()
        with claim(store.path, sid, key) as mine:
            if not mine:
                log.info("%s: claimed by another process, skipped", sid)
                results.append(EmbedResult(sid, "claimed"))
                continue
            if not cfg.overwrite and store.has_features(sid, cfg.encoder):  # done while we waited
                results.append(EmbedResult(sid, "skipped"))
                continue
            try:
                n = embed_slide(store, sid, encoder, device, cfg, progress)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one bad slide never stops the cohort
                msg = f"{sid}: {type(e).__name__}: {e}"
                log.error("%s: embedding failed: %s", sid, msg)
                results.append(EmbedResult(sid, "failed", error=msg))
                continue
        dt = time.perf_counter() - t0
        log.info("%s: %d tiles in %.1f s (%.0f tiles/s)", sid, n, dt, n / max(dt, 1e-9))
        results.append(EmbedResult(sid, "embedded", n, dt))
    return results


def results_json(results: list[EmbedResult]) -> list[dict]:
    return [asdict(r) for r in results]
