"""`wsi embed`: features equal a direct forward; resume after a kill; concurrent processes; errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi.cli import main
from wsi.embed import EmbedConfig, embed_store
from wsi.encoders import create_encoder
from wsi.store import TileStore


@pytest.fixture(scope="module")
def local_encoder(tmp_path_factory) -> tuple[str, str]:
    """A small timm model with fixed weights in a local safetensors file: (encoder name, weights path)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("w") / "resnet10t.safetensors"
    save_file(m.state_dict(), str(path))
    return "timm:resnet10t", str(path)


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory, cmu_slide) -> Path:
    store = tmp_path_factory.mktemp("s") / "cmu.zarr"
    assert main(["-q", "tile", str(cmu_slide), "--store", str(store), "--no-progress", "--workers", "1"]) == 0
    return store


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory, synth_cohort) -> Path:
    store = tmp_path_factory.mktemp("s") / "synth.zarr"
    assert main(["-q", "tile", str(synth_cohort), "--store", str(store), "--no-progress", "--workers", "2"]) == 0
    return store


def direct(store: Path, sid: str, name: str, weights: str | None) -> np.ndarray:
    enc = create_encoder(name, weights=weights)
    tiles = torch.from_numpy(TileStore(store, mode="r").slide(sid)["tiles"][:])
    with torch.inference_mode():
        return enc(enc.preprocess(tiles)).numpy()


def test_features_equal_direct_forward(tmp_path, cmu_store, local_encoder):
    name, w = local_encoder
    res = embed_store(cmu_store, EmbedConfig(name, weights=w, batch_size=16), progress=False)
    assert [r.status for r in res] == ["embedded"]
    s = TileStore(cmu_store, mode="r")
    feats = s.features("cmu_small_region", name)
    assert feats.shape == (s.coords("cmu_small_region").shape[0], 512) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, direct(cmu_store, "cmu_small_region", name, w), rtol=1e-4, atol=1e-4)
    attrs = dict(s.slide("cmu_small_region")["features"]["timm_resnet10t"].attrs)
    assert attrs["encoder"] == name and attrs["complete"] is True and attrs["weights"] == w
    assert attrs["transform"]["mean"] == [0.485, 0.456, 0.406] and len(attrs["weights_digest"]) == 16
    assert s.slide_info("cmu_small_region")["features"] == ["timm_resnet10t"]
    # a second run skips; --overwrite redoes
    assert [r.status for r in embed_store(cmu_store, EmbedConfig(name, weights=w), progress=False)] == ["skipped"]
    again = embed_store(cmu_store, EmbedConfig(name, weights=w, overwrite=True), progress=False)
    assert [r.status for r in again] == ["embedded"]
    np.testing.assert_array_equal(TileStore(cmu_store, mode="r").features("cmu_small_region", name), feats)


def test_real_efficientnet_features_and_slide_read_path(tmp_path, cmu_slide):
    """The demo's encoder with real weights; a coords-only store reads pixels from the slide instead."""
    with_tiles, no_tiles = tmp_path / "a.zarr", tmp_path / "b.zarr"
    main(["-q", "tile", str(cmu_slide), "--store", str(with_tiles), "--no-progress", "--workers", "1"])
    main(["-q", "tile", str(cmu_slide), "--store", str(no_tiles), "--no-tiles", "--no-progress"])
    for st in (with_tiles, no_tiles):
        assert main(["-q", "embed", str(st), "--encoder", "efficientnet-lite0", "--batch-size", "16",
                     "--no-progress"]) == 0
    a = TileStore(with_tiles, mode="r").features("cmu_small_region", "efficientnet-lite0")
    b = TileStore(no_tiles, mode="r").features("cmu_small_region", "efficientnet-lite0")
    assert a.shape[1] == 1280 and np.abs(a).sum() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, direct(with_tiles, "cmu_small_region", "efficientnet-lite0", None), rtol=1e-4, atol=1e-4)
    assert TileStore(no_tiles, mode="r").slide("cmu_small_region")["features"]["efficientnet-lite0"].attrs["source"] == "slide"


def embed_cmd(store: Path, name: str, w: str) -> list[str]:
    return [sys.executable, "-m", "wsi.cli", "-q", "embed", str(store), "--encoder", name, "--weights", w,
            "--batch-size", "8", "--no-progress", "--json"]


def feature_states(store: Path, key: str) -> dict[str, bool]:
    out = {}
    for meta in (store / "slides").glob(f"*/features/{key}/zarr.json"):
        try:
            out[meta.parents[2].name] = json.loads(meta.read_text())["attributes"]["complete"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def test_kill_then_resume(tmp_path, synth_store, local_encoder):
    import shutil

    name, w = local_encoder
    store = tmp_path / "s.zarr"
    shutil.copytree(synth_store, store)
    proc = subprocess.Popen(embed_cmd(store, name, w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 120, {}
    while time.time() < deadline and proc.poll() is None:
        seen = feature_states(store, "timm_resnet10t")
        if True in seen.values() and False in seen.values():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert False in seen.values(), f"finished before it could be killed mid-slide: {seen}"
    done = {k for k, v in feature_states(store, "timm_resnet10t").items() if v}
    r = subprocess.run(embed_cmd(store, name, w), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    status = {x["slide_id"]: x["status"] for x in json.loads(r.stdout)}
    assert {k for k, v in status.items() if v == "skipped"} == done       # the dead run's claim was taken over
    assert set(status.values()) <= {"skipped", "embedded"} and len(status) == 5
    s = TileStore(store, mode="r")
    for sid in s.slide_ids():
        np.testing.assert_allclose(s.features(sid, name), direct(store, sid, name, w), rtol=1e-4, atol=1e-4)
    assert not list((store / ".claims").iterdir())


def test_two_concurrent_processes_share_the_work(tmp_path, synth_store, local_encoder):
    import shutil

    name, w = local_encoder
    store = tmp_path / "s.zarr"
    shutil.copytree(synth_store, store)
    procs = [subprocess.Popen(embed_cmd(store, name, w), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    embedded = [x["slide_id"] for out, _ in outs for x in json.loads(out) if x["status"] == "embedded"]
    assert sorted(embedded) == sorted(set(embedded))                     # nobody embedded a slide twice
    s = TileStore(store, mode="r")
    assert all(s.has_features(sid, name) for sid in s.slide_ids())       # and every slide got done
    sid = s.slide_ids()[0]
    np.testing.assert_allclose(s.features(sid, name), direct(store, sid, name, w), rtol=1e-4, atol=1e-4)


def test_torchrun_ranks_take_disjoint_slides(synth_store, local_encoder, monkeypatch, tmp_path):
    import shutil

    name, w = local_encoder
    store = tmp_path / "s.zarr"
    shutil.copytree(synth_store, store)
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got.append({r.slide_id for r in embed_store(store, EmbedConfig(name, weights=w), progress=False)})
    assert got[0].isdisjoint(got[1]) and len(got[0] | got[1]) == 5


def test_cli_errors_offline_and_bad_name(cmu_store):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "embed", str(cmu_store), "--encoder", "uni"],
                       capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and time.perf_counter() - t0 < 60
    assert "huggingface-cli download MahmoodLab/uni" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "embed", str(cmu_store), "--encoder", "unii"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "choose one of:" in r.stderr and "virchow2" in r.stderr
