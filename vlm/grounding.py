"""The offline process reward: PathoCLIP grounding. Reasoning that describes what is in its image earns
more than generic text, or text that describes a tile of another class.

For each completion:
1. findings: the sentences of its <think> block (`prompts.parse_completion`) that assert something.
   Sentences that rule something out ("no", "not", "without", "absent", "ruled out", "excludes", ...)
   describe what is NOT in the image, and a CLIP text tower does not understand negation (it would
   reward "no tumour cells" on a tumour tile), so they are left out. A completion with no <think> block,
   an empty one, or only negated sentences scores 0.
2. the findings' text vector: the mean of the L2-normalised PathoCLIP text embeddings of its sentences,
   normalised again (as zero-shot class vectors are, `clip.zeroshot.class_vectors`).
3. a contrastive margin against a fixed bank of negatives (`NegativeBank`), not against the batch: the
   bank holds, per class, up to `per_class` tiles drawn once per run (seeded) from the training rows and
   embedded once. A row's class is its correct option's text (synonyms of `clip.captions` mapped to their
   class, so "carcinoma" and "tumor" rows are one class), or an open question's answer. The margin is
   cos(text, own image) minus, over the classes OTHER than the completion's own, the max (`reduce="max"`,
   the default) of each class's mean cosine, or (`reduce="mean"`) the mean cosine over all their tiles.
   A completion's image vector is the normalised mean over its images. The reward of a completion thus
   depends on its text, its image and its class only, never on which other prompts share its batch (with
   in-batch negatives it sat near 0.5 whenever the other tile was of the same class).
4. reward = sigmoid(scale * margin), in [0, 1], with scale = PathoCLIP's own logit_scale by default:
   CLIP's two-way softmax between the own image and the most similar other class, i.e. the probability
   the findings pick out their own image. 0.5 = no evidence either way; a completion whose class has no
   other class in the bank scores that neutral 0.5.

Images arrive as trl passes the dataset's `images` column: per completion a PIL image, an (H, W, 3)
uint8 array, or a list of them; store references {"store", "slide", "tile"} and file paths are read
with `vlm.data.load_images`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .prompts import LETTERS, VlmError, answer_letter, normalize_text, parse_completion
from .rewards import RewardFunc, completion_text

log = logging.getLogger(__name__)

REDUCTIONS = ("mean", "max")
_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")
_NEGATION = re.compile(r"\b(?:no|not|none|nor|without|absent|absence|lacks?|lacking|free of|negative for|"
                       r"rules?\s+out|ruled\s+out|exclude[sd]?|excluding|eliminate[sd]?|unlikely)\b|n't\b",
                       re.IGNORECASE)


def findings(think: str | None) -> list[str]:
    """The asserting sentences of a <think> text, in order (negated ones left out; see the module
    docstring). None or blank -> []."""
    if not think or not think.strip():
        return []
    sentences = [s.strip() for s in _SENTENCES.split(think) if s and s.strip()]
    return [s for s in sentences if not _NEGATION.search(s)]


def _as_list(entry: Any) -> list[Any]:
    """One completion's images as a list (a single image, or already a list / tuple of them)."""
    if entry is None:
        return []
    if isinstance(entry, (list, tuple)):
        return list(entry)
    return [entry]


def to_uint8(image: Any) -> np.ndarray:
    """A PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array -> (H, W, 3) uint8 RGB."""
    if hasattr(image, "convert") and hasattr(image, "size"):        # PIL
        return np.asarray(image.convert("RGB"), np.uint8)
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise VlmError(f"an image array of dtype {a.dtype}: the grounding reward takes uint8 (H, W, 3) arrays or PIL "
                       "images; convert with (x * 255).astype(np.uint8)")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise VlmError(f"an image array of shape {a.shape}: give (H, W, 3) uint8 RGB")
    return np.ascontiguousarray(a[:, :, :3])


def _load(entries: Sequence[Any]) -> list[list[np.ndarray]]:
    """Per completion, its images as uint8 arrays; store references and paths read in one batch."""
    from .data import load_images

    refs = [(k, j, img) for k, e in enumerate(entries) for j, img in enumerate(_as_list(e))
            if isinstance(img, (Mapping, str, Path))]
    loaded = dict(zip([(k, j) for k, j, _ in refs], load_images([r for _, _, r in refs]))) if refs else {}
    return [[to_uint8(loaded.get((k, j), img)) for j, img in enumerate(_as_list(e))] for k, e in enumerate(entries)]


