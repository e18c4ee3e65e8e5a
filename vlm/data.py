"""The reasoner's data: JSONL rows per stage, `vlm data` (the three files made from a tile store), and the
images a row refers to.

Rows (one JSON object a line):

    caption   {"images": [...], "caption": "..."}
    sft       {"images": [...], "messages": [{"role": "user", ...}, {"role": "assistant", "content": "..."}]},
              or an MCQ row with "reasoning" (target `prompts.sft_target`)
    grpo/dapo/eval (MCQ)  {"images": [...], "question": "...", "options": ["...", ...], "answer": "B"}
              (no options: an open question, `answer` is the text)

An image is a file path (relative to the JSONL's folder) or a store reference {"store": PATH, "slide": ID,
"tile": INDEX} (PATH relative to the JSONL's folder, or absolute: a pathmil tile store). Image files must lie
under the data root (the JSONL's folder unless `--data-root DIR`); URLs, of files or stores, need
`--allow-remote` (`wsi.paths`). Bad lines are reported by number and skipped (`Rows.summary()`).

`vlm data STORE --labels NAME --captions CAPTIONS.csv --out DIR` writes caption.jsonl (the `clip captions`
CSV, one row per caption of the slides asked for: `--slides` keeps the captions of other slides out), mcq.jsonl (one "Which tissue does this tile show?" row per labelled tile, one
option per class phrased with a seeded synonym of `clip.captions.TRAIN_SYNONYMS`, in a seeded order) and
sft.jsonl (the same rows with a templated reasoning: what the tile shows, then each other option ruled out).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from wsi.paths import is_url, open_data_file, resolve_data_path
from wsi.runtime import atomic_write_text

from .prompts import LETTERS, VlmError, answer_letter, sft_target

log = logging.getLogger(__name__)

STAGES = ("caption", "sft", "grpo", "dapo", "eval")
QUESTION = "Which tissue does this tile show?"
# What each class looks like on H&E: the "image-feature analysis" part of the templated reasoning.
FINDINGS: dict[str, str] = {
    "tumor": "crowded, hyperchromatic nuclei in a disorganised architecture",
    "normal": "small, uniform nuclei in an orderly architecture",
}


# ---- reading -----------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The valid rows of a JSONL file (image paths made absolute) and the dropped lines."""

    rows: list[dict[str, Any]]
    dropped: list[tuple[int, str]] = field(default_factory=list)    # (line number, reason)
    source: Path | None = None
    stage: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, show: int = 3) -> str:
        """One line: "120 sft rows; 2 lines dropped: line 3 not JSON (...), ..."."""
        from wsi.rows import dropped_lines

        return f"{len(self.rows)} {self.stage} rows" + dropped_lines(self.dropped, "lines", show)


