"""PathoCLIP benchmarks.

    .venv/bin/python scripts/bench/bench_clip.py step  [--model pathoclip-lite] [--steps 20] [--batch-size 32]
    .venv/bin/python scripts/bench/bench_clip.py demo  [--store demo_out/cohort.zarr] [--seeds 0 1 2]
    python scripts/bench/bench_clip.py gpu   [--model ViT-B-16] [--images 8192] [--batch-size 256]   (on a GPU)

step: `clip train`'s step time against a bare open_clip loop (create_model, ClipLoss, AdamW, the
      same autocast) on the same model, the same initial weights and the same batches (the same
      PairDataset and DataLoader), in the same process; full training (no locked tower, no cache).
      The ratio is ours / bare (target <= 1.05), fastest of `--repeats` interleaved runs of each.
demo: the demo's PathoCLIP stage (scripts/demo_clip.py) over seeds: zero-shot balanced accuracy,
      retrieval R@5 both ways and the 8-shot probe, trained and untrained, mean ± std.
gpu:  `torchrun --nproc_per_node 1 -m clip.cli train` of ViT-B-16 in bf16 on image files; images/s
      of the warm epochs and the GPU busy fraction (NVML utilisation sampled every 50 ms during them).

Images for step / gpu are 256 px crops (flipped, rotated, colour-jittered) of the H&E textures in
wsi/data, written as JPEG files with an image_path,caption CSV, so nothing but the repo is needed.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def make_images(out: Path, n: int, seed: int = 0) -> Path:
    """n JPEG crops of wsi/data's H&E textures with captions naming their texture; returns the CSV."""
    import numpy as np
    from PIL import Image

    csv_path = out / "images.csv"
    if csv_path.is_file() and sum(1 for _ in open(csv_path)) == n + 1:
        return csv_path
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    srcs = sorted((REPO / "wsi" / "data").glob("*.jpg"))
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in srcs]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "slide_id"])
        for i in range(n):
            k = int(rng.integers(len(imgs)))
            im = imgs[k]
            y, x = rng.integers(0, im.shape[0] - 256), rng.integers(0, im.shape[1] - 256)
            t = np.rot90(im[y:y + 256, x:x + 256], int(rng.integers(4)))
            t = np.clip(t * rng.uniform(0.85, 1.15, 3), 0, 255).astype(np.uint8)
            Image.fromarray(t).save(out / f"{i:06d}.jpg", quality=90)
            w.writerow([f"{i:06d}.jpg", f"an H&E tile of {srcs[k].stem.split('_')[0]} tissue, crop {i}", f"g{i % 64}"])
    return csv_path


