"""A run folder's model files: `config.json` (how to rebuild the models, the settings, the data it
was trained on) and `fold_<k>/model.safetensors`; and whether a folder may be resumed.

Only safetensors are ever read: nothing in a run folder is unpickled. Files are written atomically
(a reader, or a resumed run, sees the old file or the new one, never half of one).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from wsi.errors import RunError
from wsi.runtime import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
REQUIRED = ("model", "in_dim", "n_classes")
_FOLD_RE = re.compile(r"^fold_(\d+)$")


def save_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write RUN_DIR/config.json (indent 2) atomically; returns its path."""
    path = Path(run_dir) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")
    return path


def save_fold_model(run_dir: str | Path, fold: int, model) -> Path:
    """Write one fold's weights as RUN_DIR/fold_<k>/model.safetensors (atomically); returns its path."""
    from safetensors.torch import save_file

    path = Path(run_dir) / f"fold_{int(fold)}" / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous and shared-memory tensors: save independent CPU copies.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={"model": getattr(model, "name", "")}))
    return path


_SETTINGS = ("model", "model_kwargs", "in_dim", "class_names", "encoder", "w2s_params", "folds", "seed", "train",
             "instance_labels")
# Where a run computes, not what: a run may resume on another device or precision (a fold is the unit
# of work; each fold is trained whole under one of them). The feeding settings (workers, cache size,
# DataConfig) are not in config.json at all.
WHERE_TO_RUN = ("device", "precision")


def _data_changes(old: dict, new: dict) -> list[str]:
    """What differs between the data a run was trained on and the data given now, in words."""
    out = []
    if old.get("labels_csv") != new.get("labels_csv"):
        out.append(f"labels CSV was {old.get('labels_csv')}, now {new.get('labels_csv')}")
    elif old.get("labels_sha256") != new.get("labels_sha256"):
        out.append(f"labels CSV {new.get('labels_csv')} changed since the run began")
    of, nf = old.get("features") or {}, new.get("features") or {}
    where = lambda f: f"{f.get('kind')} {f.get('path')} (encoder {f.get('encoder')!r})"  # noqa: E731
    if any(of.get(k) != nf.get(k) for k in ("kind", "path", "encoder")):
        out.append(f"features were from {where(of)}, now from {where(nf)}")
    elif of.get("slides") != nf.get("slides"):
        out.append(f"{of.get('slides')} slides had features then, {nf.get('slides')} now in {where(nf)}")
    elif of.get("sha256") != nf.get("sha256"):
        out.append(f"the features, coords or labels of some slides in {where(nf)} changed (re-embedded, "
                   "re-tiled or relabelled)")
    return out


def _setting_defaults(key: str) -> dict:
    import dataclasses

    from .config import TrainConfig, W2SConfig

    cls = W2SConfig if key == "w2s_params" else TrainConfig
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def check_resume(out: Path, old: dict, new: dict) -> None:
    """A folder holding a run may only be resumed with the same settings and the same data; where it
    runs (`WHERE_TO_RUN`) may change."""
    changed = []
    for key in _SETTINGS:
        o, n = old.get(key), new.get(key)
        if o != n and isinstance(o, dict) and isinstance(n, dict) and key in ("train", "w2s_params"):
            prefix = "w2s." if key == "w2s_params" else ""   # name the settings themselves: epochs, w2s.warmup
            # a setting added since the run began (absent from its config) counts as its default
            defaults = _setting_defaults(key)
            where = WHERE_TO_RUN if key == "train" else ()
            changed += [prefix + k for k in sorted(set(o) | set(n))
                        if k not in where and o.get(k, defaults.get(k)) != n.get(k, defaults.get(k))]
        elif o != n:
            changed.append(key)
    if changed:
        raise RunError(f"{out}: holds a run with other settings ({', '.join(changed)} differ); choose a new --out, "
                       "or delete the folder to start again")
    if "data" not in old:
        log.warning("%s: a run from an earlier pathmil, which did not record its data; resuming without checking "
                    "that the labels and features are the same", out)
        return
    what = _data_changes(old["data"], new["data"])
    if what:
        raise RunError(f"{out}: holds a run trained on other data ({'; '.join(what)}); its folds would mix the "
                       "two: choose a new --out, or delete the folder to start again")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.json, checked for the keys needed to rebuild the models."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        why = "no such folder" if not Path(run_dir).exists() else f"no {CONFIG}"
        raise RunError(f"{run_dir}: not a mil run ({why}); train one with `mil train ... --out {run_dir}`")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e}); re-run `mil train` to write it again") from None
    missing = [k for k in REQUIRED if not isinstance(config, dict) or k not in config]
    if missing:
        raise RunError(f"{path}: lacks {', '.join(missing)}; it was not written by `mil train`")
    return config


