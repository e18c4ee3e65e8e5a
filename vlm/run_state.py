"""What a `vlm train` rerun does with an existing RUN_DIR: its identity, resume, and the weights to start from.

RUN_DIR/run.json records what the weights are trained from and with: the stage, the base model, the data (its
SHA-256), the system prompt and every setting that changes what is learned. How long to train (--max-steps,
--epochs), how often to checkpoint, and where to run (the device and the precision it implies, --vllm, the
judge's timeout and key variable, the number of processes) are not part of it.

A rerun on RUN_DIR (`plan_run`):
- no checkpoint and no finished run (a new folder, or a run that failed before its first checkpoint, e.g. on
  a device that is not there): started afresh, whatever the earlier attempt's settings were;
- another stage, model, data or setting: refused, one line naming what differs;
- finished (train_summary.json) and --max-steps / --epochs reached: nothing is trained or written;
- a checkpoint already at --max-steps (the run stopped while writing RUN_DIR): RUN_DIR is written from it,
  with no step trained (transformers' Trainer, resumed there mid-epoch, would train one step more);
- else: resumed from the last checkpoint (a longer --max-steps or more --epochs continue a finished run);
  with no checkpoint left, made again from the start.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .prompts import VlmError

RUN_FILE = "run.json"
SUMMARY_FILE = "train_summary.json"
# how long, how often to save, and where to run: a rerun may change them
NOT_IDENTITY = ("max_steps", "epochs", "save_steps", "vllm", "judge_timeout", "judge_key_env")


@dataclass
class RunPlan:
    """What `train` does: action "fresh" | "resume" | "complete" | "finished"; `checkpoint` to resume or
    complete from; `summary`: the finished run's train_summary.json."""
    action: str
    checkpoint: str | None = None
    summary: dict | None = None


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(stage: str, model: str | Path, data: str | Path, settings: Mapping[str, Any],
                 system: str | None) -> dict[str, Any]:
    """The record of run.json (module docstring), in JSON types; the judge URL as a digest, as in every run file."""
    from .reward_set import recorded_settings

    folder = Path(model).expanduser()
    record = {"stage": stage, "model": str(folder.resolve()) if folder.is_dir() else str(model),
              "data": {"file": str(Path(data).expanduser().resolve()), "sha256": file_digest(data)},
              "system": system,
              "settings": {k: v for k, v in recorded_settings(settings).items() if k not in NOT_IDENTITY}}
    return json.loads(json.dumps(record))            # tuples as lists: compared with what was read back


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest `checkpoint-N` folder under `folder` (transformers' own lookup), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer steps a checkpoint holds (its trainer_state.json)."""
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.is_file() else 0


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two run records, one short phrase each ("lr: 0.001 -> 0.002")."""
    out = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in ("stage", "model", "system") if old.get(k) != new.get(k)]
    od, nd = old.get("data") or {}, new.get("data") or {}
    if od.get("sha256") != nd.get("sha256"):
        out.append(f"data: {od.get('file')} (sha256 {str(od.get('sha256'))[:12]}) -> {nd.get('file')} "
                   f"(sha256 {str(nd.get('sha256'))[:12]})")
    os_, ns = old.get("settings") or {}, new.get("settings") or {}
    out += [f"--{k.replace('_', '-')}: {os_.get(k)!r} -> {ns.get(k)!r}" for k in sorted(set(os_) | set(ns))
            if os_.get(k) != ns.get(k)]
    return out


def _reached(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Whether a finished run already did what `settings` ask for (its --max-steps, else its --epochs)."""
    done, want = int(summary.get("steps", 0)), int(settings["max_steps"])
    if want > 0:
        return done >= want
    old = summary.get("settings") or {}
    return int(old.get("max_steps", -1)) <= 0 and float(settings["epochs"]) <= float(old.get("epochs", 0))


def plan_run(out: Path, identity: Mapping[str, Any], settings: Mapping[str, Any]) -> RunPlan:
    """What a run with `identity` and `settings` does with RUN_DIR `out` (module docstring); VlmError when
    `out` holds another run."""
    ckpt = last_checkpoint(out / "checkpoints")
    summary_path = out / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if ckpt is None and summary is None:
        return RunPlan("fresh")
    record_path = out / RUN_FILE
    if not record_path.is_file():
        raise VlmError(f"{out} holds a training run with no {RUN_FILE} (its settings cannot be checked); pass "
                       "another --out, or delete the folder to start over")
    recorded = json.loads(record_path.read_text())
    changed = differences(recorded, identity)
    if changed:
        raise VlmError(f"{out} holds a {recorded.get('stage')} run with other settings or data "
                       f"({'; '.join(changed)[:400]}); pass another --out, or delete the folder to start over")
    if summary is not None and _reached(summary, settings):
        return RunPlan("finished", ckpt, summary)
    if ckpt is None:                  # its checkpoints deleted: the run is made again, from the start
        return RunPlan("fresh")
    if int(settings["max_steps"]) > 0 and checkpoint_step(ckpt) >= int(settings["max_steps"]):
        return RunPlan("complete", ckpt, summary)
    return RunPlan("resume", ckpt, summary)


def start_model(model: str | Path, checkpoint: str | None, device: str) -> tuple[Any, Any, bool]:
    """(model, processor, adapter_loaded): the weights a run starts from. No checkpoint: `model`. A LoRA
    checkpoint (trl saves the adapter, not the model): `model`, then the adapter on it, trainable (peft's
    `PeftModel.from_pretrained`). A full checkpoint: its weights through from_pretrained, which converts
    Qwen2.5-VL's saved key layout (transformers 5's Trainer reads checkpoint safetensors without that
    conversion: it would load nothing and only warn); the Trainer then restores optimizer, scheduler, step."""
    from .model import load_model

    net, processor = load_model(model, device=device)
    if checkpoint is None:
        return net, processor, False
    if (Path(checkpoint) / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(net, checkpoint, is_trainable=True), processor, True
    return load_model(checkpoint, device=device)[0], processor, False


__all__ = ["RUN_FILE", "SUMMARY_FILE", "NOT_IDENTITY", "RunPlan", "file_digest", "run_identity", "last_checkpoint",
           "checkpoint_step", "differences", "plan_run", "start_model"]
