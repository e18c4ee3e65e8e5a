"""A run folder's model files: `config.json` (how to rebuild the models) and `fold_<k>/model.safetensors`.

Only safetensors are ever read: nothing in a run folder is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class RunError(ValueError):
    """A run folder that is missing, incomplete or of another kind; the message says what to do."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write RUN_DIR/config.json atomically."""
    path = Path(run_dir) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: p.write_text(json.dumps(config, indent=2)))
    return path


def save_fold_model(run_dir: str | Path, fold: int, model) -> Path:
    """Write one fold's weights as RUN_DIR/fold_<k>/model.safetensors (atomically)."""
    from safetensors.torch import save_file

    path = Path(run_dir) / f"fold_{fold}" / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda p: save_file(state, str(p), metadata={"model": getattr(model, "name", "")}))
    return path


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunError(f"{run_dir}: not a mil run (no {CONFIG}); train one with `mil train ... --out {run_dir}`")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, *, device: str = "cpu", folds: list[int] | None = None):
    """(config, [one DualMIL per fold, in eval mode]). A run trained with --w2s keeps filtering the
    instances its student rejects out of the bag branch, as in training."""
    from safetensors.torch import load_file

    from .models import create_model

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    available = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob(f"fold_*/{WEIGHTS}"))
    wanted = folds if folds is not None else available
    missing = [k for k in wanted if k not in available]
    if not wanted or missing:
        raise RunError(f"{run_dir}: no weights for fold(s) {missing or 'any'}; the run is incomplete: "
                       f"re-run the same `mil train` command to finish it")
    models = []
    for k in wanted:
        model = create_model(config["model"], config["in_dim"], config["n_classes"], **config.get("model_kwargs", {}))
        model.load_state_dict(load_file(str(run_dir / f"fold_{k}" / WEIGHTS), device="cpu"), strict=True)
        if config.get("w2s"):
            w = config.get("w2s_params", {})
            model.reject_below, model.min_keep = w.get("reject_below", 0.1), w.get("min_keep", 8)
        models.append(model.to(device).eval())
    return config, models
