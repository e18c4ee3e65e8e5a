"""`clip train`: it learns (loss down, held-out recall up), resumes after SIGKILL to the same result,
refuses to resume into a run of other data, streams from shards, and its run folder is an encoder."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clip.config import ClipTrainConfig
from clip.train import train_clip
from conftest import make_store
from wsi.errors import RunError

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 180, 60), "yellow": (220, 210, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20)}


def colour_cohort(root: Path, n_slides: int = 8, per_slide: int = 36, seed: int = 0):
    """Slides of flat-colour tiles with noise; each tile's caption names its colour (and, so that no two
    captions are the same text, which retrieval would score as ties, a tile number)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    tiles, rows = {}, []
    for k in range(n_slides):
        sid = f"s{k}"
        which = rng.integers(0, len(names), per_slide)
        base = np.array([COLOURS[names[w]] for w in which], float)[:, None, None, :]
        tiles[sid] = np.clip(base + rng.normal(0, 18, (per_slide, 32, 32, 3)), 0, 255).astype(np.uint8)
        rows += [(sid, i, f"a tile stained {names[w]}, number {k * per_slide + i}") for i, w in enumerate(which)]
    store = make_store(root / "c.zarr", {s: len(t) for s, t in tiles.items()}, tiles=tiles, tile_size=32)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tile", "caption"])
        w.writerows(rows)
    return store.path, root / "captions.csv"


FAST = dict(model="pathoclip-tiny", epochs=6, batch_size=32, lr=3e-3, warmup=4, val_fraction=0.25, patience=10,
            device="cpu", num_workers=0)


def test_training_lowers_the_loss_and_raises_held_out_recall(tmp_path):
    store, caps = colour_cohort(tmp_path)
    m = train_clip(ClipTrainConfig(**FAST), caps, tmp_path / "run", store=store, progress=False)
    h = m["history"]
    assert len(h) == 6 and m["stopped"] == "epochs"
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"]
    assert h[-1]["val"]["loss"] < h[0]["val"]["loss"]
    r5 = lambda e: e["val"]["recall"]["image_to_text"]["R@5"]  # noqa: E731
    assert r5(h[-1]) > r5(h[0]) + 0.1 and r5(h[-1]) > 0.35
    run = tmp_path / "run"
    for f in ("model.safetensors", "open_clip_config.json", "config.json", "metrics.json", "curves.png"):
        assert (run / f).is_file(), f
    cfg = json.loads((run / "config.json").read_text())
    val_slides = set(cfg["data"]["val_groups"])
    assert val_slides and len(val_slides) < 8 and cfg["data"]["n_val_images"] == 36 * len(val_slides)


def test_run_folder_embeds_with_wsi_embed(tmp_path):
    from wsi.embed import EmbedConfig, embed_store
    from wsi.store import TileStore

    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=12)
    train_clip(ClipTrainConfig(**{**FAST, "epochs": 1}), caps, tmp_path / "run", store=store, progress=False)
    name = f"pathoclip:{tmp_path / 'run'}"
    embed_store(store, EmbedConfig(name, device="cpu"), progress=False)
    view = TileStore.open(store)["s0"]
    f = view.features(name)
    assert f.shape == (12, 32) and np.isfinite(f).all()


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "clip.cli", "-q", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tmp_path):
    store, caps = colour_cohort(tmp_path, n_slides=8, per_slide=60)
    args = ["--captions", str(caps), "--store", str(store), "--model", "pathoclip-tiny", "--epochs", "3",
            "--batch-size", "16", "--lr", "3e-3", "--warmup", "4", "--val-fraction", "0.25", "--patience", "10",
            "--device", "cpu", "--num-workers", "0"]
    ref = _cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()
    run = tmp_path / "killed"
    p = _cli([*args, "--out", str(run)])
    state = run / "last" / "state.json"
    t0 = time.time()
    while time.time() - t0 < 300:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 0:   # killed in epoch 2 of 3
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = json.loads(state.read_text())["epoch"] + 1
    assert done < 3, "the run finished before it could be killed: make the epochs longer"
    again = _cli([*args, "--out", str(run)])
    assert again.wait(timeout=300) == 0, again.stdout.read().decode()
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert len(b["history"]) == len(a["history"]) == 3
    for ea, eb in zip(a["history"], b["history"]):
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-4, abs=1e-5)
        assert eb["val"]["loss"] == pytest.approx(ea["val"]["loss"], rel=1e-4, abs=1e-5)
    assert b["best_epoch"] == a["best_epoch"]


