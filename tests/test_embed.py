"""`wsi embed`: features equal a direct forward; tiles come through TileDataset in chunk-aligned
batches; resume after a kill; concurrent processes; one bad slide never stops the cohort; errors."""
from __future__ import annotations

import json
import os
import shutil
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
from wsi.store import TILE_CHUNK, StoreError, TileStore


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


def copy_of(store: Path, tmp_path: Path) -> Path:
    """A private copy of a session-wide store, so that embedding into it changes nothing shared."""
    out = tmp_path / store.parent.name / store.name
    shutil.copytree(store, out)
    return out


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory, synth_cohort) -> Path:
    store = tmp_path_factory.mktemp("s") / "synth.zarr"
    assert main(["-q", "tile", str(synth_cohort), "--store", str(store), "--no-progress", "--workers", "2"]) == 0
    return store


def direct(store: Path, sid: str, name: str, weights: str | None) -> np.ndarray:
    """The encoder run on the slide's tiles in one batch, without wsi embed."""
    enc = create_encoder(name, weights=weights)
    view = TileStore.open(store, readonly=True)[sid]
    tiles = torch.from_numpy(view.read_tiles(np.arange(view.n_tiles)))
    with torch.inference_mode():
        return enc(enc.preprocess(tiles)).numpy()


def test_features_equal_direct_forward(tmp_path, cmu_tiled, local_encoder):
    name, w = local_encoder
    store = copy_of(cmu_tiled("jpeg"), tmp_path)
    res = embed_store(store, EmbedConfig(name, weights=w, batch_size=16), progress=False)
    assert [r.status for r in res] == ["embedded"]
    view = TileStore.open(store, readonly=True)["cmu_small_region"]
    feats = view.features(name)
    assert feats.shape == (view.n_tiles, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, direct(store, "cmu_small_region", name, w), rtol=1e-4, atol=1e-4)
    meta = view.feature_meta(name)
    assert meta["encoder"] == name and meta["complete"] is True and meta["weights"] == w
    assert meta["transform"]["mean"] == [0.485, 0.456, 0.406] and len(meta["weights_digest"]) == 16
    assert meta["source"] == "tiles" and meta["precision"] == "fp32" and meta["dim"] == 512
    assert view.feature_names() == ["timm_resnet10t"]
    # a second run skips; --overwrite redoes
    assert [r.status for r in embed_store(store, EmbedConfig(name, weights=w), progress=False)] == ["skipped"]
    again = embed_store(store, EmbedConfig(name, weights=w, overwrite=True), progress=False)
    assert [r.status for r in again] == ["embedded"]
    np.testing.assert_array_equal(TileStore.open(store, readonly=True)["cmu_small_region"].features(name), feats)


def test_tiles_come_through_tiledataset_in_chunk_aligned_batches(store_factory, local_encoder, monkeypatch):
    """Every tile is read once, through TileDataset.__getitems__, in coords order, a whole number of
    store chunks per batch; with DataLoader workers the features are the same."""
    from wsi.data import TileDataset

    name, w = local_encoder
    store = store_factory({"a": 37, "b": 5}, tiles=True, tile_size=32)
    calls: list[list[int]] = []
    real = TileDataset.__getitems__

    def spy(self, indices):
        calls.append([self.items[k][1] for k in indices])
        return real(self, indices)

    monkeypatch.setattr(TileDataset, "__getitems__", spy)
    res = embed_store(store.path, EmbedConfig(name, weights=w, batch_size=20, num_workers=0), ["a"], progress=False)
    assert [(r.slide_id, r.status, r.n_tiles) for r in res] == [("a", "embedded", 37)]
    bs = 20 - 20 % TILE_CHUNK
    assert calls == [list(range(i, min(i + bs, 37))) for i in range(0, 37, bs)]
    assert all(c[0] % TILE_CHUNK == 0 for c in calls)
    monkeypatch.undo()
    feats = TileStore.open(store.path, readonly=True)["a"].features(name)
    np.testing.assert_allclose(feats, direct(store.path, "a", name, w), rtol=1e-4, atol=1e-4)
    res = embed_store(store.path, EmbedConfig(name, weights=w, batch_size=8, num_workers=2, overwrite=True),
                      progress=False)
    assert {r.slide_id: r.status for r in res} == {"a": "embedded", "b": "embedded"}
    np.testing.assert_allclose(TileStore.open(store.path, readonly=True)["a"].features(name), feats,
                               rtol=1e-5, atol=1e-5)


def test_features_only_slide_fails_clearly_and_the_cohort_goes_on(store_factory, local_encoder):
    name, w = local_encoder
    rng = np.random.default_rng(0)
    tiles = {sid: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for sid, n in (("a", 9), ("c", 3))}
    store = store_factory({"a": 9, "imported": {"n": 4, "kind": "features-only", "source": "/h5/imported.h5"},
                           "c": 3}, tiles=tiles)
    res = {r.slide_id: r for r in embed_store(store.path, EmbedConfig(name, weights=w), progress=False)}
    assert res["a"].status == res["c"].status == "embedded"
    assert res["imported"].status == "failed"
    assert "features only" in res["imported"].error and "wsi tile" in res["imported"].error
    view = TileStore.open(store.path, readonly=True)
    assert view["a"].has_features(name) and not view["imported"].has_features(name)


