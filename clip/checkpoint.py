"""A `clip train` RUN_DIR, and resuming into it.

    RUN_DIR/
      open_clip_config.json   model_cfg + preprocess_cfg: the folder is an open_clip model
                              (`open_clip.create_model("local-dir:RUN_DIR")`, `wsi embed --encoder pathoclip:RUN_DIR`)
      model.safetensors       the weights of the best validation epoch
      config.json             pathmil's record: model, tokenizer, transforms, settings, data fingerprint
      metrics.json            per-epoch train / validation loss and recall, the best epoch, why it stopped
      curves.png
      last/state.safetensors  the last epoch's model and optimizer tensors, with last/state.json
                              (epoch, step, history, optimizer scalars): what a resumed run continues from
      cache/<part>-<rank>.npy a locked image tower's outputs while the run trains (each rank writes its
                              share, all ranks memory-map them; removed when the run ends)

Only safetensors are read back; everything is written atomically.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from wsi.errors import RunError
from wsi.runtime import atomic_write, atomic_write_json

CONFIG, WEIGHTS, OPEN_CLIP = "config.json", "model.safetensors", "open_clip_config.json"
STATE, STATE_JSON = "last/state.safetensors", "last/state.json"


def _tensors(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_weights(path: Path, model) -> None:
    from safetensors.torch import save_file

    state = _tensors(model.state_dict())
    atomic_write(path, lambda p: save_file(state, str(p)))


def save_state(run_dir: Path, model, optimizer, scaler, meta: dict) -> None:
    """The last epoch: model and optimizer tensors in safetensors, everything else in JSON."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in _tensors(model.state_dict()).items()}
    per_param: dict[str, list[str]] = {}
    for pid, st in opt["state"].items():
        per_param[str(pid)] = []
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            per_param[str(pid)].append(k)
    meta = {**meta, "optimizer": {"param_groups": opt["param_groups"], "state_keys": per_param},
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    (run_dir / "last").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATE, lambda p: save_file(tensors, str(p)))
    atomic_write_json(run_dir / STATE_JSON, meta)  # written last: a state.json always has its tensors


def load_state(run_dir: Path, model, optimizer, scaler) -> dict | None:
    """Restore the last epoch into `model` and `optimizer`; its JSON record, or None without one."""
    from safetensors.torch import load_file

    if not (run_dir / STATE_JSON).is_file():
        return None
    meta = json.loads((run_dir / STATE_JSON).read_text())
    tensors = load_file(str(run_dir / STATE))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    o = meta.pop("optimizer")
    state = {int(pid): {k: tensors[f"opt.{pid}.{k}"] for k in keys} for pid, keys in o["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": o["param_groups"]})
    sc = meta.pop("scaler", None)
    if sc and scaler is not None:
        scaler.load_state_dict(sc)
    return meta


def check_resume(run_dir: Path, record: dict) -> bool:
    """Whether RUN_DIR holds a run to continue. A run of other settings or other data is refused (one
    line, naming what changed and the fix), as `mil train` does. A folder whose run never completed an
    epoch (it failed on the way: a wrong device, a bad batch size) holds nothing to keep: it is
    started afresh."""
    path = run_dir / CONFIG
    if not path.is_file() or not (run_dir / STATE_JSON).is_file():
        return False
    old = json.loads(path.read_text())
    changes = [f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in ("model", "pretrained", "settings")
               if old.get(k) != record.get(k)]
    if old.get("data", {}).get("fingerprint") != record["data"]["fingerprint"]:
        changes.append(f"data: {old.get('data', {}).get('source')} changed (fingerprint "
                       f"{old.get('data', {}).get('fingerprint')} -> {record['data']['fingerprint']})")
    if changes:
        raise RunError(f"{run_dir} holds a run with other settings or data ({'; '.join(changes)[:300]}); "
                       "pass another --out, or delete the folder to start over")
    return True


def write_open_clip_folder(run_dir: Path, open_clip_cfg: dict, spec, tokenizer: str) -> None:
    """open_clip_config.json, so that open_clip (and wsi embed) can rebuild the model from the folder."""
    pre = {"size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    cfg: dict[str, Any] = {"model_cfg": open_clip_cfg["model_cfg"],
                           "preprocess_cfg": {**open_clip_cfg.get("preprocess_cfg", {}), **pre},
                           "pathmil": {"tokenizer_from": tokenizer}}
    atomic_write_json(run_dir / OPEN_CLIP, cfg)


def plot_curves(history: list[dict], path: Path) -> None:
    """curves.png: training / validation loss and validation R@5 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax[0].plot(ep, [h["val"].get("loss", np.nan) for h in history], "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="contrastive loss", title="loss")
    ax[0].legend()
    for key, lab in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        ax[1].plot(ep, [h["val"].get("recall", {}).get(key, {}).get("R@5", np.nan) for h in history], "o-",
                   label=f"R@5 {lab}")
    ax[1].set(xlabel="epoch", ylabel="recall", title="validation retrieval", ylim=(0, 1.02))
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finished(out: Path, cfg) -> bool:
    """Whether the run in `out` has nothing left to do (stopped, or all epochs / steps done)."""
    try:
        meta = json.loads((out / STATE_JSON).read_text())
        json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("stopped")) or meta["epoch"] + 1 >= cfg.epochs or (
        cfg.max_steps is not None and meta["step"] >= cfg.max_steps)


def write_metrics(out: Path, history: list[dict], best: dict | None, stopped: str, cfg) -> dict:
    """metrics.json (and curves.png): per-epoch history, the best epoch, why the run stopped."""
    m = {"history": history, "best_epoch": best and best["epoch"], "best": best, "stopped": stopped,
         "settings": asdict(cfg)}
    atomic_write_json(out / "metrics.json", m)
    if history:
        plot_curves(history, out / "curves.png")
    return m
