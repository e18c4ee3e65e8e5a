"""Few-shot linear probes, Patho-R1's protocol: image-tower features of the store's tiles, then for each
shot count k (2, 8, 16, 32, 64, 128) and 10 subsets (seed 42 + i), k tiles per class drawn from the
training slides, sklearn `LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)`, scored on every
labelled tile of the held-out slides: mean ± std (ddof 0) of accuracy and balanced accuracy.

Features are `wsi embed`'s (`wsi.embed.embed_store`), cached in the store under the encoder's name
(a registry name, `pathoclip:<RUN_DIR>`, `open_clip:<arch>@<tag>`, ...: `embed_spec`), and
L2-normalised before the probe as clip_benchmark's linear probe does. The cache is keyed by that name:
features made by other weights under the same name (a RUN_DIR trained again, another weights file)
are embedded again only when the model's digest (`Encoder.digest()`) is given, or with `refresh`.
Labels map to classes as in `clip.zeroshot.tile_targets` (class indices, or binary fractions
positive when > 0.5).
A shot count larger than the smallest class of the training tiles is skipped and said so.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsi.errors import LabelsError, PathmilError, StoreError
from wsi.store import TileStore

from .zeroshot import tile_targets

log = logging.getLogger(__name__)

SHOTS = (2, 8, 16, 32, 64, 128)
N_SUBSETS = 10
SEED = 42


def embed_spec(model: str, pretrained: str | bool | None = None, random_init: bool = False
               ) -> tuple[str, str | None, bool]:
    """(the `wsi embed` encoder name, local weights file or None, pretrained) of `clip.models.load_model`'s
    arguments, for `EmbedConfig`: `clip.models.encoder_args`."""
    from .models import encoder_args

    return encoder_args(model, pretrained, random_init=random_init)


def split_slides(slide_ids: Sequence[str], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic slide split (train, test), each sorted; at least one slide on each side."""
    ids = sorted(slide_ids)
    if len(ids) < 2:
        raise LabelsError(f"a probe needs at least 2 slides (train and held-out), got {len(ids)}; add slides "
                          "or pass the train and test slides")
    n_test = min(len(ids) - 1, max(1, int(round(test_fraction * len(ids)))))
    perm = np.random.default_rng(seed).permutation(len(ids))
    test = sorted(ids[i] for i in perm[:n_test])
    return [s for s in ids if s not in test], test


def cached_features(store: TileStore | str | Path, encoder: str, slides: Sequence[str], *, pretrained: bool = True,
                    weights: str | None = None, digest: str | None = None, refresh: bool = False,
                    batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, np.ndarray]:
    """{slide_id: (N, D) float32} image-tower features of `encoder`, embedded into the store when missing
    (or made by weights whose digest is not `digest`, or always with `refresh`)."""
    from wsi.embed import EmbedConfig, embed_store

    from . import models  # noqa: F401  (registers PathoCLIP's encoders)

    path = store.path if isinstance(store, TileStore) else store
    st = TileStore.open(path, readonly=True)
    stale = [s for s in slides if refresh or (digest is not None and st[s].has_features(encoder)
                                               and st[s].feature_meta(encoder).get("weights_digest") != digest)]
    cfg = EmbedConfig(encoder=encoder, pretrained=pretrained, weights=weights, batch_size=batch_size, device=device)
    results = []
    if stale:
        results += embed_store(path, replace(cfg, overwrite=True), stale, progress)
    fresh = [s for s in slides if s not in stale]
    if fresh:
        results += embed_store(path, cfg, fresh, progress)
    failed = [r for r in results if r.status not in ("embedded", "skipped")]
    if failed:
        raise StoreError(f"{path}: features {encoder!r} could not be made for slide {failed[0].slide_id!r} "
                         f"({failed[0].status}: {failed[0].error}); fix it or leave the slide out")
    st = TileStore.open(path, readonly=True)
    return {s: st[s].features(encoder, np.float32) for s in slides}


