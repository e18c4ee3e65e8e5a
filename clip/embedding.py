"""Embeddings in an image-text model's shared space, for evaluation: store tiles (through
`wsi.data.TileDataset`), image files and texts, as L2-normalised float32 numpy arrays.

    img = embed_tiles(enc, store, [("slide-1", 0), ("slide-1", 1)])    # (2, E)
    txt = embed_texts(enc, ["an H&E image of tumor."])                   # (1, E)

Batches of uint8 tiles are preprocessed on the model's device (`Encoder.preprocess`) and run under
`torch.inference_mode()`, with the encoder's own mixed precision on a GPU (`wsi.runtime`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.preprocessing import normalize

from wsi.errors import PathmilError
from wsi.paths import open_data_file
from wsi.runtime import autocast, resolve_device, resolve_precision
from wsi.store import TILE_CHUNK, TileStore

RANK_CHUNK = 4096    # tiles embedded at a time when ranking a slide's tiles against a text


def model_device(enc) -> torch.device:
    """The device the encoder's parameters are on."""
    return next(iter(enc.model.parameters())).device


def place(enc, device: str | torch.device = "auto") -> torch.device:
    """Move the encoder to `device` ("auto": CUDA when there is one) and return it."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    enc.model.to(dev)
    return dev


def _stack(samples: list[dict]) -> torch.Tensor:
    return torch.stack([s["image"] for s in samples])


def _encode_batches(enc, batches, dev: torch.device, precision: str, total: int, progress: bool,
                    desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    prec = resolve_precision(dev, precision, enc.spec.precision)
    out = []
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            x = enc.preprocess(batch.to(dev, non_blocking=True))
            with autocast(dev, prec):
                f = enc.encode_image(x, normalize=False)
            # normalised in fp32: under bf16 autocast the norm of a low-precision vector is off by ~1e-2
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
            bar.update(len(batch))
    dim = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _open(store: TileStore | str | Path) -> TileStore:
    return store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)


def _has_stored(enc, view, digest: list) -> bool:
    """Whether `view` holds this model's image embeddings, made by these very weights (`digest`: a
    one-item cache of the model's digest, computed once)."""
    name = enc.spec.name
    if not getattr(enc.model, "features_are_embedding", False) or not view.has_features(name):
        return False
    if not digest:
        digest.append(enc.digest())
    return view.feature_meta(name).get("weights_digest") == digest[0]


def stored_embeddings(enc, store: TileStore | str | Path, items: Sequence[tuple[str, int]]) -> np.ndarray | None:
    """The embeddings of `items` from features the store already holds for this model (`wsi embed`,
    `clip probe`), L2-normalised; None unless every slide has them, made by these very weights. Only
    for models whose stored features are their image embedding (open_clip, PLIP; not CONCH, which
    stores its pre-projection features)."""
    if not items:
        return None
    st, digest, by_slide = _open(store), [], {}
    for sid in dict.fromkeys(s for s, _ in items):
        if not _has_stored(enc, st[sid], digest):
            return None
        by_slide[sid] = st[sid].features(enc.spec.name, np.float32)
    return normalize(np.stack([by_slide[s][i] for s, i in items]).astype(np.float32))


def embed_tiles(enc, store: TileStore | str | Path, items: Sequence[tuple[str, int]], batch_size: int = 64,
                device: str | torch.device = "auto", progress: bool = True, *, precision: str = "auto",
                num_workers: int | None = None) -> np.ndarray:
    """Image embeddings of store tiles `items` [(slide_id, tile index), ...] -> (N, E) float32,
    L2-normalised, in the order of `items`. Tiles are read slide by slide in coords order (each store
    chunk decompressed once) and put back in the order asked for."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from wsi.data import TileDataset

    items = [(str(s), int(i)) for s, i in items]
    stored = stored_embeddings(enc, store, items)
    if stored is not None:
        return stored
    dev = place(enc, device)
    order = sorted(range(len(items)), key=lambda k: items[k])
    ds = TileDataset(store, [items[k] for k in order])
    bs = max(TILE_CHUNK, batch_size - batch_size % TILE_CHUNK)
    workers = num_workers if num_workers is not None else (0 if dev.type == "cpu" else 4)
    workers = workers if len(ds) > bs else 0
    loader = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), bs, drop_last=False),
                        collate_fn=_stack, num_workers=workers, pin_memory=dev.type == "cuda")
    emb = _encode_batches(enc, loader, dev, precision, len(ds), progress, f"embed tiles [{enc.spec.name}]")
    out = np.empty_like(emb)
    out[np.asarray(order, np.int64)] = emb
    return out


def _best(idx: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores, best first; ties keep the lower index."""
    order = np.lexsort((idx, -scores))[:k]
    return idx[order], scores[order]


def rank_tiles(enc, store: TileStore | str | Path, slide: str, query: np.ndarray, k: int, *,
               chunk: int = RANK_CHUNK, batch_size: int = 64, device: str | torch.device = "auto",
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, cosine float32) of the k tiles of `slide` whose image embedding is closest to the
    L2-normalised embedding `query` (E,), best first, ties to the lower index. From the store's features
    of this model when it holds them (`stored_embeddings`); else the tiles are embedded `chunk` at a
    time and only the best k kept, so memory does not grow with the slide."""
    st = _open(store)
    view = st[slide]
    q = np.asarray(query, np.float32).reshape(-1)
    if _has_stored(enc, view, []):
        sims = normalize(view.features(enc.spec.name, np.float32)) @ q
        return _best(np.arange(len(sims), dtype=np.int64), sims.astype(np.float32), k)
    idx, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, view.n_tiles, max(1, int(chunk))):
        rows = np.arange(start, min(start + max(1, int(chunk)), view.n_tiles), dtype=np.int64)
        img = embed_tiles(enc, st, [(slide, int(i)) for i in rows], batch_size, device, progress=progress)
        idx, scores = _best(np.concatenate([idx, rows]), np.concatenate([scores, (img @ q).astype(np.float32)]), k)
    return idx, scores


def _square(path: str, side: int) -> np.ndarray:
    """An image file as uint8 (side, side, 3): the centre square, resized (open_clip's resize +
    centre crop, done in PIL so files of any size batch together)."""
    from PIL import Image

    try:
        with open_data_file(path) as f, Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            return np.asarray(im.resize((side, side), Image.BICUBIC, box=box), np.uint8)
    except OSError as e:
        raise PathmilError(f"{path}: cannot read the image ({e}); remove its row from the captions CSV") from None


def embed_files(enc, paths: Sequence[str | Path], batch_size: int = 64, device: str | torch.device = "auto",
                progress: bool = True, *, precision: str = "auto") -> np.ndarray:
    """Image embeddings of image files (local paths, or URLs a captions CSV was allowed) -> (N, E) float32,
    L2-normalised."""
    dev = place(enc, device)
    side = enc.spec.resize or enc.spec.input_size

    def batches():
        for i in range(0, len(paths), batch_size):
            yield torch.from_numpy(np.stack([_square(str(p), side) for p in paths[i:i + batch_size]]))

    return _encode_batches(enc, batches(), dev, precision, len(paths), progress, f"embed files [{enc.spec.name}]")


def embed_texts(enc, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Text embeddings -> (T, E) float32, L2-normalised, on the encoder's current device."""
    dev = model_device(enc)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tokens = enc.tokenize(list(texts[i:i + batch_size])).to(dev)
            f = enc.encode_text(tokens, normalize=False)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