def _image_ref(img: Any, base: Path, stores: dict[str, Any], allow_remote: bool = False,
               root: Path | None = None) -> tuple[Any, str | None]:
    """(the image with its path made absolute, None), or (None, why it cannot be used). An image file,
    relative to `base` (the file's folder), must lie under the data root `root` (default: `base`); a URL
    (a remote file or store) needs `allow_remote` (`wsi.paths.resolve_data_path`); a local store
    reference must open as a pathmil tile store."""
    if isinstance(img, str):
        p, why = resolve_data_path(img, base, root=root, allow_remote=allow_remote)
        if why:
            return None, why
        return (p, None) if is_url(p) or Path(p).is_file() else (None, f"image file {img!r} not found")
    if not isinstance(img, Mapping) or set(img) != {"store", "slide", "tile"}:
        return None, f"image {json.dumps(img)[:60]} is neither a path nor {{\"store\", \"slide\", \"tile\"}}"
    sid, tile, st = img["slide"], img["tile"], img["store"]
    if not isinstance(st, str) or not st or not isinstance(sid, str) or not sid:
        return None, "has a store reference without a store path or slide id"
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        return None, f"tile {tile!r} is not an index >= 0"
    if is_url(st) and not allow_remote:
        return None, resolve_data_path(st, base, what="store")[1]
    path = st if is_url(st) or Path(st).is_absolute() else str((base / st).resolve())
    if path not in stores:
        from wsi.errors import StoreError
        from wsi.store import TileStore

        try:
            store = TileStore.open(path, readonly=True)
            stores[path] = (store, set(store.complete_ids()), {})
        except (StoreError, OSError, ValueError) as e:
            stores[path] = (None, str(e).split("\n")[0][:120], {})
    store, complete, sizes = stores[path]
    if store is None:
        return None, f"store {st!r} cannot be opened ({complete})"
    if sid not in complete:
        return None, f"slide {sid!r} is not a complete slide of store {st!r}"
    if sid not in sizes:
        view = store[sid]
        sizes[sid] = -1 if view.meta.features_only else view.n_tiles
    if sizes[sid] < 0:
        return None, f"slide {sid!r} has no pixels (a features-only import)"
    if tile >= sizes[sid]:
        return None, f"tile {tile} out of range (slide {sid!r} has {sizes[sid]} tiles)"
    return {"store": path, "slide": sid, "tile": tile}, None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for m in messages:
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
            return "a message is not {\"role\": system|user|assistant, \"content\": ...}"
        c = m.get("content")
        if not (isinstance(c, str) or (isinstance(c, list) and all(isinstance(x, Mapping) for x in c))):
            return "a message's content is neither text nor a list of {\"type\": ...} parts"
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        return "the last message is not a non-empty assistant turn (the target)"
    return None


def _check_mcq(row: Mapping[str, Any], stage: str) -> str | None:
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "has no 'question'"
    options = row.get("options")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or len(options) > len(LETTERS):
            return "'options' is not a list of 2-26 option texts"
        if not all(isinstance(o, str) and o.strip() for o in options):
            return "an option is empty or not text"
    if "answer" not in row or not str(row["answer"]).strip():
        return "has no 'answer'"
    if options:
        try:
            answer_letter(row)
        except VlmError as e:
            return str(e).split(";")[0]
    if stage == "sft":
        try:
            sft_target(row)
        except VlmError as e:
            return str(e).split(";")[0]
    return None


def check_row(row: Any, stage: str, base: Path, stores: dict[str, Any] | None = None, *,
              allow_remote: bool = False, root: Path | None = None) -> tuple[dict | None, str | None]:
    """(the row with its images made absolute, None) or (None, why it is not a valid `stage` row). Image
    paths are relative to `base` and must lie under `root` (default: `base`); URLs need `allow_remote`."""
    if not isinstance(row, dict):
        return None, "is not a JSON object"
    images = row.get("images", [])
    if not isinstance(images, list):
        return None, "'images' is not a list"
    if stage == "caption":
        if not images:
            return None, "has no images"
        if not isinstance(row.get("caption"), str) or not row["caption"].strip():
            return None, "has no 'caption'"
        why = None
    elif stage == "sft" and "messages" in row:
        why = _check_messages(row["messages"])
    else:
        why = _check_mcq(row, stage)
    if why:
        return None, why
    out_images = []
    for img in images:
        ref, why = _image_ref(img, base, stores if stores is not None else {}, allow_remote, root)
        if why:
            return None, why
        out_images.append(ref)
    return {**row, "images": out_images}, None


