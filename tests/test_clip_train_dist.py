"""`clip train` under torchrun (two gloo processes on CPU) and its gradient accumulation: every rank
takes the same stop decision (no hang), validation covers the whole validation set, ranks run the
same number of steps on uneven shards, N ranks at batch B train like one process at batch N*B, and
--grad-accum's negatives span the whole accumulated batch. Also: a failed or moved run folder is
not refused for where-to-run settings."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clip.cli import main
from clip.config import ClipTrainConfig
from clip.train import train_clip
from test_clip_train import colour_cohort
from wsi.errors import RunError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "pathoclip-tiny", "--device", "cpu", "--num-workers", "0", "--warmup", "2"]


def _train(args: list[str], procs: int, timeout: float = 240) -> str:
    """`clip train` in `procs` processes (torchrun when 2); fails the test, killing every process of
    the run, when it does not finish within `timeout` seconds."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    cmd = [sys.executable, *launch, "-m", "clip.cli", "-q", "train", *args]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"clip train in {procs} processes did not finish in {timeout} s (hung):\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]
    return out


def _val(run: Path) -> list[dict]:
    return [h["val"] for h in json.loads((run / "metrics.json").read_text())["history"]]


def _close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=rel, abs=1e-5)
    assert a["recall"]["n_images"] == b["recall"]["n_images"]
    for way in ("image_to_text", "text_to_image"):
        for k, v in a["recall"][way].items():
            assert v == pytest.approx(b["recall"][way][k], abs=1e-6), (way, k)


def test_torchrun_on_uneven_shards_stops_early_together_and_validates_on_everything(tmp_path):
    """7 training shards on 2 ranks (4 and 3 shards: 44 and 33 pairs), 2 validation shards (19
    pairs). lr 0 keeps the weights at their seeded start, so the validation loss cannot improve and
    patience 1 stops after epoch 2: rank 0 alone deciding that left rank 1 in the next epoch's
    all-gather. The metrics equal one process's at the same global batch (16) on the same data:
    validation saw all 19 pairs, in the same batches."""
    from clip.data import read_captions
    from clip.shards import write_shards

    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=24)
    write_shards(read_captions(caps, store=store), tmp_path / "shards", per_shard=11)
    args = ["--captions", str(tmp_path / "shards"), *TINY, "--epochs", "5", "--lr", "0", "--patience", "1",
            "--val-fraction", "0.25"]
    _train([*args, "--batch-size", "8", "--out", str(tmp_path / "two")], procs=2)
    _train([*args, "--batch-size", "16", "--out", str(tmp_path / "one")], procs=1)
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["stopped"].startswith("early stop") and len(m["history"]) == 2
    assert m["history"][0]["batches"] == 5     # ceil(77 / (8 * 2)) full batches on each rank
    two, one = _val(tmp_path / "two"), _val(tmp_path / "one")
    assert len(one) == 2 and two[0]["recall"]["n_images"] == 19
    for a, b in zip(two, one):
        _close(a, b)
    assert not (tmp_path / "two" / "cache").exists()


def test_two_ranks_at_batch_b_and_grad_accum_train_like_one_process_at_batch_2b(tmp_path):
    """Locked image tower (its outputs cached once, each rank computing half; no augmentation, whose
    random draws follow the order tiles are read in a batch), 96 training pairs, against one process
    at batch 16: two ranks at batch 8 (ClipLoss gathers features with their gradients, DDP averages)
    and one process at batch 8 with --grad-accum 2 (features cached, each micro-batch scored against
    the whole 16) give the same steps, losses, validation and recall, epoch by epoch."""
    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=32)
    args = ["--captions", str(caps), "--store", str(store), *TINY, "--lock-image", "--epochs", "2", "--lr", "3e-3",
            "--patience", "5", "--val-fraction", "0.25"]
    _train([*args, "--batch-size", "16", "--out", str(tmp_path / "one")], procs=1)
    _train([*args, "--batch-size", "8", "--out", str(tmp_path / "two")], procs=2)
    _train([*args, "--batch-size", "8", "--grad-accum", "2", "--out", str(tmp_path / "acc")], procs=1)
    one, two, acc = (json.loads((tmp_path / r / "metrics.json").read_text())["history"] for r in ("one", "two", "acc"))
    assert [h["batches"] for h in two] == [6, 6] and [h["batches"] for h in one] == [6, 6]
    assert [h["step"] for h in acc] == [h["step"] for h in one] == [6, 12]
    assert one[-1]["train_loss"] < one[0]["train_loss"]
    for other in (two, acc):
        for ha, hb in zip(other, one):
            assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
            _close(ha["val"], hb["val"])


