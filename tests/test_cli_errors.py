"""Every error a user can cause ends as one line on stderr and exit status 2 (a traceback only with -v);
commands that read or add to a store never create one; options come from the config dataclasses."""
from __future__ import annotations

import dataclasses
import typing  # noqa: F401 - the string annotations of _Cfg
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_store
from wsi.cli import build_parser, main
from wsi.cli_common import config_from_args


def wsi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi.cli", *args], capture_output=True, text=True)


def wsi_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`wsi ARGS` in this process (faster than a subprocess), as a CompletedProcess."""
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["wsi", *args], rc, out.out, out.err)


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def clam_dir(tmp_path) -> Path:
    import h5py

    d = tmp_path / "clam" / "h5_files"
    d.mkdir(parents=True)
    with h5py.File(d / "s1.h5", "w") as f:
        f["coords"] = np.array([[0, 0], [256, 0]], np.int64)
        f["features"] = np.ones((2, 4), np.float32)
    return tmp_path / "clam"


def test_missing_store_is_one_line_and_never_created(tmp_path, capsys):
    typo = tmp_path / "typo.zarr"
    ann = tmp_path / "a.geojson"
    ann.write_text("[]")
    for args in (["info", str(typo)], ["info", str(typo), "--json"],
                 ["labels", str(typo), "--annotations", str(ann)],
                 ["export-h5", str(typo), "--encoder", "e", "--out", str(tmp_path / "out")],
                 ["embed", str(typo), "--encoder", "efficientnet-lite0", "--random-weights"]):
        one_error_line(wsi_main(capsys, "-q", *args), f"{typo}: no tile store here")
        assert not typo.exists(), args
    assert not (tmp_path / "out").exists()


def test_not_a_store_is_one_line(tmp_path, clam_dir):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.csv").write_text("a,b\n")
    line = one_error_line(wsi("import-h5", str(clam_dir), "--store", str(taken), "--encoder", "r50"))
    assert f"{taken}: exists and is not a tile store" in line
    one_error_line(wsi("info", str(taken)), f"{taken}: not a tile store")
    assert sorted(p.name for p in taken.iterdir()) == ["results.csv"]
    # the same import into a new store works
    r = wsi("-q", "import-h5", str(clam_dir), "--store", str(tmp_path / "new.zarr"), "--encoder", "r50")
    assert r.returncode == 0 and "1 imported" in r.stdout, r.stderr


def test_traceback_only_with_verbose(tmp_path, capsys):
    missing = str(tmp_path / "none.zarr")
    assert main(["info", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"wsi: error: {missing}: no tile store here; create one with `wsi tile SLIDES --store {missing}`\n"
    r = wsi("-v", "info", missing)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "StoreError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("wsi: error: ")


def test_verbose_and_quiet_after_the_subcommand(tmp_path, capsys):
    """-q / -v are accepted before or after the subcommand, for wsi and mil alike, and add up."""
    from mil.cli import build_parser as mil_parser

    train = ["train", "--store", "s.zarr", "--labels", "l.csv", "--encoder", "e", "--out", "run"]
    for argv, verbose, quiet in ((train, 0, False), (train + ["-q"], 0, True), (["-q", *train], 0, True),
                                 (["-v", *train, "-v", "--quiet"], 2, True), (["-q", *train, "-q"], 0, True)):
        a = mil_parser().parse_args(argv)
        assert (a.verbose, a.quiet, a.command, a.out) == (verbose, quiet, "train", Path("run")), argv
        assert not {"sub_verbose", "sub_quiet"} & set(vars(a))
    store = make_store(tmp_path / "s.zarr", {"a": 2})
    a = build_parser().parse_args(["info", str(store.path), "-v"])
    assert (a.verbose, a.quiet, a.store) == (1, False, str(store.path))
    assert wsi_main(capsys, "info", str(store.path), "-v").returncode == 0
    # -v after the subcommand is honoured: the error comes with its traceback
    r = wsi("info", str(tmp_path / "none.zarr"), "-v")
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr


def test_user_value_errors_are_one_line(tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", {"a": 2})
    ann = tmp_path / "a.geojson"
    ann.write_text("[]")
    one_error_line(wsi_main(capsys, "labels", str(store.path), "--annotations", str(ann), "--name", "../up"),
                   "invalid label name '../up'")
    r = wsi("tile", str(tmp_path), "--store", str(tmp_path / "t.zarr"), "--tile-codec", "webp")
    assert r.returncode == 2 and "unknown tile codec 'webp'" in r.stderr and "Traceback" not in r.stderr
    r = wsi("tile", str(tmp_path), "--store", str(tmp_path / "t.zarr"), "--mpp", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr
    assert not (tmp_path / "t.zarr").exists()


# ---- options from the config dataclasses -------------------------------------------------------------
def test_tile_options_take_the_dataclass_defaults():
    from wsi.pipeline import TilingConfig
    from wsi.tissue import TissueParams

    a = build_parser().parse_args(["tile", "x.svs", "--store", "s.zarr"])
    assert config_from_args(TilingConfig, a, tissue=config_from_args(TissueParams, a)) == TilingConfig()
    a = build_parser().parse_args(["tile", "x.svs", "--store", "s.zarr", "--mpp", "1", "--no-tiles", "--no-fast-read",
                                   "--tile-codec", "jpeg-80", "--patch-size", "224", "--min-area-um2", "5"])
    cfg = config_from_args(TilingConfig, a, tissue=config_from_args(TissueParams, a))
    assert cfg == TilingConfig(target_mpp=1.0, save_tiles=False, fast_read=False, tile_codec="jpeg-80",
                               patch_size=224, tissue=TissueParams(min_area_um2=5.0))
    a = build_parser().parse_args(["tile", "x.svs", "--store", "s.zarr", "--tile-codec", "jpeg"])
    assert config_from_args(TilingConfig, a).tile_codec == "jpeg-90"


def test_embed_options_cover_embed_config(monkeypatch, capsys):
    from wsi.embed import EmbedConfig
    from wsi.encoders.registry import REGISTRY, list_encoders

    a = build_parser().parse_args(["embed", "s.zarr", "--encoder", "uni"])
    assert config_from_args(EmbedConfig, a) == EmbedConfig(encoder="uni")
    a = build_parser().parse_args(["embed", "s.zarr", "--encoder", "uni", "--random-weights", "--batch-size", "8"])
    assert config_from_args(EmbedConfig, a) == EmbedConfig(encoder="uni", pretrained=False, batch_size=8)
    # every field has an option with a help text; the encoder help lists the registry, whatever it holds
    spec = dataclasses.replace(list_encoders()[0], name="zz-test-encoder")
    monkeypatch.setitem(REGISTRY.entries, "zz-test-encoder", spec)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for s in list_encoders():
        assert s.name in out
    embed = next(p for p in build_parser()._subparsers._group_actions[0].choices.values() if p.prog.endswith("embed"))
    dests = {act.dest: act for act in embed._actions}
    for f in dataclasses.fields(EmbedConfig):
        assert f.name in dests and dests[f.name].help, f"EmbedConfig.{f.name} has no documented option"


@dataclasses.dataclass(frozen=True)
class _Cfg:
    name: str
    mode: "typing.Literal['a', 'b']" = "a"
    rate: float = dataclasses.field(default=0.1, metadata={"help": "step size"})
    limit: int | None = None
    fast: bool = True
    loud: bool = False
    extra: dict = dataclasses.field(default_factory=dict)


def test_add_config_options_rules(capsys):
    import argparse

    from wsi.cli_common import add_config_options

    p = argparse.ArgumentParser(prog="t")
    added = add_config_options(p, _Cfg, names={"fast": "--slow"}, prefix="", help={"loud": "say more"})
    assert added == ["name", "mode", "rate", "limit", "fast", "loud"]     # the dict field has no CLI form
    assert config_from_args(_Cfg, p.parse_args(["--name", "x"])) == _Cfg("x")
    got = config_from_args(_Cfg, p.parse_args(["--name", "x", "--mode", "b", "--rate", "2", "--limit", "3",
                                               "--slow", "--loud"]), extra={"k": 1})
    assert got == _Cfg("x", "b", 2.0, 3, False, True, {"k": 1})
    for bad in (["--mode", "c", "--name", "x"], []):                     # not a choice; a required field missing
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    p.print_help()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "step size (default: 0.1)" in help_text and "say more" in help_text
    with pytest.raises(ValueError, match="_Cfg has no field 'nope'"):
        add_config_options(argparse.ArgumentParser(), _Cfg, names={"nope": "--nope"})
    with pytest.raises(ValueError, match="extra .* has no command-line form"):
        add_config_options(argparse.ArgumentParser(), _Cfg, only=("extra",))
    q = argparse.ArgumentParser()
    add_config_options(q, _Cfg, only=("name", "limit"), prefix="w2s-")
    a = q.parse_args(["--w2s-name", "y", "--w2s-limit", "4"])
    assert config_from_args(_Cfg, a, prefix="w2s-") == _Cfg("y", limit=4)


def test_building_the_command_lines_imports_no_torch():
    """`wsi tile` / `wsi info` must start light: registries are read only when help is shown
    (segmentation of a 100k slide is ~1 s and ~150 MiB; importing torch alone is ~1 s and ~500 MiB)."""
    import subprocess
    import sys

    code = ("import sys, wsi.cli, mil.cli; wsi.cli.build_parser(); mil.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'open_clip', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
