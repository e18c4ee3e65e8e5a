"""`wsi embed` as a Python API: tiles of a store -> `slides/<id>/features/<encoder>`.

Tiles are read only through `wsi.data.TileDataset`: a DataLoader's workers take one slide's tiles in
order, a whole number of store chunks per batch, so each chunk is decompressed (or each region read
from the slide) once. Pinned memory and non-blocking copies feed the model; preprocessing runs
batched on the device; mixed precision per encoder on an accelerator (`wsi.runtime`). Per slide: a
claim (`wsi.claims`) so that two processes, torchrun ranks or hosts never embed the same slide,
features marked complete only when every row is written, failures recorded and skipped.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .claims import DEFAULT_TIMEOUT_S, claim
from .errors import PathmilError, StoreError
from .runtime import autocast, dist_info, resolve_device, resolve_precision
from .store import FEATURE_ROWS_PER_CHUNK, TILE_CHUNK, TileStore, feature_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    encoder: str = field(metadata={"help": "a name from `wsi encoders`, or timm:<arch>, hf-hub:<repo>, "
                                           "open_clip:<arch>[@<pretrained>], local:<dir>"})
    weights: str | None = field(default=None, metadata={
        "help": "local .safetensors weights to load instead of the hub's"})
    pretrained: bool = field(default=True, metadata={
        "help": "load the encoder's weights; False gives random weights (tests, benchmarks)"})
    batch_size: int = field(default=64, metadata={
        "help": f"tiles per forward pass (rounded down to a multiple of {TILE_CHUNK}, the store's chunk)"})
    num_workers: int | None = field(default=None, metadata={
        "help": "DataLoader processes reading tiles (default: 0 on CPU, where the forward already uses "
                "every core; 4 on a GPU)"})
    device: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda | cuda:N (under torchrun, cuda means cuda:$LOCAL_RANK)"})
    precision: str = field(default="auto", metadata={
        "help": "auto: the encoder's own on a GPU, fp32 on CPU"})
    dtype: Literal["float32", "float16"] = field(default="float32", metadata={
        "help": "stored feature type: float16 halves the features on disk and in `mil train`'s cache "
                "(MIL reads either and computes in float32 or under autocast)"})
    overwrite: bool = field(default=False, metadata={"help": "embed again slides that already have features"})
    claim_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds after which a claim left by another host is taken over (its process is "
                "presumed dead; claims of this host are checked by pid)"})


@dataclass
class EmbedResult:
    slide_id: str
    status: str                     # embedded | skipped | claimed | failed
    n_tiles: int = 0
    seconds: float = 0.0
    error: str | None = None


def _images(samples: list[dict]):
    """Collate TileDataset samples (one slide, in order) into a uint8 (B, P, P, 3) tensor."""
    import torch

    return torch.stack([s["image"] for s in samples])


def tile_loader(store: TileStore, slide_id: str, batch_size: int, num_workers: int, pin_memory: bool):
    """A DataLoader over one slide's tiles in coords order: uint8 (B, P, P, 3) batches of whole store
    chunks, each read by `TileDataset.__getitems__` with one `read_tiles` call."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from .data import TileDataset

    n = store[slide_id].n_tiles
    ds = TileDataset(store, [(slide_id, i) for i in range(n)])
    bs = max(TILE_CHUNK, batch_size - batch_size % TILE_CHUNK)
    workers = num_workers if n > bs else 0
    return DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), bs, drop_last=False),
                      collate_fn=_images, num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def embed_slide(store: TileStore, slide_id: str, encoder, device, cfg: EmbedConfig, progress: bool = True) -> int:
    """Embed one slide's tiles into `features/<cfg.encoder>`; returns the number of tiles."""
    import torch
    from tqdm.auto import tqdm

    view = store[slide_id]
    if view.meta.features_only:
        raise StoreError(f"{store.path}: slide {slide_id!r} was imported with features only "
                         f"(from {view.meta.source}), so there are no tile pixels to embed; tile its slide "
                         "with `wsi tile` into a store first")
    n = view.n_tiles
    if n:
        view.read_tiles([0])  # a slide file that is gone or changed fails here, in one clear line
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if device.type == "cpu" else 4)
    loader = tile_loader(store, slide_id, cfg.batch_size, workers, pin_memory=device.type == "cuda")
    precision = resolve_precision(device, cfg.precision, encoder.spec.precision)
    attrs = {"weights": encoder.weights, "weights_digest": encoder.digest(), "transform": encoder.transform_attrs(),
             "dim": encoder.spec.dim, "precision": precision, "license": encoder.spec.license,
             "source": "tiles" if view.has_tiles else "slide"}
    out = view.create_features(cfg.encoder, encoder.spec.dim, attrs, dtype=cfg.dtype)
    buf = np.empty((max(1, min(n, FEATURE_ROWS_PER_CHUNK)), encoder.spec.dim), cfg.dtype)
    limit = float(np.finfo(cfg.dtype).max)
    done = flushed = 0
    with tqdm(total=n, desc=f"{slide_id} [{cfg.encoder}]", unit="tile", disable=not progress, leave=False) as bar, \
            torch.inference_mode():
        for batch in loader:
            x = encoder.preprocess(batch.to(device, non_blocking=True))
            with autocast(device, precision):
                f = encoder(x)
            f = f.float().cpu().numpy()
            big = float(np.abs(f).max(initial=0)) if cfg.dtype != "float32" else 0.0
            if big > limit:   # float16 would store inf: refuse rather than write features MIL cannot use
                raise PathmilError(f"{slide_id}: {cfg.encoder!r} features reach {big:.4g}, beyond {cfg.dtype}'s "
                                   f"range ({limit:.4g}); embed with --dtype float32")
            # Rows reach the store one whole feature chunk at a time.
            k = 0
            while k < len(f):
                take = min(len(f) - k, len(buf) - (done - flushed))
                buf[done - flushed:done - flushed + take] = f[k:k + take]
                done, k = done + take, k + take
                if done - flushed == len(buf) or done == n:
                    out[flushed:done] = buf[:done - flushed]
                    flushed = done
            bar.update(len(f))
    if done != n:
        raise RuntimeError(f"{slide_id}: embedded {done} of {n} tiles")
    out.finish()
    return n