def test_bad_batch_size_is_one_line_before_anything_is_written(tmp_path, capsys):
    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=8)
    run = tmp_path / "run"
    common = ["train", "--captions", str(caps), "--store", str(store), "--out", str(run), *TINY,
              "--epochs", "1", "--val-fraction", "0.25"]
    assert main([*common, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clip: error: --batch-size 0: must be at least 1"] and not run.exists()
    with pytest.raises(RunError, match="--grad-accum -1"):
        ClipTrainConfig(grad_accum=-1)


def test_a_folder_without_a_finished_epoch_is_started_afresh_and_where_to_run_is_not_identity(tmp_path, capsys):
    store, caps = colour_cohort(tmp_path, n_slides=4, per_slide=8)
    run = tmp_path / "run"
    common = ["train", "--captions", str(caps), "--store", str(store), "--out", str(run), *TINY,
              "--epochs", "1", "--val-fraction", "0.25"]
    # a folder whose run never completed an epoch (no last/state.json) holds nothing to keep
    assert main([*common, "--batch-size", "8"]) == 0
    (run / "last" / "state.json").unlink()
    assert main([*common, "--batch-size", "4", "--lr", "1e-3"]) == 0
    assert json.loads((run / "config.json").read_text())["settings"]["batch_size"] == 4
    # where it runs is not what it is: a finished run moved to fp32 / other workers is found finished
    capsys.readouterr()
    assert main([*common, "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32", "--num-workers", "1"]) == 0
    assert "error" not in capsys.readouterr().err
    with pytest.raises(RunError, match="lr"):
        train_clip(ClipTrainConfig(model="pathoclip-tiny", epochs=1, batch_size=4, lr=2e-3, val_fraction=0.25,
                                   device="cpu", num_workers=0), caps, run, store=store, progress=False)


def test_rank_batches_split_the_one_process_batches():
    import torch

    from clip.loaders import RankBatches

    one = list(RankBatches(37, 8, 1, 0, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=True))
    ranks = [list(RankBatches(37, 4, 2, r, shuffle=True, generator=torch.Generator().manual_seed(3),
                              drop_last=True)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
    assert [a + b for a, b in zip(*ranks)] == one
    # no drop_last: the short last global batch is topped up so both ranks hold equal batches
    tail = [list(RankBatches(5, 4, 2, r, shuffle=False)) for r in range(2)]
    assert tail == [[[0, 1, 2]], [[3, 4, 0]]]
    # validation: whole groups of 6 dealt round-robin, each in forward batches of 4
    val = [list(RankBatches(17, 4, 2, r, shuffle=False, group=6)) for r in range(2)]
    assert val[0] == [[0, 1, 2, 3], [4, 5], [12, 13, 14, 15], [16]] and val[1] == [[6, 7, 8, 9], [10, 11]]
    assert [len(RankBatches(17, 4, 2, r, shuffle=False, group=6)) for r in range(2)] == [4, 2]


def test_resampled_shards_give_a_fixed_epoch(tmp_path):
    """Fewer shards than ranks x workers: shards drawn with replacement (open_clip_train's
    ResampledShards2), and with_epoch fixes the pairs per epoch; reproducible per epoch."""
    from clip.data import read_captions
    from clip.shards import shard_pairs, write_shards

    store, caps = colour_cohort(tmp_path, n_slides=2, per_slide=6)
    write_shards(read_captions(caps, store=store), tmp_path / "sh", per_shard=5)
    ds = shard_pairs(tmp_path / "sh", shuffle=4, seed=2, epoch_samples=23, resample=True)
    texts = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        texts.append([t for _, t in ds])
    assert [len(t) for t in texts] == [23, 23, 23] and texts[0] == texts[2] and texts[0] != texts[1]