def read_jsonl(path: str | Path, stage: str, *, data_root: str | Path | None = None,
               allow_remote: bool = False) -> Rows:
    """The valid rows of a `stage` JSONL file (caption, sft, grpo, dapo or eval; see the module docstring).
    Image paths and store paths are made absolute (relative ones are relative to the file's folder); image
    files must lie under `data_root` (default: the file's folder) and URLs need `allow_remote`; store
    references are checked against the store. Bad lines (not JSON, missing fields, an answer that is not an
    option, a missing image or tile) are skipped and listed with their line numbers; no valid row at all
    is an error."""
    if stage not in STAGES:
        raise VlmError(f"stage {stage!r}: give one of {', '.join(STAGES)}")
    path = Path(path)
    if not path.is_file():
        raise VlmError(f"{path}: no such JSONL file; make one with `vlm data STORE --labels NAME --captions CSV "
                       "--out DIR`")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VlmError(f"{path}: not UTF-8 text ({e}); save it as UTF-8 JSONL") from None
    base, stores = path.parent.resolve(), {}
    root = Path(data_root).resolve() if data_root is not None else None
    rows, dropped = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            dropped.append((n, f"is not JSON ({e.msg} at column {e.colno})"))
            continue
        row, why = check_row(obj, stage, base, stores, allow_remote=allow_remote, root=root)
        if why:
            dropped.append((n, why))
        else:
            rows.append(row)
    out = Rows(rows, dropped, path, stage)
    if not rows:
        why = "; ".join(f"line {n} {w}" for n, w in dropped[:3])
        raise VlmError(f"{path}: no valid {stage} rows{f' ({len(dropped)} dropped: {why})' if dropped else ''}; "
                       f"see `vlm data --help` for the row format")
    if dropped:
        log.warning("%s: %s", path, out.summary())
    return out


# ---- images ------------------------------------------------------------------------------------------
def load_images(refs: Sequence[Any], base: str | Path | None = None) -> list[Any]:
    """RGB PIL images of `refs` (file paths, or store references {"store", "slide", "tile"}), in order.
    Relative paths are relative to `base` (the JSONL's folder; default: the working folder). Tiles are read
    through `wsi.data.TileDataset`, one batch per store (one read per slide)."""
    from PIL import Image

    from wsi.data import TileDataset

    base = Path(base) if base is not None else Path.cwd()
    out: list[Any] = [None] * len(refs)
    by_store: dict[str, list[tuple[int, str, int]]] = {}
    for k, ref in enumerate(refs):
        if isinstance(ref, Mapping):
            st = str(ref["store"])
            st = st if is_url(st) or Path(st).is_absolute() else str((base / st).resolve())
            by_store.setdefault(st, []).append((k, str(ref["slide"]), int(ref["tile"])))
            continue
        p = str(ref) if is_url(ref) or Path(str(ref)).is_absolute() else str(base / str(ref))
        try:
            with open_data_file(p) as f, Image.open(f) as im:
                out[k] = im.convert("RGB")
        except Exception as e:
            raise VlmError(f"{p}: cannot read the image ({type(e).__name__}); fix the file or drop its rows") from None
    for st, items in by_store.items():
        ds = TileDataset(st, [(s, i) for _, s, i in items])
        for (k, _, _), sample in zip(items, ds.__getitems__(list(range(len(items))))):
            out[k] = Image.fromarray(np.asarray(sample["image"]))
    return out


def load_image(ref: Any, base: str | Path | None = None) -> Any:
    """One RGB PIL image: a file path (relative to `base`) or a store reference (see `load_images`)."""
    return load_images([ref], base)[0]