def bare_loop(model_name: str, csv_path: Path, steps: int, batch_size: int, device: str, precision: str,
              seed: int) -> float:
    """Seconds for `steps` steps of a plain open_clip training loop over the same data as clip train."""
    import open_clip
    import torch
    from open_clip import image_transform
    from open_clip.loss import ClipLoss

    from clip.data import PairDataset, read_captions, split_by_group
    from clip.models import load_model
    from clip.loaders import pair_loader
    from wsi.runtime import autocast, resolve_device, seed_everything

    dev = resolve_device(device)
    seed_everything(seed)
    enc = load_model(model_name)
    model = enc.model.inner.to(dev).train()
    tok = open_clip.get_tokenizer(model_name) if model_name in open_clip.list_models() else enc.tokenize
    caps = read_captions(csv_path)
    train_pos, _ = split_by_group(caps, 0.0, seed)
    ds = PairDataset(caps, train_pos, image_transform(enc.spec.input_size, is_train=True, mean=enc.spec.mean,
                                                      std=enc.spec.std), seed=seed)
    ds.set_epoch(0)
    loader = pair_loader(ds, batch_size, True, seed, 0, 8 if dev.type == "cuda" else 0, True, 1, 0)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t0 = time.perf_counter()
    for i, (x, texts) in enumerate(loader):
        if i == steps:
            break
        with autocast(dev, precision):
            f_img, f_txt, scale = model(x.to(dev, non_blocking=True), tok(texts).to(dev, non_blocking=True))[:3]
            loss = loss_fn(f_img, f_txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def cmd_step(a) -> dict:
    import shutil

    from clip.config import ClipTrainConfig
    from clip.train import train_clip
    from wsi.runtime import resolve_device, resolve_precision

    data = make_images(a.work / "images", a.steps * a.batch_size + a.batch_size)
    dev = resolve_device(a.device)
    from clip.models import load_model

    precision = resolve_precision(dev, "auto", load_model(a.model).spec.precision)
    bare, ours = [], []
    for r in range(a.repeats):   # interleaved; the fastest of each, since this machine's load comes and goes
        bare.append(bare_loop(a.model, data, a.steps, a.batch_size, a.device, precision, 0))
        shutil.rmtree(a.work / "run", ignore_errors=True)
        m = train_clip(ClipTrainConfig(model=a.model, epochs=1, batch_size=a.batch_size, lock_image=False,
                                       val_fraction=0.0, max_steps=a.steps, device=a.device, seed=0,
                                       num_workers=8 if dev.type == "cuda" else 0),
                       data, a.work / "run", progress=False)
        ours.append(m["history"][0]["train_seconds"])
    ratio = min(ours) / min(bare)
    res = {"model": a.model, "steps": a.steps, "batch_size": a.batch_size, "device": str(dev), "precision": precision,
           "bare_s": [round(t, 3) for t in bare], "clip_train_s": [round(t, 3) for t in ours],
           "ratio": round(ratio, 3)}
    print(f"{a.model}, {a.steps} steps of {a.batch_size} on {dev} ({precision}): bare open_clip loop "
          f"{', '.join(f'{t:.2f}' for t in bare)} s, clip train {', '.join(f'{t:.2f}' for t in ours)} s -> "
          f"{ratio:.3f}x (fastest of each)")
    return res


def cmd_demo(a) -> dict:
    import numpy as np

    from demo_clip import clip_stage, rows_table

    labels = a.store.parent / "synth" / "labels.csv"
    per_seed = []
    for s in a.seeds:
        rows = clip_stage(a.store, labels, a.work / "demo", seed=s, progress=False)
        print(f"seed {s}\n{rows_table(rows)}", flush=True)
        per_seed.append(rows)
    keys = ["zeroshot_balanced_accuracy", "zeroshot_auc", "retrieval_i2t_R@5", "retrieval_t2i_R@5",
            "probe_8shot_balanced_accuracy"]
    summary = []
    for j, name in enumerate(r["model"] for r in per_seed[0]):
        row = {"model": name}
        for k in keys:
            v = [rows[j][k] for rows in per_seed if rows[j][k] is not None]
            row[k] = [float(np.mean(v)), float(np.std(v))] if v else None
        summary.append(row)
    print(f"\nmean ± std over seeds {a.seeds}")
    for r in summary:
        print(f"  {r['model']:28s} " + "  ".join(f"{k} {r[k][0]:.3f} ± {r[k][1]:.3f}" for k in keys if r[k]))
    return {"seeds": a.seeds, "per_seed": per_seed, "summary": summary}


def _gpu_sampler(stop: threading.Event, samples: list) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no NVML (a CPU dry run): no busy fraction
        print(f"no GPU utilisation samples: {type(e).__name__}: {e}")
        return
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    while not stop.is_set():
        u = pynvml.nvmlDeviceGetUtilizationRates(h)
        samples.append((time.time(), u.gpu))
        time.sleep(0.05)


def cmd_gpu(a) -> dict:
    import shutil

    data = make_images(a.work / "gpu_images", a.images)
    run = a.work / "gpu_run"
    shutil.rmtree(run, ignore_errors=True)
    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=_gpu_sampler, args=(stop, samples), daemon=True)
    th.start()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "clip.cli", "-q", "train", "--captions",
           str(data), "--model", a.model, "--out", str(run), "--epochs", str(a.epochs), "--batch-size",
           str(a.batch_size), "--precision", a.precision, "--val-fraction", "0.05", "--num-workers", str(a.workers),
           "--lr", "1e-5", "--warmup", "10", "--device", a.device]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    stop.set()
    th.join()
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(p.returncode)
    m = json.loads((run / "metrics.json").read_text())
    warm = m["history"][1:] or m["history"]
    busy = [u for t, u in samples if any(h["t_start"] <= t <= h["t_end"] for h in warm)]
    ips = sum(h["pairs_per_s"] * h["train_seconds"] for h in warm) / sum(h["train_seconds"] for h in warm)
    res = {"model": a.model, "batch_size": a.batch_size, "images": a.images, "epochs": a.epochs, "workers": a.workers,
           "images_per_s": round(ips, 1), "gpu_busy_fraction": round(sum(busy) / max(len(busy), 1) / 100, 3),
           "n_samples": len(busy), "wall_s": round(time.time() - t0, 1),
           "epoch_train_s": [h["train_seconds"] for h in m["history"]]}
    print(json.dumps(res))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "demo", "gpu"])
    p.add_argument("--model", default=None, help="default: pathoclip-lite (step), ViT-B-16 (gpu)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="step: bare / clip train runs, interleaved")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (step), 256 (gpu)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", help="gpu: the training precision")
    p.add_argument("--store", type=Path, default=REPO / "demo_out" / "cohort.zarr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench" / "clip")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    a.model = a.model or ("ViT-B-16" if a.what == "gpu" else "pathoclip-lite")
    a.batch_size = a.batch_size or (256 if a.what == "gpu" else 32)
    res = {"step": cmd_step, "demo": cmd_demo, "gpu": cmd_gpu}[a.what](a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