def _image_vectors(enc: Any, arrays: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """(N, E) L2-normalised PathoCLIP image embeddings of uint8 tiles of any sizes, each preprocessed as
    `clip.embedding` does (`Encoder.preprocess` on the model's device)."""
    import torch

    from clip.embedding import model_device

    dev = model_device(enc)
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), batch_size):
            # one image at a time through preprocess (tiles of different sizes), then one forward pass
            chunk = arrays[i:i + batch_size]
            x = torch.cat([enc.preprocess(torch.as_tensor(np.array(a))[None].to(dev)) for a in chunk])
            f = enc.encode_image(x, normalize=False)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import normalize

    return normalize(np.atleast_2d(x)).reshape(x.shape)


@functools.lru_cache(maxsize=1)
def _canonical_classes() -> dict[str, str]:
    """Normalised phrase -> class name for the synonyms `vlm data` phrases options with."""
    from clip.captions import EVAL_CLASSES, TRAIN_SYNONYMS

    out: dict[str, str] = {}
    for table in (TRAIN_SYNONYMS, EVAL_CLASSES):
        for name, phrases in table.items():
            out.update({normalize_text(p): name for p in (name, *phrases)})
    return out


def class_key(answer: Any, options: Sequence[str] | None) -> str:
    """The class a row asks about: its correct option's text (a known synonym mapped to its class), or an
    open question's normalised answer."""
    if options:
        letter = answer_letter({"answer": answer, "options": list(options)})
        text = normalize_text(str(options[LETTERS.index(letter)]))
    else:
        text = normalize_text(str(answer))
    return _canonical_classes().get(text, text)


class NegativeBank:
    """Fixed negatives: per class key, the (n, E) normalised image vectors of up to `per_class` rows of that
    class, drawn with `seed` from `rows` (each row's vector: the normalised mean over its images). Built
    once, embedded once; at most `max_classes` classes (drawn with the same seed when there are more)."""

    def __init__(self, enc: Any, rows: Sequence[Mapping[str, Any]], *, per_class: int = 8, seed: int = 0,
                 max_classes: int = 32) -> None:
        if per_class < 1:
            raise VlmError(f"grounding per_class {per_class}: give a number >= 1")
        by_class: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row.get("images") and row.get("answer") is not None:
                by_class.setdefault(class_key(row["answer"], row.get("options")), []).append(i)
        rng = np.random.default_rng(seed)
        names = sorted(by_class)
        if len(names) > max_classes:
            names = sorted(names[j] for j in rng.choice(len(names), max_classes, replace=False))
        if len(names) < 2:
            raise VlmError(f"the grounding reward contrasts a tile with tiles of other classes, and the training rows "
                           f"hold {len(names)} class(es) with images; give rows of at least two answers")
        picked = {c: sorted(rng.choice(by_class[c], min(per_class, len(by_class[c])), replace=False).tolist())
                  for c in names}
        order = [(c, i) for c in names for i in picked[c]]
        arrays = _load([rows[i]["images"] for _, i in order])
        flat = [a for arr in arrays for a in arr]
        vec = _image_vectors(enc, flat)
        pos, rowvec = 0, []
        for arr in arrays:
            rowvec.append(_normalise(vec[pos:pos + len(arr)].mean(axis=0)))
            pos += len(arr)
        self.classes = names
        self.rows = {c: [i for cc, i in order if cc == c] for c in names}
        self.vectors = {c: np.stack([v for (cc, _), v in zip(order, rowvec) if cc == c]) for c in names}
        log.info("grounding: a bank of %d tiles of %d classes (%s)", len(order), len(names),
                 ", ".join(f"{c}: {len(self.rows[c])}" for c in names))

    def negative_similarity(self, text: np.ndarray, own_class: str, reduce: str = "max") -> float | None:
        """The cosine of `text` with the other classes' tiles (max of class means, or mean of all); None
        when the bank has no class other than `own_class`."""
        others = [self.vectors[c] @ text for c in self.classes if c != own_class]
        if not others:
            return None
        return float(max(o.mean() for o in others)) if reduce == "max" else float(np.concatenate(others).mean())


