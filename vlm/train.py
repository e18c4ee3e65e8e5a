"""`vlm train --stage caption|sft|grpo|dapo --data FILE.jsonl --model M --out RUN_DIR`: the reasoner's three
training stages on trl.

- caption / sft: trl `SFTTrainer` on conversational prompt-completion rows (prompt: `prompts.build_messages`,
  the caption stage in its caption mode, whose system prompt asks for a plain description, sft under the same
  system prompt as every later stage; completion: the caption, `prompts.sft_target`, or the last assistant
  turn of a "messages" row). The loss is on the completion only (trl's `completion_only_loss`:
  the prompt, image tokens included, is masked in the labels); this works with any chat template, while
  `assistant_only_loss` needs `{% generation %}` markers that the real Qwen2.5-VL template lacks and
  transformers >= 5.18 for images. `max_length=None`: truncation would cut image tokens (trl #5927).
- grpo: trl `GRPOTrainer` (loss_type "grpo"), rewards `rewards.make_format_reward` + `rewards.accuracy_reward`
  weighted 0.1 / 0.9 (Patho-R1; `reward_weights`), plus the optional process rewards (PathoCLIP `grounding`,
  a `judge_url` + `judge_model`): `reward_set.reward_functions` assembles them.
- dapo: `dynamic.DynamicSamplingTrainer` (GRPOTrainer + DAPO's dynamic sampling), loss_type "dapo",
  epsilon_high 0.28, `mask_truncated_completions`, beta 0, and trl's `get_soft_overlong_punishment` as a third
  reward (weight 1).

Settings come from the flags, else the model folder's `pathmil_defaults.json` (`vlm make-tiny` writes one),
else `DEFAULTS` (for real 3B/7B models). Device (`wsi.runtime.resolve_device`: under accelerate / torchrun
each process loads onto its own GPU, cuda:$LOCAL_RANK): bf16 and gradient checkpointing on a GPU; fp32, no
checkpointing and one torch thread on a CPU of <= 2 cores (measured: bf16 / checkpointing 2-4x and
two threads 4-14x slower there). LoRA (`lora=(r, alpha)`, peft) goes on the language model's linear layers
and is merged into the weights at the end, so RUN_DIR is always a plain model folder that every `--model`
accepts (safetensors, the processor, the defaults file, train_summary.json); checkpoints live in
RUN_DIR/checkpoints. A rerun on RUN_DIR (`run_state`): refused when RUN_DIR holds another stage, model, data or
settings (one line naming what differs); nothing done when it is finished; else it resumes from the last
checkpoint: LoRA runs load the model, then the checkpoint's adapter; full runs the checkpoint's safetensors;
the optimizer, scheduler and RNG state through transformers' torch.load(weights_only=True), which refuses a
pickle that would run code (a VlmError naming the checkpoint). A folder with no checkpoint starts afresh.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from wsi.runtime import atomic_write_json, dist_info, resolve_device

from .prompts import SYSTEM_PROMPT, VlmError, build_messages, sft_target
from .run_state import RUN_FILE, SUMMARY_FILE, plan_run, run_identity, start_model

log = logging.getLogger(__name__)

STAGES = ("caption", "sft", "grpo", "dapo")
# For real checkpoints (Qwen2.5-VL-3B/7B, Patho-R1): PathVLM-R1 / Patho-R1 scale settings.
DEFAULTS: dict[str, dict[str, Any]] = {
    "caption": {"lr": 2e-5, "batch_size": 4, "epochs": 1},
    "sft": {"lr": 1e-5, "batch_size": 4, "epochs": 1},
    "grpo": {"lr": 1e-6, "batch_size": 8, "num_generations": 4, "max_completion_length": 1024, "beta": 0.04,
             "temperature": 1.0, "epochs": 1},
    "dapo": {"lr": 1e-6, "batch_size": 8, "num_generations": 4, "max_completion_length": 1024, "beta": 0.0,
             "temperature": 1.0, "epochs": 1},
}
COMMON = {"grad_accum": 1, "max_steps": -1, "seed": 0, "lora": None, "freeze_vision": False,
          "reward_weights": (0.1, 0.9), "save_steps": 50, "max_tries": 4, "filter_on": "accuracy",
          "grounding": None, "judge_url": None, "judge_model": None, "judge_key_env": "OPENAI_API_KEY",
          "judge_timeout": 30.0, "judge_text_only": False, "vllm": None}
VLLM_MODES = ("colocate", "server")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def resolve_settings(stage: str, model: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings: `overrides` (flags; None = not given) over the model folder's
    pathmil_defaults.json for `stage` over `DEFAULTS[stage]` and `COMMON`."""
    from .tiny import read_defaults

    if stage not in STAGES:
        raise VlmError(f"--stage {stage!r}: give one of {', '.join(STAGES)}")
    settings = {"epochs": 1, **COMMON, **DEFAULTS[stage]}
    folder = Path(model).expanduser()
    carried = read_defaults(folder).get(stage, {}) if folder.is_dir() else {}
    settings.update({k: v for k, v in carried.items() if k in settings or k in ("beta", "temperature")})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if float(settings["epochs"]) <= 0:
        raise VlmError(f"--epochs {settings['epochs']}: give a number > 0")
    for key in ("batch_size", "grad_accum"):
        if int(settings[key]) < 1:
            raise VlmError(f"--{key.replace('_', '-')} {settings[key]}: give a number >= 1")
    if float(settings["lr"]) <= 0:
        raise VlmError(f"--lr {settings['lr']}: give a learning rate > 0")
    if stage in ("grpo", "dapo"):
        G = int(settings["num_generations"])
        if G < 2 or int(settings["batch_size"]) % G:
            raise VlmError(f"--batch-size {settings['batch_size']} (completions per step) must be a multiple of "
                           f"--num-generations {G} (>= 2)")
        from .reward_set import reward_names

        reward_names(settings)          # checked before any model is loaded
        if settings["vllm"]:
            import importlib.util

            if settings["vllm"] not in VLLM_MODES:
                raise VlmError(f"--vllm {settings['vllm']!r}: give one of {', '.join(VLLM_MODES)}")
            if importlib.util.find_spec("vllm") is None:
                raise VlmError(f"--vllm {settings['vllm']}: vllm is not installed; `pip install vllm` (GPU) or drop "
                               "the flag (generation then runs in transformers)")
    return settings