def _normalise(x: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import normalize

    return normalize(x)


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def few_shot(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             shots: Sequence[int] = SHOTS, n_subsets: int = N_SUBSETS, seed: int = SEED) -> dict[str, Any]:
    """The probe on features (n, D) and class indices (n,): {"shots": {"k": {"accuracy": {mean, std,
    values}, "balanced_accuracy": ...}}, "skipped": {"k": reason}, "n_subsets", "seed"}. Subset i draws
    k tiles per class (classes in increasing order) with `np.random.default_rng(seed + i)`."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    classes = np.unique(y_train)
    if len(classes) < 2:
        raise LabelsError(f"the training slides hold {len(classes)} class(es) of labelled tiles; a probe needs "
                          "two or more: choose other training slides")
    if not len(y_test):
        raise LabelsError("the held-out slides hold no labelled tiles; choose other test slides")
    pools = [np.flatnonzero(y_train == c) for c in classes]
    smallest = min(range(len(classes)), key=lambda i: len(pools[i]))
    out: dict[str, Any] = {"shots": {}, "skipped": {}, "n_subsets": int(n_subsets), "seed": int(seed)}
    for k in shots:
        if k > len(pools[smallest]):
            out["skipped"][str(k)] = (f"{k} shots > the {len(pools[smallest])} training tiles of class "
                                      f"{int(classes[smallest])}")
            log.warning("probe: %d shots skipped: %s", k, out["skipped"][str(k)])
            continue
        acc, bal = [], []
        for i in range(n_subsets):
            rng = np.random.default_rng(seed + i)
            pick = np.concatenate([rng.choice(p, size=k, replace=False) for p in pools])
            clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=seed + i)
            clf.fit(x_train[pick], y_train[pick])
            pred = clf.predict(x_test)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # classes predicted but absent from the test tiles
                acc.append(accuracy_score(y_test, pred))
                bal.append(balanced_accuracy_score(y_test, pred))
        out["shots"][str(k)] = {"accuracy": _mean_std(acc), "balanced_accuracy": _mean_std(bal)}
    return out


def probe(model: str, store: TileStore | str | Path, labels: str, shots: Sequence[int] = SHOTS,
          n_subsets: int = N_SUBSETS, seed: int = SEED, train_slides: Sequence[str] | None = None,
          test_slides: Sequence[str] | None = None, test_fraction: float = 0.3, split_seed: int = 0, *,
          pretrained: str | bool | None = None, random_init: bool = False, digest: str | None = None,
          refresh: bool = False, batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """The few-shot probe of `model` (as `clip.models.load_model` takes it: a registry name, an
    open_clip architecture with `pretrained`, or a RUN_DIR; see `embed_spec`) on per-tile `labels`.
    Slides: `train_slides` / `test_slides` (one given: the other is every other complete slide), else
    `split_slides(complete slides, test_fraction, split_seed)`.
    Returns {"model", "data", "config", "metrics"} (`clip.results`); metrics are few_shot's plus
    "n_train", "n_test" (labelled tiles) and "classes": {index: {"train": tiles, "test": tiles}}."""
    encoder, weights, use_pretrained = embed_spec(model, pretrained, random_init)
    if digest is None and encoder.startswith("pathoclip:"):  # a run trained again in place: embed it again
        from wsi.encoders import create_encoder

        digest = create_encoder(encoder).digest()
    path = store.path if isinstance(store, TileStore) else store
    st = TileStore.open(path, readonly=True)
    every = st.complete_ids()
    if train_slides is None and test_slides is None:
        train, test = split_slides(every, test_fraction, split_seed)
    else:
        train = list(train_slides) if train_slides is not None else [s for s in every if s not in set(test_slides)]
        test = list(test_slides) if test_slides is not None else [s for s in every if s not in set(train)]
    both = set(train) & set(test)
    if both or not train or not test:
        raise PathmilError(f"the probe needs disjoint, non-empty train and test slides (shared: "
                           f"{', '.join(sorted(both)) or 'none'}; train {len(train)}, test {len(test)})")
    ys = {}
    for sid in train + test:
        vals = st[sid].labels(labels)
        if vals is None:
            raise StoreError(f"{path}: slide {sid!r} has no labels {labels!r}; make them with "
                             f"`wsi labels {path} --name {labels}` or leave the slide out")
        ys[sid] = tile_targets(vals, None, f"{path}: labels {labels!r} of slide {sid!r}")
    feats = cached_features(path, encoder, train + test, pretrained=use_pretrained, weights=weights, digest=digest,
                            refresh=refresh, batch_size=batch_size, device=device, progress=progress)

    def part(ids):
        x = np.concatenate([feats[s] for s in ids]).astype(np.float32)
        y = np.concatenate([ys[s] for s in ids])
        return _normalise(x[y >= 0]), y[y >= 0]

    (xa, ya), (xb, yb) = part(train), part(test)
    metrics = few_shot(xa, ya, xb, yb, shots, n_subsets, seed)
    names = sorted(set(ya.tolist()) | set(yb.tolist()))
    metrics.update(n_train=int(len(ya)), n_test=int(len(yb)),
                   classes={str(c): {"train": int((ya == c).sum()), "test": int((yb == c).sum())} for c in names})
    meta = TileStore.open(path, readonly=True)[train[0]].feature_meta(encoder)
    given = train_slides is not None or test_slides is not None
    return {"model": {"name": encoder, "weights": meta.get("weights"), "digest": meta.get("weights_digest")},
            "data": {"store": str(path), "slides": train + test, "train_slides": train, "test_slides": test,
                     "n": int(len(ya) + len(yb))},
            "config": {"labels": labels, "shots": [int(k) for k in shots], "n_subsets": int(n_subsets),
                       "seed": int(seed), "split": "given" if given else "seeded",
                       "test_fraction": None if given else test_fraction, "split_seed": None if given else split_seed},
            "metrics": metrics}