def grounding_scores(enc: Any, completions: Sequence[Any], images: Sequence[Any], *, bank: NegativeBank,
                     answer: Sequence[Any] | Any, options: Sequence[Sequence[str] | None] | None = None,
                     reduce: str = "max", scale: float | None = None,
                     prefilled_think: bool = False) -> list[dict[str, Any]]:
    """Per completion {"reward", "margin", "findings"} (see the module docstring): reward in [0, 1], margin
    the contrastive cosine margin (None when there is nothing to score or no other class), findings the
    sentences scored. `images`: one entry per completion (an image or a list of them); `answer`,
    `options`: the dataset columns that give each completion's class (`class_key`)."""
    from clip.embedding import embed_texts

    if reduce not in REDUCTIONS:
        raise VlmError(f"grounding reduce {reduce!r}: give one of {', '.join(REDUCTIONS)}")
    n = len(completions)
    if images is None or len(images) != n:
        raise VlmError(f"the grounding reward got {n} completions but {0 if images is None else len(images)} image "
                       "entries; the dataset needs an 'images' column (one entry per prompt)")
    if answer is None:
        raise VlmError("the grounding reward needs the dataset's 'answer' column (it names each tile's class)")
    answers = [answer] * n if isinstance(answer, str) else list(answer)
    option_rows = [None] * n if options is None else list(options)
    found = [findings(parse_completion(completion_text(c), prefilled_think)["think"]) for c in completions]
    out: list[dict[str, Any]] = [{"reward": 0.0, "margin": None, "findings": f} for f in found]
    todo = [k for k in range(n) if found[k]]
    if not todo:
        return out
    arrays = _load([images[k] for k in todo])
    if any(not a for a in arrays):
        raise VlmError("a completion has no image; the grounding reward scores reasoning against its image")
    # distinct images by their pixels: each is embedded once (a prompt's group shares its image)
    keys = [tuple(hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest() for a in arr) for arr in arrays]
    distinct: dict[str, np.ndarray] = {}
    for arr, key in zip(arrays, keys):
        distinct.update(zip(key, arr))
    names = list(distinct)
    vec = dict(zip(names, _image_vectors(enc, [distinct[h] for h in names])))
    sentences = [s for k in todo for s in found[k]]
    txt = embed_texts(enc, sentences)                                    # (S, E), normalised
    s = float(enc.logit_scale) if scale is None else float(scale)
    pos = 0
    for j, k in enumerate(todo):
        t = _normalise(txt[pos:pos + len(found[k])].mean(axis=0))
        pos += len(found[k])
        own = float(_normalise(np.mean([vec[h] for h in keys[j]], axis=0)) @ t)
        negative = bank.negative_similarity(t, class_key(answers[k], option_rows[k]), reduce)
        if negative is None:
            log.debug("grounding: no other class in the bank; completion %d scores the neutral 0.5", k)
            out[k]["reward"] = 0.5
            continue
        margin = own - negative
        out[k]["margin"] = margin
        out[k]["reward"] = 1.0 / (1.0 + math.exp(-s * margin))
    return out


def make_grounding_reward(clip_model: Any = "pathoclip-lite", *, rows: Sequence[Mapping[str, Any]],
                          per_class: int = 8, seed: int = 0, reduce: str = "max", scale: float | None = None,
                          prefilled_think: bool = False, device: str = "auto") -> RewardFunc:
    """The PathoCLIP grounding reward in trl's signature, `f(completions, images, answer, options, **kw)`.

    clip_model: a PathoCLIP name or a `clip train` RUN_DIR (`clip.models.load_model`), or an already
    loaded image-text Encoder. The model is loaded once, here (so a bad name fails before training),
    and put on `device` ("auto": the GPU when there is one); the bank of negatives (`NegativeBank`:
    `per_class` tiles of each class of `rows`, drawn with `seed`) is made and embedded here too.
    reduce: "max" or "mean" over the other classes; scale: the sigmoid's scale (default: logit_scale)."""
    from clip.embedding import place

    if reduce not in REDUCTIONS:
        raise VlmError(f"grounding reduce {reduce!r}: give one of {', '.join(REDUCTIONS)}")
    if isinstance(clip_model, (str, Path)):
        from clip.models import load_model

        enc = load_model(str(clip_model))
    else:
        enc = clip_model
    if getattr(enc, "task", None) != "image-text":
        raise VlmError(f"{getattr(getattr(enc, 'spec', None), 'name', clip_model)!r} is not an image-text model; the "
                       "grounding reward needs PathoCLIP (a name or a `clip train` RUN_DIR)")
    place(enc, device)
    bank = NegativeBank(enc, rows, per_class=per_class, seed=seed)

    def grounding_reward(completions: Sequence[Any], images: Sequence[Any] | None = None, answer: Any = None,
                         options: Any = None, **kw: Any) -> list[float]:
        if images is None:
            images = kw.get("image")        # trl's single-image column
        return [r["reward"] for r in grounding_scores(enc, completions, images, bank=bank, answer=answer,
                                                      options=options, reduce=reduce, scale=scale,
                                                      prefilled_think=prefilled_think)]

    grounding_reward.encoder = enc          # type: ignore[attr-defined]
    grounding_reward.bank = bank            # type: ignore[attr-defined]
    return grounding_reward


__all__ = ["REDUCTIONS", "findings", "to_uint8", "class_key", "NegativeBank", "grounding_scores",
           "make_grounding_reward"]