def test_missing_store_is_an_error_and_nothing_is_created(tmp_path, local_encoder):
    name, w = local_encoder
    typo = tmp_path / "typo.zarr"
    with pytest.raises(StoreError, match="typo.zarr"):
        embed_store(typo, EmbedConfig(name, weights=w), progress=False)
    assert not typo.exists()
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "embed", str(typo), "--encoder", name, "--weights", w],
                       capture_output=True, text=True)
    assert r.returncode == 2 and str(typo) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not typo.exists()


def test_unknown_slide_ids_are_an_error(store_factory, local_encoder):
    name, w = local_encoder
    store = store_factory({"a": 3}, tiles=True)
    with pytest.raises(StoreError, match="'nope'"):
        embed_store(store.path, EmbedConfig(name, weights=w), ["a", "nope"], progress=False)


def test_real_efficientnet_features_and_slide_read_path(tmp_path, cmu_tiled):
    """The demo's encoder with real weights; a coords-only store reads pixels from the slide instead
    (compared with lossless stored tiles, which hold exactly those pixels)."""
    with_tiles, no_tiles = copy_of(cmu_tiled("lossless"), tmp_path), copy_of(cmu_tiled("none"), tmp_path)
    for st in (with_tiles, no_tiles):
        assert main(["-q", "embed", str(st), "--encoder", "efficientnet-lite0", "--batch-size", "16",
                     "--no-progress"]) == 0
    a = TileStore.open(with_tiles, readonly=True)["cmu_small_region"].features("efficientnet-lite0")
    b_view = TileStore.open(no_tiles, readonly=True)["cmu_small_region"]
    b = b_view.features("efficientnet-lite0")
    assert a.shape[1] == 1280 and np.abs(a).sum() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, direct(with_tiles, "cmu_small_region", "efficientnet-lite0", None),
                               rtol=1e-4, atol=1e-4)
    assert b_view.feature_meta("efficientnet-lite0")["source"] == "slide"


def embed_cmd(store: Path, name: str, w: str) -> list[str]:
    return [sys.executable, "-m", "wsi.cli", "-q", "embed", str(store), "--encoder", name, "--weights", w,
            "--batch-size", "8", "--no-progress", "--json"]


def progress_of(store: Path, name: str, key: str) -> tuple[set[str], set[str]]:
    """(slides with complete features, slides under a claim) of a store another process is embedding."""
    claimed = {p.name.removesuffix(f".{key}.claim") for p in (store / ".claims").glob(f"*.{key}.claim")}
    try:
        s = TileStore.open(store, readonly=True)
        done = {sid for sid in s.slide_ids() if s[sid].has_features(name)}
    except StoreError:
        done = set()
    return done, claimed


def test_kill_then_resume(tmp_path, synth_store, local_encoder):
    name, w = local_encoder
    store = copy_of(synth_store, tmp_path)
    proc = subprocess.Popen(embed_cmd(store, name, w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done, claimed = time.time() + 120, set(), set()
    while time.time() < deadline and proc.poll() is None:
        done, claimed = progress_of(store, name, "timm_resnet10t")
        if done and claimed - done:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert claimed - done, f"finished before it could be killed mid-slide: {done}, {claimed}"
    done, left = progress_of(store, name, "timm_resnet10t")
    assert left - done  # the dead run's claim is still there
    r = subprocess.run(embed_cmd(store, name, w), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    status = {x["slide_id"]: x["status"] for x in json.loads(r.stdout)}
    assert {k for k, v in status.items() if v == "skipped"} == done
    assert {k for k, v in status.items() if v == "embedded"} >= left - done  # the dead run's claim was taken over
    assert set(status.values()) <= {"skipped", "embedded"} and len(status) == 5
    s = TileStore.open(store, readonly=True)
    for sid in s.slide_ids():
        np.testing.assert_allclose(s[sid].features(name), direct(store, sid, name, w), rtol=1e-4, atol=1e-4)
    assert not list((store / ".claims").glob("*.claim"))


def test_two_concurrent_processes_share_the_work(tmp_path, synth_store, local_encoder):
    name, w = local_encoder
    store = copy_of(synth_store, tmp_path)
    procs = [subprocess.Popen(embed_cmd(store, name, w), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    embedded = [x["slide_id"] for out, _ in outs for x in json.loads(out) if x["status"] == "embedded"]
    assert sorted(embedded) == sorted(set(embedded))                     # nobody embedded a slide twice
    s = TileStore.open(store, readonly=True)
    assert all(s[sid].has_features(name) for sid in s.slide_ids())       # and every slide got done
    sid = s.slide_ids()[0]
    np.testing.assert_allclose(s[sid].features(name), direct(store, sid, name, w), rtol=1e-4, atol=1e-4)


def test_torchrun_ranks_take_disjoint_slides(synth_store, local_encoder, monkeypatch, tmp_path):
    name, w = local_encoder
    store = copy_of(synth_store, tmp_path)
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got.append({r.slide_id for r in embed_store(store, EmbedConfig(name, weights=w), progress=False)})
    assert got[0].isdisjoint(got[1]) and len(got[0] | got[1]) == 5


def test_cli_errors_offline_and_bad_name(cmu_tiled):
    store = cmu_tiled("jpeg")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "embed", str(store), "--encoder", "uni"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and time.perf_counter() - t0 < 60
    assert "huggingface-cli download MahmoodLab/uni" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "embed", str(store), "--encoder", "unii"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "choose one of:" in r.stderr and "virchow2" in r.stderr
    assert not TileStore.open(store, readonly=True)["cmu_small_region"].feature_names()  # nothing written
