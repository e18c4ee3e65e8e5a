"""Cross-modal retrieval Recall@K both ways, with several captions per image (ARCH-style, as Patho-R1
reports it).

- image -> text: an image hits at K when any of its captions ranks in the top K texts;
- text -> image: a caption hits at K when its image ranks in the top K images.

Identical caption texts are one text owned by all their images (`unique_texts`): a text then hits
when any of its images ranks in the top K.

Ties count against the query: a candidate scoring the same as the right answer ranks ahead of it, so
a model whose scores are all equal gets the lowest recall, not a perfect one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsi.errors import PathmilError
from wsi.store import TileStore

from .embedding import embed_files, embed_texts, embed_tiles, place
from .results import model_identity

KS = (1, 5, 10, 20)


def recall_at_k(sim: np.ndarray, txt_to_img: np.ndarray, ks: Sequence[int] = KS) -> dict[str, Any]:
    """Recall@K of a similarity matrix `sim` (n_img, n_txt). `txt_to_img`: the image index of each
    caption (n_txt,), or a boolean matrix (n_img, n_txt) when a text belongs to several images (the
    same caption text given to several images: it then hits when any of them ranks in the top K).
    Images without a caption are not queries. Returns {"image_to_text": {"R@k": r}, "text_to_image":
    {...}, "mean_recall", "n_images", "n_texts"}, recalls as fractions."""
    sim = np.asarray(sim, np.float64)
    n_img, n_txt = sim.shape
    owner = np.asarray(txt_to_img)
    if owner.dtype == bool:
        if owner.shape != (n_img, n_txt):
            raise ValueError(f"an ownership matrix must be {n_img} x {n_txt}, got {owner.shape}")
        mine = owner
    else:
        owner = owner.astype(np.int64).reshape(-1)
        if owner.shape != (n_txt,) or (n_txt and (owner.min() < 0 or owner.max() >= n_img)):
            raise ValueError(f"txt_to_img must give an image index in 0..{n_img - 1} for each of the {n_txt} texts")
        mine = np.zeros((n_img, n_txt), bool)
        mine[owner, np.arange(n_txt)] = True
    queries = mine.any(1)
    # image -> text: the rank of an image's best caption = other images' captions scoring at least as high
    best = np.where(mine, sim, -np.inf).max(1, keepdims=True)
    i2t_rank = (np.where(mine, -np.inf, sim) >= best).sum(1)[queries]
    # text -> image: the rank of a caption's best image = images not its own scoring at least as high
    right = np.where(mine, sim, -np.inf).max(0, keepdims=True)
    t2i_rank = (np.where(mine, -np.inf, sim) >= right).sum(0)
    i2t = {f"R@{k}": float(np.mean(i2t_rank < k)) if len(i2t_rank) else None for k in ks}
    t2i = {f"R@{k}": float(np.mean(t2i_rank < k)) if n_txt else None for k in ks}
    vals = [v for v in (*i2t.values(), *t2i.values()) if v is not None]
    return {"image_to_text": i2t, "text_to_image": t2i, "mean_recall": float(np.mean(vals)) if vals else None,
            "n_images": int(queries.sum()), "n_texts": int(n_txt)}


def unique_texts(pairs: Sequence[tuple[int, str]], n_img: int) -> tuple[list[str], np.ndarray]:
    """Identical caption texts merged: (the unique texts, ownership matrix (n_img, n_unique)). Without
    this, a caption repeated for several images (captions made from labels) would tie with itself and
    count as a miss."""
    index: dict[str, int] = {}
    for _, t in pairs:
        index.setdefault(" ".join(t.split()).lower(), len(index))
    mine = np.zeros((n_img, len(index)), bool)
    for p, t in pairs:
        mine[p, index[" ".join(t.split()).lower()]] = True
    return list(index), mine


def embed_images(enc, images: Sequence[tuple], store: TileStore | str | Path | None = None, batch_size: int = 64,
                 device: str = "auto", progress: bool = True) -> np.ndarray:
    """(N, E) embeddings of caption image keys: ("tile", slide_id, index) read from `store`, or
    ("file", path); in the order given."""
    dev = place(enc, device)
    tiles = [k for k, key in enumerate(images) if key[0] == "tile"]
    files = [k for k, key in enumerate(images) if key[0] == "file"]
    if len(tiles) + len(files) != len(images):
        bad = next(key for key in images if key[0] not in ("tile", "file"))
        raise ValueError(f"unknown image key {bad!r}: expected ('tile', slide_id, index) or ('file', path)")
    if tiles and store is None:
        raise PathmilError("the captions name store tiles (slide_id, tile); pass the tile store with --store")
    parts = []
    if tiles:
        parts.append((tiles, embed_tiles(enc, store, [images[k][1:] for k in tiles], batch_size, dev, progress)))
    if files:
        parts.append((files, embed_files(enc, [images[k][1] for k in files], batch_size, dev, progress)))
    dim = parts[0][1].shape[1] if parts else 0
    out = np.zeros((len(images), dim), np.float32)
    for where, emb in parts:
        out[np.asarray(where, np.int64)] = emb
    return out


def _held_out(enc, images: list[tuple], pairs: list[tuple[int, str]], groups: Sequence[str] | None,
              include_training: bool) -> tuple[list[tuple], list[tuple[int, str]], dict[str, Any]]:
    """The images (and their captions) whose slide the model's run was not trained on."""
    from .heldout import leave_out_training

    groups = list(groups) if groups is not None else [k[1] for k in images]
    kept, held = leave_out_training(enc, list(dict.fromkeys(groups)), include_training)
    if not held["excluded"]:
        return images, pairs, held
    keep = set(kept)
    new_pos: dict[int, int] = {}    # old image position -> position among the kept images
    for i, g in enumerate(groups):
        if g in keep:
            new_pos[i] = len(new_pos)
    return ([images[i] for i in new_pos], [(new_pos[p], t) for p, t in pairs if p in new_pos], held)