def test_changed_data_refuses_to_resume(tmp_path):
    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=12)
    cfg = ClipTrainConfig(**{**FAST, "epochs": 1})
    train_clip(cfg, caps, tmp_path / "run", store=store, progress=False)
    with open(caps, "a") as f:
        f.write("s0,0,an extra caption\n")
    with pytest.raises(RunError, match="other settings or data.*another --out"):
        train_clip(cfg, caps, tmp_path / "run", store=store, progress=False)
    with pytest.raises(RunError, match="lr"):
        train_clip(ClipTrainConfig(**{**FAST, "epochs": 1, "lr": 1e-4}), caps, tmp_path / "run", store=store,
                   progress=False)


def test_trains_from_webdataset_shards(tmp_path):
    from clip.data import read_captions
    from clip.shards import write_shards

    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=24)
    write_shards(read_captions(caps, store=store), tmp_path / "shards", per_shard=24)
    m = train_clip(ClipTrainConfig(**{**FAST, "epochs": 3}), tmp_path / "shards", tmp_path / "run", progress=False)
    h = m["history"]
    assert len(h) == 3 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[0]["val"]["loss"] > 0 and json.loads((tmp_path / "run" / "config.json").read_text())["data"][
        "n_val_images"] == 24


def test_siglip_locked_text_accumulation_and_checkpointing(tmp_path):
    """--loss siglip adds SigLIP's bias (and the rebuilt model has it), --lock-text leaves the text
    tower untouched, --grad-accum and --grad-checkpointing train."""
    import torch
    from safetensors.torch import load_file

    from clip.models import load_model

    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=24)
    cfg = ClipTrainConfig(**{**FAST, "epochs": 2, "batch_size": 8, "loss": "siglip", "lock_text": True,
                             "grad_accum": 2, "grad_checkpointing": True})
    m = train_clip(cfg, caps, tmp_path / "run", store=store, progress=False)
    assert len(m["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in m["history"])
    torch.manual_seed(0)  # train_clip seeds 0 before building: the same initial weights
    init = load_model("pathoclip-tiny").model.inner.state_dict()
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert "logit_bias" in got
    text = [k for k in init if k.startswith(("transformer.", "token_embedding", "ln_final", "text_projection"))]
    assert text and all(torch.equal(got[k], init[k]) for k in text)
    assert not torch.equal(got["visual.conv1.weight"], init["visual.conv1.weight"])
    run = load_model(str(tmp_path / "run"))
    assert run.model.inner.logit_bias is not None


def test_torchrun_two_processes_train_with_gathered_features(tmp_path):
    """`torchrun --nproc_per_node 2 -m clip.cli train` on CPU (gloo): DDP, DistributedSampler and
    ClipLoss's gather-with-grad, as on several GPUs."""
    store, caps = colour_cohort(tmp_path, n_slides=6, per_slide=24)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clip.cli",
           "-q", "train", "--captions", str(caps), "--store", str(store), "--model", "pathoclip-tiny", "--out",
           str(tmp_path / "run"), "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--num-workers", "0",
           "--val-fraction", "0.34"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    n_train = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["n_train_images"]
    h = m["history"]
    assert len(h) == 2 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[0]["batches"] == n_train // (8 * 2)   # each rank saw half the pairs
