"""`vlm ask`: the reasoner asked about a slide's most telling tiles, with the evidence it was shown.

    vlm ask --store s.zarr --slide tumor_001 --question "Is there tumour?" --model M --run abmil --top-k 8

1. tiles: the slide's top-k tiles by a MIL run's stored instance scores (`--run NAME`: the predictions
   `mil predict --name NAME` wrote into the store, read with `SlideView.top_tiles`; `vlm` never imports
   `mil`), or by PathoCLIP similarity of each tile to the question (`--clip RUN_DIR`: cosine between the
   tile's image embedding and the question's text embedding, `clip.embedding.rank_tiles`: from the
   model's features in the store when `wsi embed` put them there, else embedded a bounded chunk at a
   time, keeping only the best k). Best first; ties keep the lower index, as `top_tiles` does.
2. one multi-image prompt (`prompts.build_messages` with the k tiles, the same system prompt as training),
   generated greedily by default (`model.generate`).
3. the reasoning (<think>), the answer (<answer>), the tiles used (index, level-0 x / y, score) and a
   montage PNG of those tiles, each captioned with its index, position and score.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .prompts import SYSTEM_PROMPT, VlmError, build_messages, parse_completion, template_prefills_think


def _open(store: Any):
    from wsi.store import TileStore

    return store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)


def _slide(st: Any, slide: str):
    view = st[slide]
    if view.meta.features_only or not view.has_tiles:
        raise VlmError(f"{st.path}: slide {slide!r} has no stored tile pixels (features only); `vlm ask` shows the "
                       f"model tiles: tile it with `wsi tile` into a store that keeps tiles")
    if view.n_tiles == 0:
        raise VlmError(f"{st.path}: slide {slide!r} has no tiles; nothing to ask about")
    return view


def select_tiles(store: Any, slide: str, k: int = 8, *, run: str | None = None, clip: Any = None,
                 question: str | None = None, device: str = "auto", chunk: int | None = None) -> dict[str, Any]:
    """{"by": "run" | "clip", "source": the run name or the CLIP model, "tiles": [{"index", "x", "y",
    "score"}, ...]}: the slide's k best tiles, best first (module docstring). Exactly one of `run` (a
    prediction name in the store) and `clip` (a `clip train` RUN_DIR, a PathoCLIP name or a loaded
    image-text Encoder, with `question`) is given. chunk: tiles embedded at a time with --clip
    (`clip.embedding.rank_tiles`)."""
    if (run is None) == (clip is None):
        raise VlmError("give exactly one of --run NAME (a MIL run's predictions in the store) and --clip RUN_DIR "
                       "(PathoCLIP similarity to the question)")
    if int(k) < 1:
        raise VlmError(f"--top-k {k}: give a number >= 1")
    st = _open(store)
    view = _slide(st, slide)
    if run is not None:
        top = view.top_tiles(run, int(k))
        idx, scores, xy = top.indices, top.scores, top.coords
        source = run
    else:
        from clip.embedding import RANK_CHUNK, embed_texts, place, rank_tiles

        if not question or not str(question).strip():
            raise VlmError("--clip picks tiles by similarity to the question; give a non-empty --question")
        if isinstance(clip, (str, Path)):
            from clip.models import load_model

            enc, source = load_model(str(clip)), str(clip)
        else:
            enc, source = clip, clip.spec.name
        dev = place(enc, device)
        idx, scores = rank_tiles(enc, st, slide, embed_texts(enc, [str(question)])[0], int(k), device=dev,
                                 chunk=chunk or RANK_CHUNK)
        xy = view.coords[idx]
    tiles = [{"index": int(i), "x": int(c[0]), "y": int(c[1]), "score": float(s)} for i, s, c in zip(idx, scores, xy)]
    return {"by": "run" if run is not None else "clip", "source": source, "tiles": tiles}


def save_montage(images: Sequence[Any], tiles: Sequence[dict], path: str | Path, title: str = "",
                 cell: int = 160, columns: int = 4) -> Path:
    """A PNG grid of `images` (PIL or uint8 arrays), each captioned "#index (x, y)" and "score S", with an
    optional title line; returns the path."""
    from PIL import Image, ImageDraw

    if not images:
        raise VlmError("no tiles to put in a montage")
    cols = max(1, min(columns, len(images)))
    rows = -(-len(images) // cols)
    pad, text_h = 6, 30
    # wrapped to the grid's width (about 6 px a character): a one-tile montage keeps its whole title
    lines = textwrap.wrap(title, width=max(20, (cols * (cell + pad)) // 6)) if title else []
    head = 13 * len(lines) + 6 if lines else 0
    canvas = Image.new("RGB", (cols * (cell + pad) + pad, head + rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, 4 + 13 * i), line, fill="black")
    for n, (im, t) in enumerate(zip(images, tiles)):
        im = im if hasattr(im, "resize") else Image.fromarray(np.asarray(im, np.uint8))
        x0 = pad + (n % cols) * (cell + pad)
        y0 = head + pad + (n // cols) * (cell + text_h + pad)
        canvas.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x0, y0))
        draw.text((x0, y0 + cell + 2), f"#{t['index']} ({t['x']}, {t['y']})", fill="black")
        draw.text((x0, y0 + cell + 15), f"score {t['score']:.3f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def ask(store: Any, slide: str, question: str, model: Any, *, run: str | None = None, clip: Any = None,
        top_k: int = 8, options: Sequence[str] | None = None, montage: str | Path | None = None,
        max_new_tokens: int = 512, temperature: float = 0.0, system: str | None = SYSTEM_PROMPT,
        device: str = "auto") -> dict[str, Any]:
    """Ask `model` `question` about the slide's top-k tiles (`select_tiles`), in one multi-image prompt.

    model: a model folder or hub id (`model.load_model`), or a loaded (model, processor) pair. options:
    answer options (an MCQ, lettered A, B, ...). montage: where to save the montage PNG (None: none).
    Returns {"answer", "reasoning", "completion", "well_formed", "tiles", "montage", "selection",
    "question"}: answer and reasoning are the <answer> / <think> texts ("" when the model wrote none, the
    raw text is in "completion"), tiles [{"index", "x", "y", "score"}], best first."""
    from .data import load_images
    from .model import generate, load_model

    if not str(question).strip():
        raise VlmError("--question is empty; ask something about the slide")
    st = _open(store)
    sel = select_tiles(st, slide, top_k, run=run, clip=clip, question=question, device=device)
    tiles = sel["tiles"]
    images = load_images([{"store": str(st.path), "slide": slide, "tile": t["index"]} for t in tiles])
    row = {"question": question, "options": list(options) if options else None}
    if isinstance(model, (tuple, list)):
        net, processor = model
    else:
        net, processor = load_model(model, device=device)
    completion = generate(net, processor, [build_messages(row, len(images), system)], [images],
                          max_new_tokens=max_new_tokens, temperature=temperature)[0]
    parsed = parse_completion(completion, template_prefills_think(processor, system))
    out_path = None
    if montage is not None:
        title = f"{slide}: top {len(tiles)} tiles by {sel['by']} {Path(str(sel['source'])).name}"
        out_path = str(save_montage(images, tiles, montage, title=title))
    return {"question": question, "answer": parsed["answer"] or "", "reasoning": parsed["think"] or "",
            "completion": completion, "well_formed": parsed["well_formed"], "tiles": tiles, "montage": out_path,
            "selection": {"by": sel["by"], "source": sel["source"]}}


def format_answer(result: dict[str, Any]) -> str:
    """The text `vlm ask` prints: the tiles used, the reasoning, the answer, the montage."""
    sel = result["selection"]
    lines = [f"tiles ({len(result['tiles'])}, by {sel['by']} {sel['source']}):"]
    lines += [f"  #{t['index']:<6d} x={t['x']:<8d} y={t['y']:<8d} score={t['score']:.4f}" for t in result["tiles"]]
    if result["well_formed"]:
        lines += [f"reasoning: {result['reasoning']}", f"answer: {result['answer']}"]
    else:   # an untrained or tiny model: show what it wrote
        lines += [f"reasoning: {result['reasoning'] or '(none)'}", f"answer: {result['answer'] or '(none)'}",
                  f"raw completion (not in the <think>/<answer> format): {result['completion']!r}"]
    if result["montage"]:
        lines.append(f"montage: {result['montage']}")
    return "\n".join(lines)


__all__ = ["select_tiles", "save_montage", "ask", "format_answer"]
