"""Paths written inside data files (captions CSVs, JSONL rows), resolved under a data root.

A data file is input from elsewhere: a row must not reach files outside the folder it ships with
(`/home/me/.ssh/id_rsa`, `../../other_cohort/x.png`) nor make the program open a remote store or
server (`s3://...`, `http://...`) unless the user said so. So

    resolve_data_path("tiles/a.png", folder)                  # -> "/data/cohort/tiles/a.png", None
    resolve_data_path("../x.png", folder)                     # -> None, "... outside the data root ..."
    resolve_data_path("../x.png", folder, root="/data")       # -> "/data/x.png", None
    resolve_data_path("s3://bucket/s.zarr", folder)           # -> None, "... --allow-remote ..."
    resolve_data_path("s3://bucket/s.zarr", folder, allow_remote=True)   # -> the URL, None

Relative paths are taken from the data file's folder; every path must lie under the data root, that
folder unless the user names a wider one (`--data-root DIR`). The check is on the path as written (no
symlinks are followed): links the user placed under the root stay usable.
`open_data_file` opens what `resolve_data_path` returned, local or remote (fsspec).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO

__all__ = ["is_url", "resolve_data_path", "open_data_file", "add_data_path_options"]

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`scheme://...`, a scheme of two or more letters: not a drive letter)."""
    return bool(_URL_RE.match(str(path)))


def resolve_data_path(raw: str, base: str | Path, *, root: str | Path | None = None, allow_remote: bool = False,
                      what: str = "image path") -> tuple[str | None, str | None]:
    """(the absolute path, or the URL when remote data is allowed; None), or (None, why the row cannot
    use it, naming the fix). `raw` is a path as written in a data file: relative to `base` (the file's
    folder), or absolute; either way it must lie under `root` (default: `base`)."""
    raw = str(raw).strip()
    if not raw:
        return None, f"has an empty {what}"
    if is_url(raw):
        if allow_remote:
            return raw, None
        return None, (f"{what} {raw!r} is a URL (remote data); pass --allow-remote to let data files open "
                      "remote stores and files")
    fence = os.path.abspath(os.fspath(root if root is not None else base))
    full = os.path.normpath(os.path.join(os.path.abspath(os.fspath(base)),
                                         os.path.expanduser(raw) if raw.startswith("~") else raw))
    if os.path.commonpath([fence, full]) != fence:
        return None, (f"{what} {raw!r} lies outside the data root {fence}; move the file under it or pass "
                      "--data-root DIR (a folder holding every file the data file names)")
    return full, None


def open_data_file(path: str) -> IO[bytes]:
    """A binary file object of a resolved data path: a local file, or a URL through fsspec."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def add_data_path_options(parser, what: str = "the data file") -> None:
    """`--data-root DIR` and `--allow-remote` on a command that reads a data file naming images."""
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder every image path in {what} must lie under (default: the folder of "
                             f"{what}, which relative paths are taken from)")
    parser.add_argument("--allow-remote", action="store_true",
                        help=f"let {what} name remote images or stores (URLs such as s3:// or https://)")
