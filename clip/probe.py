"""Few-shot linear probes, Patho-R1's protocol: image-tower features of the store's tiles, then for each
shot count k (2, 8, 16, 32, 64, 128) and 10 subsets (seed 42 + i), k tiles per class drawn from the
training slides, sklearn `LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)`, scored on every
labelled tile of the held-out slides: mean ± std (ddof 0) of accuracy and balanced accuracy.

Features are `wsi embed`'s (`wsi.embed.embed_store`), cached in the store under the encoder's name
(a registry name, `pathoclip:<RUN_DIR>`, `open_clip:<arch>@<tag>`, ...: `embed_spec`), and
L2-normalised before the probe as clip_benchmark's linear probe does. Cached features are used only when
they were made by the same weights: their `weights_digest` must be the model's (`Encoder.digest()`),
for every kind of model (a registry name with or without `--pretrained FILE`, an architecture, a
RUN_DIR trained again); other features under the name are embedded again. Random-init weights have
no identity: their cache is reused (`refresh` embeds again).
Slides are split by patient where `patients` ({slide_id: patient_id}, `wsi.splits.read_patients`)
says, else by slide (`wsi.splits.split_groups`); a RUN_DIR's training slides are never scored
(`clip.heldout`; `include_training` keeps them).
Labels map to classes as `wsi.tile_classes` says (class indices, or binary fractions positive when
> 0.5).
A shot count larger than the smallest class of the training tiles is skipped and said so.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wsi.errors import LabelsError, PathmilError, StoreError
from wsi.store import TileStore

from wsi.splits import split_groups
from wsi.tile_classes import class_indices

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


def split_slides(slide_ids: Sequence[str], test_fraction: float = 0.3, seed: int = 0,
                 patients: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """A deterministic split (train, test) of slides, each sorted, whole patients on one side
    (`wsi.splits.split_groups`); at least one slide on each side."""
    ids = sorted(slide_ids)
    try:
        train, test = split_groups(ids, test_fraction, seed, patients=patients)
    except LabelsError as e:
        raise LabelsError(f"a probe needs train and held-out slides: {e}; add slides or pass the train and "
                          "test slides") from None
    return [ids[i] for i in train], [ids[i] for i in test]


def cached_features(store: TileStore | str | Path, encoder: str, slides: Sequence[str], *, pretrained: bool = True,
                    weights: str | None = None, digest: str | None = None, refresh: bool = False,
                    batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, np.ndarray]:
    """{slide_id: (N, D) float32} image-tower features of `encoder`, embedded into the store when
    missing, made by other weights (a `weights_digest` other than the model's: `digest`, else the
    digest of the model built from `encoder`, `pretrained`, `weights`), or always with `refresh`.
    Random-init models (`pretrained=False`, no `weights`, no `digest`) reuse features of random-init
    weights."""
    from wsi.embed import EmbedConfig, embed_slide
    from wsi.encoders import create_encoder
    from wsi.runtime import resolve_device

    from . import models  # noqa: F401  (registers PathoCLIP's encoders)

    path = store.path if isinstance(store, TileStore) else store
    st = TileStore.open(path)
    random_init = not pretrained and not weights
    built = None
    if digest is None and not random_init:
        built = create_encoder(encoder, pretrained=pretrained, weights=weights)
        digest = built.digest()

    def stale(s: str) -> bool:
        if refresh or not st[s].has_features(encoder):
            return True
        meta = st[s].feature_meta(encoder)
        if digest is None:  # random-init weights, no digest asked for: features of random-init weights do
            return meta.get("weights") != "random-init"
        return meta.get("weights_digest") != digest

    todo = [s for s in slides if stale(s)]
    if todo:
        built = built or create_encoder(encoder, pretrained=pretrained, weights=weights)
        dev = resolve_device(device)
        built.model.to(dev)
        cfg = EmbedConfig(encoder=encoder, pretrained=pretrained, weights=weights, batch_size=batch_size,
                          device=device, overwrite=True)
        for s in todo:
            try:
                embed_slide(st, s, built, dev, cfg, progress)
            except (StoreError, OSError, RuntimeError) as e:
                raise StoreError(f"{path}: features {encoder!r} could not be made for slide {s!r} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); fix it or "
                                 "leave the slide out") from None
    st = TileStore.open(path, readonly=True)
    return {s: st[s].features(encoder, np.float32) for s in slides}


def _normalise(x: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import normalize

    return normalize(x, norm="l2", axis=1)


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
          refresh: bool = False, patients: Mapping[str, str] | None = None, include_training: bool = False,
          batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """The few-shot probe of `model` (as `clip.models.load_model` takes it: a registry name, an
    open_clip architecture with `pretrained`, or a RUN_DIR; see `embed_spec`) on per-tile `labels`.
    Slides: `train_slides` / `test_slides` (one given: the other is every other complete slide), else
    `split_slides(complete slides, test_fraction, split_seed, patients)`. A RUN_DIR's training slides
    (`clip.heldout`) are never on the test side, and not in a seeded split at all, unless
    `include_training`; a given test slide that is one is refused.
    Returns {"model", "data", "config", "metrics"} (`clip.results`); metrics are few_shot's plus
    "n_train", "n_test" (labelled tiles) and "classes": {index: {"train": tiles, "test": tiles}}."""
    from .heldout import leave_out_training

    encoder, weights, use_pretrained = embed_spec(model, pretrained, random_init)
    path = store.path if isinstance(store, TileStore) else store
    st = TileStore.open(path, readonly=True)
    every = st.complete_ids()
    pool, held = leave_out_training(encoder, every, include_training)   # what a held-out side may hold
    bad = [s for s in test_slides or [] if s in held["excluded"]]
    if bad:
        raise PathmilError(f"test slide {bad[0]!r} is a training slide of {held['run']}; give held-out slides, or "
                           "pass --include-training-slides")
    if train_slides is None and test_slides is None:
        train, test = split_slides(pool, test_fraction, split_seed, patients)
    else:  # the probe's own training side may hold the run's slides: only its test side is held out
        train = list(train_slides) if train_slides is not None else [s for s in every if s not in set(test_slides)]
        test = list(test_slides) if test_slides is not None else [s for s in pool if s not in set(train)]
    both = set(train) & set(test)
    if both or not train or not test:
        raise PathmilError(f"the probe needs disjoint, non-empty train and test slides (shared: "
                           f"{', '.join(sorted(both)) or 'none'}; train {len(train)}, test {len(test)})")
    if patients:
        shared = {patients.get(s, s) for s in train} & {patients.get(s, s) for s in test}
        if shared:
            raise PathmilError(f"patient {sorted(shared)[0]!r} has slides on both sides of the probe; put a "
                               "patient's slides on one side")
    ys = {}
    for sid in train + test:
        vals = st[sid].labels(labels)
        if vals is None:
            raise StoreError(f"{path}: slide {sid!r} has no labels {labels!r}; make them with "
                             f"`wsi labels {path} --name {labels}` or leave the slide out")
        ys[sid] = class_indices(vals, None, f"{path}: labels {labels!r} of slide {sid!r}")
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
                     "n": int(len(ya) + len(yb)), "training_slides": held},
            "config": {"labels": labels, "shots": [int(k) for k in shots], "n_subsets": int(n_subsets),
                       "seed": int(seed), "split": "given" if given else "seeded",
                       "test_fraction": None if given else test_fraction, "split_seed": None if given else split_seed,
                       "by_patient": bool(patients)},
            "metrics": metrics}