# ---- vlm data ----------------------------------------------------------------------------------------
def _reasoning(classes: Sequence[str], phrases: Sequence[str], truth: int, letter_of: Mapping[int, str]) -> str:
    """What the tile shows, which option that is, and each other option ruled out by its missing findings."""
    def seen(k: int) -> str:
        return FINDINGS.get(classes[k], f"the features of {phrases[k]}")

    parts = [f"The tile shows {seen(truth)}: {phrases[truth]}."]
    for k in range(len(classes)):
        if k != truth:
            parts.append(f"No {seen(k)}, so option {letter_of[k]} ({phrases[k]}) is ruled out.")
    return " ".join(parts)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def make_data(store: Any, labels: str, captions: str | Path, out_dir: str | Path, *,
              classes: Sequence[str] | None = None, synonyms: Mapping[str, Sequence[str]] | None = None,
              question: str = QUESTION, slides: Sequence[str] | None = None, max_per_class: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Write OUT_DIR/caption.jsonl, mcq.jsonl and sft.jsonl from a tile store (see the module docstring).

    captions: a `clip captions` CSV of the store's tiles (`clip.data.read_captions`); with `slides`, only
    the captions of those slides are written. labels: the per-tile
    labels the MCQs ask about (binary: the LAST of `classes` is positive, default ["normal", "tumor"]; more
    classes: integer indices), unlabelled tiles skipped. `max_per_class` draws at most that many tiles of
    each class (seeded). Deterministic for a seed. Returns a summary: files, row counts, per-class tiles,
    answer letters, skipped slides."""
    from clip.captions import DEFAULT_CLASSES, TRAIN_SYNONYMS
    from clip.data import read_captions
    from wsi.errors import LabelsError
    from wsi.store import TileStore
    from wsi.tile_classes import tiles_by_class

    st = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
    store_path = str(Path(st.path).resolve()) if not is_url(str(st.path)) else str(st.path)
    classes = list(classes or DEFAULT_CLASSES)
    if len(classes) < 2 or len(set(classes)) != len(classes) or len(classes) > len(LETTERS):
        raise VlmError(f"classes {classes}: give 2-26 distinct class names ([negative, positive] for a binary label)")
    syn = {c: list((synonyms or {}).get(c) or TRAIN_SYNONYMS.get(c) or (c,)) for c in classes}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def ref(sid: str, idx: int) -> dict[str, Any]:
        return {"store": store_path, "slide": sid, "tile": int(idx)}

    ids = list(slides) if slides is not None else st.complete_ids()
    caps = read_captions(captions, store=st)
    keep = set(ids)     # captions of other slides (held-out ones, with --slides) stay out
    caption_rows = [{"images": [ref(*caps.images[pos][1:]) if caps.images[pos][0] == "tile" else caps.images[pos][1]],
                     "caption": text} for pos, text in caps.captions if slides is None or caps.group_of(pos) in keep]
    if not caption_rows:
        raise VlmError(f"{captions}: no caption is of the slides given ({', '.join(ids[:3])}"
                       f"{', ...' if len(ids) > 3 else ''}); give the captions CSV of those slides")
    try:
        per_class, skipped, _ = tiles_by_class(st, labels, len(classes), ids)
    except LabelsError as e:
        raise VlmError(str(e)) from None
    rng = np.random.default_rng(seed)
    if max_per_class is not None:
        per_class = [[t[i] for i in sorted(rng.choice(len(t), min(len(t), max_per_class), replace=False))]
                     for t in per_class]
    tiles = sorted(((sid, idx, k) for k, t in enumerate(per_class) for sid, idx in t),
                   key=lambda r: (ids.index(r[0]), r[1]))
    mcq_rows, sft_rows, letters = [], [], {}
    for sid, idx, truth in tiles:
        order = rng.permutation(len(classes))                       # option j is class order[j]
        phrases = [syn[c][int(rng.integers(len(syn[c])))] for c in classes]
        letter_of = {int(k): LETTERS[j] for j, k in enumerate(order)}
        row = {"images": [ref(sid, idx)], "question": question, "options": [phrases[int(k)] for k in order],
               "answer": letter_of[truth]}
        letters[row["answer"]] = letters.get(row["answer"], 0) + 1
        mcq_rows.append(row)
        sft_rows.append({**row, "reasoning": _reasoning(classes, phrases, truth, letter_of)})
    files = {"caption": out / "caption.jsonl", "mcq": out / "mcq.jsonl", "sft": out / "sft.jsonl"}
    counts = {"caption": _write_jsonl(files["caption"], caption_rows), "mcq": _write_jsonl(files["mcq"], mcq_rows),
              "sft": _write_jsonl(files["sft"], sft_rows)}
    return {"out": str(out), "files": {k: str(v) for k, v in files.items()}, "rows": counts,
            "per_class": {c: len(per_class[k]) for k, c in enumerate(classes)},
            "answers": dict(sorted(letters.items())),
            "captions": caps.summary(), "skipped_slides": skipped, "seed": seed}


__all__ = ["STAGES", "QUESTION", "FINDINGS", "Rows", "check_row", "read_jsonl", "load_images", "load_image",
           "make_data"]
