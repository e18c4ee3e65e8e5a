"""The labels CSV of a MIL cohort, and how its label names map to class indices.

Labels CSV (comma-separated, one row per slide):

    slide_id,label[,patient_id][,split]      patient_id defaults to slide_id; split is train/val/test

Labels are per slide: a patient may have slides of different labels (TCGA's tumour and normal-tissue
slides of one patient). Splits are per patient (mil.splits keeps a patient's slides in one part and
stratifies by each patient's set of labels). Every problem is a one-line `LabelsError` naming the
file and the fix.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from wsi.errors import LabelsError

PARTS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
# Names that read as the negative class of a binary task (compared lower-cased, '_' and ' ' as '-').
_NEGATIVE = {"normal", "negative", "neg", "benign", "healthy", "0", "false", "no", "none", "absent", "control",
             "non-tumor", "non-tumour", "nontumor", "nontumour", "tumor-free", "tumour-free", "non-cancer",
             "noncancer", "non-malignant", "nonmalignant", "non-neoplastic", "wild-type", "wildtype", "wt"}


@dataclass(frozen=True)
class LabelRow:
    """One slide of a labels CSV."""

    slide_id: str
    patient_id: str
    label: str
    split: str | None           # "train" | "val" | "test", or None without a split column
    line: int                   # line number in the file, for messages


def labels_digest(path: str | Path) -> str:
    """sha256 of the file's bytes: a run records it, and refuses to resume on a changed CSV."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_labels_csv(path: str | Path) -> list[LabelRow]:
    """The rows of a labels CSV, validated."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels CSV; give a CSV with columns slide_id,label "
                          "(optional patient_id, split)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelsError(f"{path}: not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    while header is not None and not any(c.strip() for c in header):   # blank lines before the header
        header = next(reader, None)
    if header is None:
        raise LabelsError(f"{path}: empty file; write a header slide_id,label (optional patient_id, split) "
                          "and one row per slide")
    cols = [c.strip().lower() for c in header]
    missing = [c for c in ("slide_id", "label") if c not in cols]
    if missing:
        hint = ""
        if len(header) == 1 and any(s in header[0] for s in (";", "\t")):
            hint = " (it looks separated by ';' or tabs: save it comma-separated)"
        raise LabelsError(f"{path}: no {' or '.join(repr(m) for m in missing)} column in the header "
                          f"{','.join(c.strip() for c in header)!r}{hint}; the header must contain slide_id,label")
    dup = sorted({c for c in cols if c and cols.count(c) > 1})
    if dup:
        raise LabelsError(f"{path}: column {dup[0]!r} appears more than once in the header; keep one")
    at = {c: cols.index(c) for c in ("slide_id", "label", "patient_id", "split") if c in cols}
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    for rec in reader:
        line = reader.line_num
        if not any(c.strip() for c in rec):
            continue
        get = lambda c: rec[at[c]].strip() if c in at and at[c] < len(rec) else ""  # noqa: E731
        sid, label = get("slide_id"), get("label")
        if not sid:
            raise LabelsError(f"{path}: line {line} has no slide_id; fill it in or delete the row")
        if not label:
            raise LabelsError(f"{path}: line {line} (slide {sid!r}) has no label; fill it in or delete the row")
        if sid in seen:
            raise LabelsError(f"{path}: slide_id {sid!r} appears twice (lines {seen[sid]} and {line}); "
                              "keep one row per slide")
        seen[sid] = line
        part = None
        if "split" in at:
            raw = get("split")
            part = _SPLIT_ALIASES.get(raw.lower())
            if part is None:
                raise LabelsError(f"{path}: line {line} (slide {sid!r}) has split {raw!r}; "
                                  "use train, val or test (or drop the split column)")
        rows.append(LabelRow(sid, get("patient_id") or sid, label, part, line))
    if not rows:
        raise LabelsError(f"{path}: a header but no rows; add one row per slide (slide_id,label)")
    return rows


def _is_negative(name: str) -> bool:
    return name.strip().lower().replace("_", "-").replace(" ", "-") in _NEGATIVE


def _sort_names(names: set[str]) -> list[str]:
    try:  # "2" before "10" when every label is an integer
        return sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(names)


def class_mapping(labels: list[str], *, classes: list[str] | None = None, positive: str | None = None,
                  where: str = "labels") -> tuple[list[str], str | None]:
    """(class_names, positive_class). `classes` fixes the order; otherwise names are sorted and, with two
    classes, one that reads as negative (normal, benign, 0, ...) comes first. `positive` puts that class
    at index 1 of a binary task."""
    present = set(labels)
    if classes is not None:
        names = [str(c).strip() for c in classes]
        if len(set(names)) != len(names) or not all(names):
            raise LabelsError(f"classes {names} has empty or repeated names; list each class once")
        outside = _sort_names(present - set(names))
        if outside:
            raise LabelsError(f"{where}: labels {outside} are not among the classes given ({', '.join(names)}); "
                              "add them to --classes or fix those rows")
    else:
        names = _sort_names(present)
        if len(names) == 2:
            neg = [n for n in names if _is_negative(n)]
            if len(neg) == 1:
                names = [neg[0]] + [n for n in names if n != neg[0]]
    if positive is not None:
        positive = str(positive).strip()
        if positive not in names:
            raise LabelsError(f"positive class {positive!r} is not a class of {where} ({', '.join(names)}); "
                              "give one of them to --positive")
        if len(names) != 2:
            raise LabelsError(f"--positive applies to two classes; {where} has {len(names)} ({', '.join(names)})")
        if classes is not None and names[1] != positive:
            raise LabelsError(f"--positive {positive} but --classes puts {names[1]!r} second (the positive index); "
                              "give one of the two, or list the positive class second")
        names = [n for n in names if n != positive] + [positive]
    return names, (names[1] if len(names) == 2 else None)


def negative_class(names: list[str], given: str | None = None, *, where: str = "labels") -> str | None:
    """The class of the sure-negative bags (normal tissue) of a task with classes `names`, or None.
    Binary: class index 0. More classes: `given` (--negative-class), else the one name that reads as
    negative (normal, benign, ...); None on pure subtyping (no such class, or several)."""
    if given is not None:
        given = str(given).strip()
        if given not in names:
            raise LabelsError(f"negative class {given!r} is not a class of {where} ({', '.join(names)}); "
                              "give one of them to --negative-class")
        if len(names) == 2 and given != names[0]:
            raise LabelsError(f"--negative-class {given} but {names[0]!r} is the negative (first) class of this "
                              "binary task; give --positive instead, or list the negative class first in --classes")
        return given
    if len(names) == 2:
        return names[0]
    neg = [n for n in names if _is_negative(n)]
    return neg[0] if len(neg) == 1 else None