def _bar_not_lines(trainer: Any, progress: bool) -> None:
    """transformers prints every step's log dict (a line per step, with or without the bar): show the loss /
    reward on the progress bar instead, and nothing when `progress` is off. The logs stay in the summary."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class MetricsOnBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                keys = ("loss", "reward", "dynamic_sampling/dropped_groups")
                shown = {k.split("/")[-1]: f"{logs[k]:.3g}" for k in keys if isinstance(logs.get(k), (int, float))}
                self.training_bar.set_postfix(shown, refresh=False)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(MetricsOnBar())


def _refuse_zero3(trainer: Any) -> None:
    ds = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if ds is not None and getattr(ds, "zero_stage", 0) == 3:
        raise VlmError("DeepSpeed ZeRO-3 shards the weights, and RUN_DIR is written whole from one process; use "
                       "ZeRO-2 (vlm/configs/accelerate/deepspeed_zero2.yaml) or plain multi-GPU")


def _save_run(trainer: Any, processor: Any, model: str | Path, out: Path, s: Mapping[str, Any]) -> dict[str, Any]:
    """Write RUN_DIR from the main process (accelerate / torchrun start one process per GPU): the weights
    (LoRA merged in: every rank holds full weights under DDP and ZeRO-2), the processor, the model folder's
    defaults. Returns {"processes": world size}."""
    from .tiny import DEFAULTS_FILE

    acc = trainer.accelerator
    acc.wait_for_everyone()
    final = acc.unwrap_model(trainer.model)
    if s.get("lora"):
        final = final.merge_and_unload()       # RUN_DIR holds plain weights: every --model reads them
    final.eval()
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        final.save_pretrained(out)
        processor.save_pretrained(out)
        if getattr(processor, "image_processor", None) is not None:
            processor.image_processor.save_pretrained(out)
        src = Path(model).expanduser()
        if (src / DEFAULTS_FILE).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / DEFAULTS_FILE, out / DEFAULTS_FILE)   # the next stage reads the same defaults
    acc.wait_for_everyone()
    return {"processes": acc.num_processes}


def parse_lora(text: str | None) -> tuple[int, int] | None:
    """`--lora 16,32` -> (r, alpha); None or "" -> None (full fine-tuning)."""
    if not text:
        return None
    try:
        r, alpha = (int(x) for x in str(text).split(","))
    except ValueError:
        r = alpha = 0
    if r < 1 or alpha < 1:
        raise VlmError(f"--lora {text!r}: give the rank and alpha as two positive integers, e.g. 16,32")
    return r, alpha


def setup_device(device: str = "auto") -> dict[str, Any]:
    """Precision, checkpointing and threads for `device` (`wsi.runtime.resolve_device`: this process's GPU
    under torchrun): {"device", "bf16", "gradient_checkpointing", "threads"}. On a CPU of <= 2 cores torch
    gets one thread (set here, for the run)."""
    import torch

    dev = str(resolve_device(device))
    gpu = dev.startswith("cuda")
    threads = torch.get_num_threads()
    if not gpu and (os.cpu_count() or 1) <= 2:
        threads = 1
        torch.set_num_threads(1)
    return {"device": dev, "bf16": bool(gpu and torch.cuda.is_bf16_supported()), "gradient_checkpointing": gpu,
            "threads": threads}


# ---- rows -> trl datasets -------------------------------------------------------------------------------
def _with_system(messages: Sequence[Mapping[str, Any]], n_images: int, system: str | None) -> list[dict]:
    """A "messages" row's prompt turns in trl's structured form: the system prompt first (added when the row
    has none), and `n_images` {"type": "image"} entries at the start of the first user turn when the row
    does not place them itself."""
    out = []
    for m in messages:
        c = m["content"]
        out.append({"role": m["role"], "content": [{"type": "text", "text": c}] if isinstance(c, str) else list(c)})
    placed = sum(1 for m in out for c in m["content"] if c.get("type") == "image")
    if placed == 0 and n_images:
        first = next(m for m in out if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in range(n_images)] + first["content"]
    elif placed != n_images:
        raise VlmError(f"a messages row places {placed} images but lists {n_images}; give one image entry per image")
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return out


def example(row: Mapping[str, Any], stage: str, system: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """One training example (no images loaded yet): {"prompt", "completion"} for caption/sft, {"prompt",
    "answer", "options"} for grpo/dapo; prompts from `prompts.build_messages` (or a messages row's turns)."""
    n = len(row.get("images") or [])
    if stage == "caption":
        target = row["caption"]
        prompt = build_messages({}, n, system, mode="caption")
    elif stage == "sft" and "messages" in row:
        prompt, last = _with_system(row["messages"][:-1], n, system), row["messages"][-1]["content"]
        target = last if isinstance(last, str) else "".join(c.get("text", "") for c in last)
    elif stage == "sft":
        prompt, target = build_messages(row, n, system), sft_target(row)
    else:
        # question: the judge reward reads it (trl passes every column to the reward functions)
        return {"prompt": build_messages(row, n, system), "answer": str(row["answer"]),
                "options": list(row["options"]) if row.get("options") else None, "question": str(row["question"])}
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": [{"type": "text", "text": target}]}]}


def build_dataset(rows: Sequence[Mapping[str, Any]], stage: str, base: str | Path | None = None,
                  system: str | None = SYSTEM_PROMPT):
    """A `datasets.Dataset` of the rows (one JSON column) whose items are made on access by `example`, with
    the images read then (`data.load_images`): a large corpus is never held in memory as pixels."""
    from datasets import Dataset

    from .data import load_images

    stage_kind = "grpo" if stage == "dapo" else stage
    ds = Dataset.from_dict({"row": [json.dumps(dict(r)) for r in rows]})

    def transform(batch: dict[str, list]) -> dict[str, list]:
        items = [json.loads(r) for r in batch["row"]]
        made = [example(r, stage_kind, system) for r in items]
        out = {k: [m[k] for m in made] for k in made[0]}
        out["images"] = [load_images(r.get("images") or [], base) for r in items]
        return out

    return ds.with_transform(transform)


# ---- training ---------------------------------------------------------------------------------------------
def _prepare_model(net: Any, settings: Mapping[str, Any]) -> Any:
    lora = settings.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        r, alpha = lora
        # adapters on the language model only: the vision tower stays frozen (as --freeze-vision)
        return get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    if settings.get("freeze_vision"):
        visual = getattr(getattr(net, "model", net), "visual", None) or getattr(net, "visual", None)
        if visual is None:
            raise VlmError("--freeze-vision: this model has no `visual` tower; drop the flag")
        for p in visual.parameters():
            p.requires_grad_(False)
    return net


def _checkpointing_field() -> str:
    """transformers >= 5.2x renamed TrainingArguments.gradient_checkpointing (kept as a warning alias)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def train(stage: str, data: str | Path, model: str | Path, out: str | Path, *, epochs: int | None = None,
          max_steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
          grad_accum: int | None = None, num_generations: int | None = None,
          max_completion_length: int | None = None, temperature: float | None = None, beta: float | None = None,
          lora: tuple[int, int] | None = None, freeze_vision: bool | None = None, seed: int | None = None,
          reward_weights: Sequence[float] | None = None, save_steps: int | None = None,
          max_tries: int | None = None, filter_on: str | None = None, grounding: str | Path | None = None,
          judge_url: str | None = None,
          judge_model: str | None = None, judge_key_env: str | None = None, judge_timeout: float | None = None,
          judge_text_only: bool | None = None, vllm: str | None = None, system: str | None = SYSTEM_PROMPT,
          device: str = "auto", progress: bool = True, data_root: str | Path | None = None,
          allow_remote: bool = False) -> dict[str, Any]:
    """Train one stage on a JSONL file (`data.read_jsonl(data, stage)`, its image paths under `data_root`,
    URLs only with `allow_remote`) from `model` (a folder or hub id)
    and write RUN_DIR `out` (module docstring). Returns the summary also written to out/train_summary.json:
    stage, settings, device, rows, steps, seconds, log (trl's log history: loss per step for caption/sft,
    reward, rewards/<func>/mean, dynamic_sampling/* for grpo/dapo). A finished RUN_DIR is left as it is:
    its summary is returned with "already_finished": True."""
    import torch
    from transformers import set_seed

    from .data import read_jsonl

    overrides = dict(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                     num_generations=num_generations, max_completion_length=max_completion_length,
                     temperature=temperature, beta=beta, lora=lora, freeze_vision=freeze_vision, seed=seed,
                     reward_weights=tuple(reward_weights) if reward_weights is not None else None,
                     save_steps=save_steps, max_tries=max_tries, filter_on=filter_on,
                     grounding=str(grounding) if grounding is not None else None, judge_url=judge_url,
                     judge_model=judge_model, judge_key_env=judge_key_env, judge_timeout=judge_timeout,
                     judge_text_only=judge_text_only, vllm=vllm)
    s = resolve_settings(stage, model, overrides)
    out = Path(out)
    if out.is_file():
        raise VlmError(f"{out}: is a file; give a folder for the run")
    ckpt_dir = out / "checkpoints"
    rows = read_jsonl(data, stage, data_root=data_root, allow_remote=allow_remote)
    identity = run_identity(stage, model, data, s, system)
    plan = plan_run(out, identity, s)
    if plan.action == "finished":
        log.info("%s: finished (%s steps); nothing changed", out, plan.summary.get("steps"))
        return {**plan.summary, "already_finished": True}
    resume = plan.checkpoint
    dev = setup_device(device)
    if plan.action == "fresh" and dist_info()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, identity)      # what a rerun is checked against
    set_seed(int(s["seed"]))
    net, processor, adapter = start_model(model, resume, dev["device"])
    net.train()
    if not adapter:
        net = _prepare_model(net, s)
    dataset = build_dataset(rows.rows, stage, Path(data).parent, system)
    common = dict(output_dir=str(ckpt_dir), learning_rate=float(s["lr"]),
                  per_device_train_batch_size=int(s["batch_size"]),
                  gradient_accumulation_steps=int(s["grad_accum"]), num_train_epochs=float(s["epochs"]),
                  max_steps=int(s["max_steps"]), seed=int(s["seed"]), logging_steps=1, report_to="none",
                  save_strategy="steps", save_steps=int(s["save_steps"]), save_total_limit=1,
                  bf16=dev["bf16"], fp16=False, use_cpu=dev["device"] == "cpu",
                  remove_unused_columns=False,
                  dataloader_num_workers=0, disable_tqdm=not progress, lr_scheduler_type="constant",
                  warmup_steps=0)
    common[_checkpointing_field()] = dev["gradient_checkpointing"]
    t0 = time.perf_counter()
    if stage in ("caption", "sft"):
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=None, completion_only_loss=True, assistant_only_loss=False)
        trainer = SFTTrainer(model=net, args=args, train_dataset=dataset, processing_class=processor)
    else:
        trainer = _grpo_trainer(stage, net, processor, dataset, s, common, system, dev["device"], rows.rows)
    _refuse_zero3(trainer)
    _bar_not_lines(trainer, progress)
    try:
        if plan.action == "complete":        # the checkpoint holds the last step: only RUN_DIR is left to write
            from transformers import TrainerState

            trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=resume)
    except pickle.UnpicklingError as exc:
        # transformers reads the optimizer / scheduler / RNG state with torch.load(weights_only=True): a file
        # that holds more than tensors and plain containers is refused, never run
        why = str(exc).splitlines()[0]
        raise VlmError(f"{resume}: a checkpoint file holds more than tensors and was not read ({why}); "
                       f"delete {resume} to resume from an earlier checkpoint or start over") from exc
    seconds = time.perf_counter() - t0
    from .reward_set import recorded_settings

    summary = _save_run(trainer, processor, model, out, s)
    summary.update({"stage": stage, "model": str(model), "data": str(data), "system": system, "rows": len(rows),
                    "dropped_lines": [list(d) for d in rows.dropped],
                    "settings": recorded_settings(s),
                    "device": dev, "resumed_from": resume, "steps": int(trainer.state.global_step),
                    "seconds": round(seconds, 2), "torch": torch.__version__, "log": trainer.state.log_history})
    if trainer.is_world_process_zero():
        atomic_write_json(out / SUMMARY_FILE, summary)
    log.info("%s: %d steps in %.1f s; model folder %s", stage, summary["steps"], seconds, out)
    return summary


def _grpo_trainer(stage: str, net: Any, processor: Any, dataset: Any, s: Mapping[str, Any],
                  common: Mapping[str, Any], system: str | None, device: str,
                  rows: Sequence[Mapping[str, Any]] | None = None):
    from trl import GRPOConfig, GRPOTrainer

    from .reward_set import reward_functions

    funcs, weights = reward_functions(stage, processor, s, system, device, rows)
    kw = dict(num_generations=int(s["num_generations"]), max_completion_length=int(s["max_completion_length"]),
              temperature=float(s["temperature"]), beta=float(s["beta"]), reward_weights=weights,
              top_k=0, top_p=1.0, log_completions=False)
    if s.get("vllm"):
        # trl's vLLM generation (colocate: in this process, sharing the GPU; server: `trl vllm-serve`)
        kw.update(use_vllm=True, vllm_mode=s["vllm"])
    if stage == "dapo":
        from .dynamic import DynamicSamplingTrainer

        args = GRPOConfig(**common, **kw, loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True)
        return DynamicSamplingTrainer(model=net, args=args, train_dataset=dataset, processing_class=processor,
                                      reward_funcs=funcs, max_tries=int(s["max_tries"]), filter_on=s["filter_on"])
    args = GRPOConfig(**common, **kw, loss_type="grpo")
    return GRPOTrainer(model=net, args=args, train_dataset=dataset, processing_class=processor, reward_funcs=funcs)


__all__ = ["STAGES", "DEFAULTS", "resolve_settings", "parse_lora", "setup_device", "example",
           "build_dataset", "train"]