def retrieve(enc, captions, store: TileStore | str | Path | None = None, ks: Sequence[int] = KS,
             batch_size: int = 64, device: str = "auto", progress: bool = True, *,
             include_training: bool = False) -> dict[str, Any]:
    """Recall@K both ways of an image-text model on `captions` (a `clip.data.Captions`: `.images`, the
    image keys, `.captions`, [(image position, text)], and `.store_path` when `store` is not given).
    Images of the slides the model's run was trained on are left out (`clip.heldout`), unless
    `include_training`.
    Returns {"model", "data", "config", "metrics"} (`clip.results`), metrics as `recall_at_k`'s."""
    images, pairs, held = _held_out(enc, list(captions.images), list(captions.captions),
                                    getattr(captions, "groups", None), include_training)
    if not images or not pairs:
        why = (f"every image is of a training slide of {held['run']}; give captions of held-out slides, or pass "
               "--include-training-slides") if held["excluded"] else ("check the captions CSV (its summary lists "
                                                                     "the rows dropped)")
        raise PathmilError(f"no caption pairs to retrieve from; {why}")
    store = store if store is not None else getattr(captions, "store_path", None)
    img = embed_images(enc, images, store, batch_size, device, progress)
    texts, mine = unique_texts(pairs, len(images))
    txt = embed_texts(enc, texts)
    metrics = recall_at_k(img @ txt.T, mine, ks)
    metrics["n_captions"] = len(pairs)
    source = getattr(captions, "source", None)
    slides = list(dict.fromkeys(k[1] for k in images if k[0] == "tile"))
    return {"model": model_identity(enc),
            "data": {"store": None if store is None else str(getattr(store, "path", store)),
                     "captions": None if source is None else str(source), "slides": slides,
                     "n": metrics["n_images"], "n_texts": metrics["n_texts"], "training_slides": held},
            "config": {"ks": list(ks)}, "metrics": metrics}
