"""What slides a command works on: files, folders and cohort CSVs resolved to `SlideSource`s."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import CohortError
from .slide import SLIDE_SUFFIXES
from .store import slide_id_from_path, validate_slide_id

__all__ = ["CohortError", "SlideSource", "read_cohort_csv", "resolve_sources"]


@dataclass(frozen=True)
class SlideSource:
    path: Path
    slide_id: str
    mpp: float | None = None   # overrides the slide's metadata


def read_cohort_csv(path: Path) -> list[SlideSource]:
    """`path[,slide_id][,mpp]` rows (header required); relative paths are relative to the CSV."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise CohortError(f"{path}: a cohort CSV needs a header with a 'path' column (and optional 'slide_id', 'mpp')")
    out = []
    for i, row in enumerate(rows, start=2):
        p = Path(row["path"].strip())
        p = p if p.is_absolute() else path.parent / p
        sid = (row.get("slide_id") or "").strip()
        try:
            sid = validate_slide_id(sid) if sid else slide_id_from_path(p)
        except ValueError as e:
            raise CohortError(f"{path}, line {i}: {e}") from None
        mpp_s = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_s) if mpp_s else None
        except ValueError:
            raise CohortError(f"{path}, line {i}: mpp {mpp_s!r} is not a number") from None
        out.append(SlideSource(p, sid, mpp))
    return out


def resolve_sources(inputs: list[str | Path], slide_mpp: float | None = None) -> list[SlideSource]:
    """Files are taken as given; folders contribute their slide files; `.csv` files list slides.

    `slide_mpp` fills in the resolution for sources that have none of their own.
    """
    sources: list[SlideSource] = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv" and item.is_file():
            sources += read_cohort_csv(item)
        elif item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            sources += [SlideSource(p, slide_id_from_path(p)) for p in files]
        else:  # a file, or a missing path that will be reported as a failed slide
            sources.append(SlideSource(item, slide_id_from_path(item)))
    if not sources:
        raise CohortError(f"no slides found in {', '.join(map(str, inputs))} "
                          f"(looked for {', '.join(sorted(SLIDE_SUFFIXES))})")
    seen: dict[str, Path] = {}
    for s in sources:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise CohortError(f"slide id {s.slide_id!r} is used by both {seen[s.slide_id]} and {s.path}; "
                              "give distinct ids in a cohort CSV")
        seen[s.slide_id] = s.path
    unique = list({s.slide_id: s for s in sources}.values())
    if slide_mpp is not None:
        unique = [SlideSource(s.path, s.slide_id, s.mpp if s.mpp is not None else slide_mpp) for s in unique]
    return unique
