"""Paths inside data files (captions CSVs, JSONL rows) stay under the data root; URLs need --allow-remote
(wsi.paths, used by clip.data.read_captions and vlm.data.read_jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi.paths import is_url, open_data_file, resolve_data_path


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
    return path


@pytest.fixture()
def layout(tmp_path):
    """root/data.{csv,jsonl} next to root/img/a.png; secret.png one level up, outside the root."""
    root = tmp_path / "root"
    png(root / "img" / "a.png")
    secret = png(tmp_path / "secret.png", (0, 0, 0))
    return root, secret


def test_resolve_data_path(tmp_path):
    root = tmp_path / "root"
    assert resolve_data_path("img/a.png", root) == (str(root / "img" / "a.png"), None)
    assert resolve_data_path(str(root / "b" / ".." / "a.png"), root) == (str(root / "a.png"), None)
    for raw in ("../secret.png", "img/../../secret.png", str(tmp_path / "secret.png"), "/etc/passwd"):
        path, why = resolve_data_path(raw, root)
        assert path is None and "outside the data root" in why and "--data-root" in why, raw
    path, why = resolve_data_path("s3://bucket/cohort.zarr", root, what="store")
    assert path is None and "--allow-remote" in why and why.startswith("store 's3://")
    assert resolve_data_path("s3://bucket/x.png", root, allow_remote=True) == ("s3://bucket/x.png", None)
    assert resolve_data_path("  ", root)[1] == "has an empty image path"
    # a wider root: paths are still taken from the file's folder, and may now reach the whole root
    assert resolve_data_path("../secret.png", root, root=tmp_path) == (str(tmp_path / "secret.png"), None)
    assert resolve_data_path("../../x.png", root, root=tmp_path)[0] is None
    assert is_url("memory://x/y") and not is_url("C:/x.png") and not is_url("a/b.png")


def test_captions_csv_rows_outside_the_root_or_remote_are_dropped(layout, tmp_path, caplog):
    from clip.data import read_captions

    root, secret = layout
    csv = root / "captions.csv"
    csv.write_text("image_path,caption\nimg/a.png,a red tile\n../secret.png,stolen\n"
                   f"{secret},stolen too\nmemory://bucket/r.png,remote\n")
    caps = read_captions(csv)
    assert caps.images == [("file", str(root / "img" / "a.png"))]
    why = dict(caps.dropped)
    assert set(why) == {3, 4, 5}
    assert "outside the data root" in why[3] and "outside the data root" in why[4] and "--allow-remote" in why[5]
    assert "line 3" in caps.summary()
    # a wider root admits the files outside the CSV's folder, but not the remote one
    wide = read_captions(csv, data_root=tmp_path)
    assert len(wide.images) == 2 and len(wide.captions) == 3 and [n for n, _ in wide.dropped] == [5]


def test_remote_images_open_with_allow_remote(layout):
    """A remote image through fsspec (its in-memory filesystem: a real fsspec backend, no network)."""
    import fsspec

    from clip.data import PairDataset, read_captions

    root, _ = layout
    with fsspec.open("memory://bucket/r.png", "wb") as f:
        f.write((root / "img" / "a.png").read_bytes())
    csv = root / "captions.csv"
    csv.write_text("image_path,caption\nmemory://bucket/r.png,a remote red tile\n")
    caps = read_captions(csv, allow_remote=True)
    assert caps.images == [("file", "memory://bucket/r.png")] and not caps.dropped
    img, text = PairDataset(caps)[0]
    assert text == "a remote red tile" and tuple(np.asarray(img)[0, 0]) == (200, 30, 30)
    with open_data_file("memory://bucket/r.png") as f:
        assert f.read(4) == b"\x89PNG"


def test_jsonl_rows_outside_the_root_or_remote_stores_are_dropped(layout, tmp_path):
    from vlm.data import read_jsonl

    root, secret = layout
    row = {"question": "Which?", "options": ["a", "b"], "answer": "A"}
    lines = [dict(row, images=["img/a.png"]), dict(row, images=["../secret.png"]), dict(row, images=[str(secret)]),
             dict(row, images=[{"store": "s3://bucket/cohort.zarr", "slide": "s", "tile": 0}])]
    data = root / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = read_jsonl(data, "eval")
    assert [r["images"] for r in rows.rows] == [[str(root / "img" / "a.png")]]
    why = dict(rows.dropped)
    assert "outside the data root" in why[2] and "outside the data root" in why[3]
    assert "--allow-remote" in why[4] and "s3://bucket/cohort.zarr" in why[4]
    wide = read_jsonl(data, "eval", data_root=tmp_path)
    assert [r["images"] for r in wide.rows] == [[str(root / "img" / "a.png")], [str(secret)], [str(secret)]]


def test_cli_data_root_flag(layout, tmp_path, capsys):
    from clip.cli import main

    root, _ = layout
    csv = root / "captions.csv"
    csv.write_text("image_path,caption\n../secret.png,a dark tile\n")
    assert main(["shards", "--captions", str(csv), "--out", str(tmp_path / "sh")]) == 2
    assert "outside the data root" in capsys.readouterr().err
    assert main(["-q", "shards", "--captions", str(csv), "--out", str(tmp_path / "sh"), "--data-root",
                 str(tmp_path)]) == 0
    assert list((tmp_path / "sh").glob("*.tar"))