def _fold_feedback(run_dir: Path, fold: int) -> bool:
    """Whether a --w2s fold predicts with the student's filtering: yes, unless its result.json says
    training turned the feedback off (the back-off of mil/train.py)."""
    path = run_dir / f"fold_{fold}" / "result.json"
    try:
        info = json.loads(path.read_text()).get("w2s") or {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True
    return bool(info.get("feedback", True))


def read_run_config(path: Path) -> dict[str, Any]:
    """The config.json found in a `--out` folder, which must be a mil run's (nothing else is overwritten)."""
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e}); choose a new --out, or delete the folder") from None
    if not isinstance(old, dict) or any(k not in old for k in REQUIRED):
        raise RunError(f"{path}: not the config of a mil run; choose a new --out")
    return old


def finished_folds(run_dir: str | Path) -> list[int]:
    """The folds of a run that were trained to the end (weights and result.json), in order."""
    return [k for k in run_folds(run_dir) if (Path(run_dir) / f"fold_{k}" / "result.json").is_file()]


def run_folds(run_dir: str | Path) -> list[int]:
    """The folds of a run that have weights, in order."""
    return sorted(int(m.group(1)) for p in Path(run_dir).glob(f"fold_*/{WEIGHTS}")
                  if (m := _FOLD_RE.match(p.parent.name)))


def load_run(run_dir: str | Path, *, device: str = "cpu",
             folds: list[int] | None = None) -> tuple[dict[str, Any], list]:
    """(config, [one DualMIL per fold, in eval mode on `device`]); `folds` None = every fold with weights.

    A run trained with --w2s keeps filtering the instances its student rejects out of the bag
    branch, as it did in training (unless the fold's result.json says training turned it off)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    available = run_folds(run_dir)
    wanted = list(folds) if folds is not None else available
    missing = [k for k in wanted if k not in available]
    if not wanted or missing:
        which = ", ".join(str(run_dir / f"fold_{k}" / WEIGHTS) for k in missing) if missing else f"fold_*/{WEIGHTS}"
        raise RunError(f"{run_dir}: no weights at {which} (have folds {available or 'none'}); the run is "
                       "incomplete: re-run the same `mil train` command to finish it")
    models = []
    for k in wanted:
        try:
            model = create_model(config["model"], int(config["in_dim"]), int(config["n_classes"]),
                                 **config.get("model_kwargs", {}))
        except ValueError as e:  # unknown model or option: a run from another pathmil version
            raise RunError(f"{run_dir / CONFIG}: {e}; is this run from another pathmil version?") from None
        path = run_dir / f"fold_{k}" / WEIGHTS
        try:
            state = load_file(str(path), device="cpu")
            model.load_state_dict(state, strict=True)
        except (SafetensorError, OSError) as e:
            raise RunError(f"{path}: unreadable weights ({e}); re-train this fold (delete fold_{k}/ and "
                           "re-run `mil train`)") from None
        except RuntimeError as e:  # strict load: names or shapes differ from what config.json describes
            first = str(e).strip().splitlines()[:3]
            raise RunError(f"{path}: weights do not fit the model described in {CONFIG} "
                           f"({' '.join(first)[:300]})") from None
        if config.get("w2s") and _fold_feedback(run_dir, k):
            w = config.get("w2s_params") or {}
            model.reject_below, model.min_keep = w.get("reject_below", 0.1), w.get("min_keep", 8)
        models.append(model.to(device).eval())
    return config, models
