"""How the bad rows of a data file (a captions CSV, the reasoner's JSONL files) are reported."""
from __future__ import annotations


def dropped_lines(dropped: list[tuple[int, str]], what: str = "rows", show: int = 3) -> str:
    """"; 3 rows dropped: line 5 <why>, ..." for a summary line ("" when nothing was dropped): the bad
    rows of a data file made from the store (captions CSVs, the reasoner's JSONL files)."""
    if not dropped:
        return ""
    shown = ", ".join(f"line {n} {why}" for n, why in dropped[:show])
    more = f", ... ({len(dropped) - show} more)" if len(dropped) > show else ""
    return f"; {len(dropped)} {what} dropped: {shown}{more}"
