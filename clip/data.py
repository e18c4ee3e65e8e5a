"""PathoCLIP's training pairs: captions of store tiles or of image files (a CSV), a split by slide (by
patient with a patient_id column), and `PairDataset`, (image, caption) items for a DataLoader.

Captions CSV (comma- or tab-separated, one caption per row; several rows may caption one image):

    slide_id,tile,caption            tile = row of the slide's coords in the store (needs the store)
    slide_id,x,y,caption             level-0 top-left x, y of a stored tile (needs the store)
    image_path,caption[,slide_id]    image files, paths relative to the CSV (Patho-R1's convention);
    filepath,title                   open_clip's --csv-img-key / --csv-caption-key defaults work too

An optional patient_id column names each slide's patient: the validation split then keeps a
patient's slides on one side. Image paths must lie under the data root (the CSV's folder unless
`--data-root DIR`); URLs need `--allow-remote` (`wsi.paths`). Bad rows (slide not in the store, tile
out of range, x,y not a stored tile, empty caption, image file missing, unreadable, outside the data
root or remote) are skipped and listed with their line numbers (`Captions.summary()`).
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from wsi.errors import LabelsError, PathmilError
from wsi.paths import open_data_file, resolve_data_path
from wsi.rows import dropped_lines
from wsi.splits import split_groups
from wsi.store import TileStore

log = logging.getLogger(__name__)

EXPECTED = ("slide_id,tile,caption or slide_id,x,y,caption (tiles of a store), or image_path,caption "
            "(image files; open_clip's filepath,title too)")


class CaptionsError(PathmilError, ValueError):
    """A captions CSV, shard folder or caption set that cannot be used."""


@dataclass
class Captions:
    """Captions of images. An image key is ("tile", slide_id, index) or ("file", absolute path)."""

    images: list[tuple]                     # unique keys, first-seen order; an image's position = its index
    captions: list[tuple[int, str]]         # (image position, text)
    groups: list[str]                       # per image: its slide id (files: slide_id column, else the path)
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (line number, reason)
    source: Path | None = None              # the CSV
    store_path: Path | str | None = None    # the store the tile keys refer to
    patients: dict[str, str] = field(default_factory=dict)   # slide id -> patient id (a patient_id column)

    def group_of(self, image_pos: int) -> str:
        return self.groups[image_pos]

    @cached_property
    def _texts(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.images]
        for pos, text in self.captions:
            out[pos].append(text)
        return out

    def texts_of(self, image_pos: int) -> list[str]:
        """The captions of one image, in file order."""
        return self._texts[image_pos]

    def summary(self, show: int = 3) -> str:
        """One line: "1200 captions of 400 images from 8 slides; 3 rows dropped: line 5 ..."."""
        by_slide = any(g != k[-1] for g, k in zip(self.groups, self.images))   # a file's group is its path
        where = f" from {len(set(self.groups))} slides" if by_slide else ""
        s = f"{len(self.captions)} captions of {len(self.images)} images{where}"
        return s + dropped_lines(self.dropped, "rows", show)


class _StoreIndex:
    """Finds the row of (slide_id, tile) or (slide_id, x, y) in a store; else a reason to drop the row."""

    def __init__(self, store: TileStore):
        self.store, self.complete, self.all = store, set(store.complete_ids()), set(store.slide_ids())
        self._n: dict[str, int] = {}
        self._xy: dict[str, dict[tuple[int, int], int]] = {}

    def find(self, sid: str, tile: str | None, x: str = "", y: str = "") -> tuple[int | None, str | None]:
        if not sid:
            return None, "has no slide_id"
        if sid not in self.complete:
            return None, f"slide {sid!r} is {'not complete' if sid in self.all else 'not'} in the store"
        if sid not in self._n:
            v = self.store[sid]
            self._n[sid] = -1 if v.meta.features_only else v.n_tiles
        if self._n[sid] < 0:
            return None, f"slide {sid!r} has no pixels (a features-only import)"
        if tile is not None:
            i = _as_int(tile)
            if i is None:
                return None, f"tile {tile!r} is not an integer"
            ok = 0 <= i < self._n[sid]
            return (i, None) if ok else (None, f"tile {i} out of range (slide has {self._n[sid]} tiles)")
        xi, yi = _as_int(x), _as_int(y)
        if xi is None or yi is None:
            return None, f"x,y {x!r},{y!r} are not integers"
        if sid not in self._xy:
            self._xy[sid] = {(a, b): i for i, (a, b) in enumerate(self.store[sid].coords.tolist())}
        i = self._xy[sid].get((xi, yi))
        return (i, None) if i is not None else (None, f"x,y {xi},{yi} is not a stored tile of slide {sid!r}")


def _as_int(s: str) -> int | None:
    try:
        return int(f) if (f := float(s)).is_integer() else None
    except ValueError:
        return None


def _image_problem(path: str, raw: str) -> str | None:
    from PIL import Image

    try:
        with open_data_file(path) as f, Image.open(f):    # reads the header only: cheap for a million files
            return None
    except FileNotFoundError:
        return f"image file {raw!r} not found"
    except Exception as e:
        return f"image file {raw!r} unreadable ({type(e).__name__})"


def _pick(cols: list[str], explicit: str | None, defaults: Sequence[str]) -> str | None:
    return next((c for c in ([explicit.strip().lower()] if explicit else defaults) if c in cols), None)


def read_captions(csv_path: str | Path, store: TileStore | str | Path | None = None, *,
                  image_key: str | None = None, caption_key: str | None = None, sep: str | None = None,
                  check_files: bool = True, data_root: str | Path | None = None,
                  allow_remote: bool = False) -> Captions:
    """The captions of a CSV (see the module docstring); `store` is needed for tile CSVs. `image_key` /
    `caption_key` name other columns (open_clip's --csv-img-key / --csv-caption-key); `sep` defaults to
    a tab when the header has tabs and no comma, else a comma. Image paths, relative to the CSV's folder,
    must lie under `data_root` (default: that folder) and URLs need `allow_remote`
    (`wsi.paths.resolve_data_path`); rows that break this are dropped and reported like other bad rows."""
    path = Path(csv_path)

    if not path.is_file():
        raise CaptionsError(f"{path}: no such captions CSV; give a CSV with columns {EXPECTED}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionsError(f"{path}: not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")   # open_clip's CSVs are tab-separated
    sep = sep or ("\t" if "\t" in first and "," not in first else ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header = next((h for h in reader if any(c.strip() for c in h)), None)
    if header is None:
        raise CaptionsError(f"{path}: empty file; write a header ({EXPECTED}) and one caption per row")
    cols = [c.strip().lower() for c in header]
    cap = _pick(cols, caption_key, ("caption", "title"))
    img = _pick(cols, image_key, ("image_path", "filepath"))
    kind = ("file" if image_key is not None else "tile" if {"slide_id", "tile"} <= set(cols) else
            "xy" if {"slide_id", "x", "y"} <= set(cols) else "file")
    if cap is None or (kind == "file" and img is None):
        raise CaptionsError(f"{path}: columns {','.join(c.strip() for c in header)!r} are not a captions CSV; "
                            f"expected {EXPECTED}")
    index = None
    if kind != "file":
        if store is None:
            raise CaptionsError(f"{path}: captions of store tiles (slide_id,{'tile' if kind == 'tile' else 'x,y'}) "
                                "need the tile store; give it with --store")
        st = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
        index, store = _StoreIndex(st), st.path
    at = {c: cols.index(c) for c in ("slide_id", "patient_id", "tile", "x", "y", cap, img) if c and c in cols}
    patients: dict[str, str] = {}
    keys: dict[tuple, int] = {}
    groups: list[str] = []
    captions: list[tuple[int, str]] = []
    dropped: list[tuple[int, str]] = []
    file_ok: dict[str, str | None] = {}     # each file is checked once, however many captions it has
    for rec in reader:
        line = reader.line_num
        if not any(c.strip() for c in rec):
            continue
        get = lambda c: rec[at[c]].strip() if c in at and at[c] < len(rec) else ""  # noqa: E731
        sid, caption = get("slide_id"), get(cap)
        key, why = None, None
        if not caption:
            why = "has an empty caption"
        elif kind == "file":
            raw = get(img)
            p, why = resolve_data_path(raw, path.parent, root=data_root, allow_remote=allow_remote)
            if not raw:
                why = "has no image path"
            elif why is None and check_files:
                why = file_ok[p] if p in file_ok else file_ok.setdefault(p, _image_problem(p, raw))
            key = ("file", p)
        else:
            i, why = index.find(sid, get("tile") if kind == "tile" else None, get("x"), get("y"))  # type: ignore
            key = ("tile", sid, i)
        if why:
            dropped.append((line, why))
            continue
        if key not in keys:
            keys[key] = len(keys)
            groups.append(sid or key[1])
        captions.append((keys[key], caption))
        if get("patient_id") and sid:
            patients[sid] = get("patient_id")
    if not captions:
        why = "; ".join(f"line {n} {w}" for n, w in dropped[:3])
        raise CaptionsError(f"{path}: no usable caption rows{f' ({len(dropped)} dropped: {why})' if dropped else ''}; "
                            f"give rows with columns {EXPECTED}")
    out = Captions(list(keys), captions, groups, dropped, path, store, patients)
    if dropped:
        log.warning("%s: %s", path, out.summary())
    return out


def split_by_group(captions: Captions, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) image positions, sorted: `wsi.splits.split_groups` over the images' slides, grouped
    by patient where the CSV has a patient_id column, so a slide (a patient) is on one side only; about
    `val_fraction` of the slides (patients) are held out, at least one stays in training.
    Deterministic for a seed."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(range(len(captions.images))), []
    try:
        return split_groups(captions.groups, val_fraction, seed, patients=captions.patients or None)
    except LabelsError as e:
        raise CaptionsError(f"{captions.source}: {e}; use --val-fraction 0 to train without validation") from None


class PairDataset(torch.utils.data.Dataset):
    """(image, caption) pairs of the images at `positions`: ONE item per image and epoch, its caption
    drawn by a generator seeded with (seed, epoch, image position), so an epoch shows every image once
    (many captions do not over-weight an image) and the epochs go through its captions. Call
    `set_epoch(epoch)` before each epoch's DataLoader iterator is made (workers copy the dataset when
    they start: not with persistent_workers). image: `transform(PIL image)` (open_clip's preprocess),
    or a uint8 (H, W, 3) tensor. Tiles are read through `wsi.data.TileDataset` (one read per slide and
    batch), files through PIL."""

    def __init__(self, captions: Captions, positions: Sequence[int] | np.ndarray | None = None,
                 transform: Callable | None = None, *, seed: int = 0, store: TileStore | str | Path | None = None):
        from wsi.data import TileDataset

        pos = range(len(captions.images)) if positions is None else positions
        self.positions = [int(p) for p in pos]
        self.texts = [captions.texts_of(p) for p in self.positions]
        self.keys = [captions.images[p] for p in self.positions]
        self.transform, self.seed, self.epoch = transform, int(seed), 0
        tiles = [i for i, k in enumerate(self.keys) if k[0] == "tile"]
        self._row = {i: r for r, i in enumerate(tiles)}     # dataset index -> TileDataset row
        self.tiles = None
        if tiles:
            st = store if store is not None else captions.store_path
            if st is None:
                raise CaptionsError(f"{captions.source}: captions of store tiles need the tile store; give it "
                                    "with --store")
            self.tiles = TileDataset(st, [self.keys[i][1:] for i in tiles], transform)

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def caption(self, i: int) -> str:
        """Item i's caption in the current epoch."""
        t = self.texts[i]
        if len(t) == 1:
            return t[0]
        return t[int(np.random.default_rng((self.seed, self.epoch, self.positions[i])).integers(len(t)))]

    def _file(self, path: str) -> Any:
        from PIL import Image

        try:
            with open_data_file(path) as f, Image.open(f) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise CaptionsError(f"{path}: cannot read the image ({type(e).__name__}: {e}); fix the file or drop "
                                "its rows from the captions CSV") from None
        return self.transform(img) if self.transform is not None else torch.from_numpy(np.asarray(img).copy())

    def __getitem__(self, i: int) -> tuple[Any, str]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, str]]:
        """A batch; its tiles read with one TileDataset batch (one read per slide)."""
        tiles = [i for i in indices if i in self._row]
        images = {}
        if tiles:
            got = self.tiles.__getitems__([self._row[i] for i in tiles])  # type: ignore[union-attr]
            images = {i: s["image"] for i, s in zip(tiles, got)}
        return [(images[i] if i in images else self._file(self.keys[i][1]), self.caption(i)) for i in indices]