def _selected(store: TileStore, slide_ids: list[str] | None) -> list[str]:
    if not slide_ids:
        return store.complete_ids()
    missing = [s for s in slide_ids if s not in store]
    if missing:
        raise StoreError(f"{store.path}: no slide {', '.join(map(repr, missing[:5]))}"
                         f"{' ...' if len(missing) > 5 else ''}; `wsi info {store.path}` lists its slides")
    return list(slide_ids)


def embed_store(store_path: str | Path, cfg: EmbedConfig, slide_ids: list[str] | None = None,
                progress: bool = True) -> list[EmbedResult]:
    """Embed every complete slide of the store (or `slide_ids`). Under torchrun, ranks take disjoint
    slides; claims keep concurrent processes from duplicating work. Failures are recorded and skipped.
    A store that does not exist raises StoreError, and nothing is created."""
    from .encoders import create_encoder

    store = TileStore.open(store_path)
    rank, world, _ = dist_info()
    ids = _selected(store, slide_ids)[rank::world]
    results: list[EmbedResult] = []
    todo = []
    for sid in ids:
        try:
            view = store[sid]
            if cfg.overwrite or not view.has_features(cfg.encoder):
                todo.append(sid)
            else:
                results.append(EmbedResult(sid, "skipped", view.n_tiles))
        except StoreError as e:  # a damaged slide: reported, the others go on
            results.append(EmbedResult(sid, "failed", error=str(e)))
    if not todo:
        return results
    device = resolve_device(cfg.device)
    encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained, weights=cfg.weights)
    encoder.model.to(device)
    log.info("%s on %s: %d slides to embed (rank %d of %d)", cfg.encoder, device, len(todo), rank, world)
    claims_dir = None if "://" in str(store.path) else Path(store.path) / ".claims"
    if claims_dir is None:
        log.warning("%s: claims need a filesystem path; concurrent runs on this store may repeat work", store.path)
    key = feature_key(cfg.encoder)
    for sid in todo:
        t0 = time.perf_counter()
        held = claim(claims_dir, f"{sid}.{key}", cfg.claim_timeout_s) if claims_dir else nullcontext(True)
        with held as mine:
            if not mine:
                log.info("%s: claimed by another process, skipped", sid)
                results.append(EmbedResult(sid, "claimed"))
                continue
            try:
                view = store[sid]
                if not cfg.overwrite and view.has_features(cfg.encoder):  # done while we waited
                    results.append(EmbedResult(sid, "skipped", view.n_tiles))
                    continue
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
