"""The offline process reward of issue 11: PathoCLIP grounding. Reasoning that describes what is in its
image earns more than generic text, or text that describes another image.

For each completion:
1. findings: the sentences of its <think> block (`prompts.parse_completion`) that assert something.
   Sentences that rule something out ("no", "not", "without", "absent", "ruled out", "excludes", ...)
   describe what is NOT in the image, and a CLIP text tower does not understand negation (it would
   reward "no tumour cells" on a tumour tile), so they are left out. A completion with no <think> block,
   an empty one, or only negated sentences scores 0.
2. the findings' text vector: the mean of the L2-normalised PathoCLIP text embeddings of its sentences,
   normalised again (as zero-shot class vectors are, `clip.zeroshot.class_vectors`).
3. a contrastive margin: cos(text, own image) minus the max (`reduce="max"`, the default) or the mean
   (`reduce="mean"`) of cos(text, other image) over the OTHER images of the batch. A completion's image
   vector is the normalised mean over its images; "other" images are those with different pixels, so the
   group of completions of one prompt (the same image, GRPO's num_generations) is never its own negative.
   max is the default because with the mean, one very different image in the batch pulls the mean down
   and text about a similar-looking other image still earns a positive margin (measured on the colour
   tiles of tests/test_vlm_grounding.py: "stained blue" on a green tile scored 0.997 with the mean when a
   red tile was in the batch, 0.0 with the max).
4. reward = sigmoid(scale * margin), in [0, 1], with scale = PathoCLIP's own logit_scale by default:
   this is CLIP's two-way softmax between the own image and the most similar (or the mean) other image,
   i.e. the probability the findings pick out their own image. 0.5 = no evidence either way.

When the batch holds no other image (every completion about the same image), there is no contrast: each
completion with findings scores the neutral 0.5, which GRPO's group normalisation turns into zero advantage.

Images arrive as trl passes the dataset's `images` column: per completion a PIL image, an (H, W, 3)
uint8 array, or a list of them; store references {"store", "slide", "tile"} and file paths are read
with `vlm.data.load_images`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .prompts import VlmError, parse_completion
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


def grounding_scores(enc: Any, completions: Sequence[Any], images: Sequence[Any], *, reduce: str = "max",
                     scale: float | None = None, prefilled_think: bool = False) -> list[dict[str, Any]]:
    """Per completion {"reward", "margin", "findings"} (see the module docstring): reward in [0, 1], margin
    the contrastive cosine margin (None when there is nothing to score or no other image), findings the
    sentences scored. `images`: one entry per completion (an image or a list of them)."""
    from clip.embedding import embed_texts

    if reduce not in REDUCTIONS:
        raise VlmError(f"grounding reduce {reduce!r}: give one of {', '.join(REDUCTIONS)}")
    n = len(completions)
    if images is None or len(images) != n:
        raise VlmError(f"the grounding reward got {n} completions but {0 if images is None else len(images)} image "
                       "entries; the dataset needs an 'images' column (one entry per prompt)")
    found = [findings(parse_completion(completion_text(c), prefilled_think)["think"]) for c in completions]
    out: list[dict[str, Any]] = [{"reward": 0.0, "margin": None, "findings": f} for f in found]
    todo = [k for k in range(n) if found[k]]
    if not todo:
        return out
    arrays = _load(images)
    if any(not a for a in arrays):
        raise VlmError("a completion has no image; the grounding reward scores reasoning against its image")
    # distinct images by their pixels: each is embedded once, and a prompt's group shares one key
    keys = [tuple(hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest() for a in arr) for arr in arrays]
    distinct: dict[str, np.ndarray] = {}
    for arr, key in zip(arrays, keys):
        distinct.update(zip(key, arr))
    names = list(distinct)
    vec = dict(zip(names, _image_vectors(enc, [distinct[h] for h in names])))
    groups = list(dict.fromkeys(keys))                                   # image sets, in order of appearance
    img = _normalise(np.stack([np.mean([vec[h] for h in g], axis=0) for g in groups]))     # (G, E)
    sentences = [s for k in todo for s in found[k]]
    txt = embed_texts(enc, sentences)                                    # (S, E), normalised
    s = float(enc.logit_scale) if scale is None else float(scale)
    pos = 0
    for k in todo:
        t = _normalise(txt[pos:pos + len(found[k])].mean(axis=0))
        pos += len(found[k])
        sims = img @ t                                                   # (G,)
        own = groups.index(keys[k])
        others = np.delete(sims, own)
        if others.size == 0:
            log.debug("grounding: no other image in the batch; completion %d scores the neutral 0.5", k)
            out[k]["reward"] = 0.5
            continue
        margin = float(sims[own] - (others.mean() if reduce == "mean" else others.max()))
        out[k]["margin"] = margin
        out[k]["reward"] = 1.0 / (1.0 + math.exp(-s * margin))
    return out


def make_grounding_reward(clip_model: Any = "pathoclip-lite", *, reduce: str = "max", scale: float | None = None,
                          prefilled_think: bool = False, device: str = "auto") -> RewardFunc:
    """The PathoCLIP grounding reward in trl's signature, `f(completions, images=None, **kw) -> list[float]`.

    clip_model: a PathoCLIP name or a `clip train` RUN_DIR (`clip.models.load_model`), or an already
    loaded image-text Encoder. The model is loaded once, here (so a bad name fails before training),
    and put on `device` ("auto": the GPU when there is one). reduce: "max" or "mean" over the other images;
    scale: the sigmoid's scale (default: the model's logit_scale)."""
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

    def grounding_reward(completions: Sequence[Any], images: Sequence[Any] | None = None, **kw: Any) -> list[float]:
        if images is None:
            images = kw.get("image")        # trl's single-image column
        return [r["reward"] for r in grounding_scores(enc, completions, images, reduce=reduce, scale=scale,
                                                      prefilled_think=prefilled_think)]

    grounding_reward.encoder = enc          # type: ignore[attr-defined]
    return grounding_reward


__all__ = ["REDUCTIONS", "findings", "to_uint8", "grounding_scores", "make_grounding_reward"]
