"""`ClipTrainConfig`: every `clip train` setting with its default, written once (the CLI's options are
made from it). A default of None means "the model's own": pathmil's configs carry training defaults on
their registry entry (`EncoderSpec.train`, e.g. pathoclip-lite trains locked-image at lr 2e-3); other
models (ViT-B-16, QuiltNet, ...) take `FINETUNE`, open_clip's fine-tuning practice."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from wsi.errors import RunError

# open_clip fine-tuning practice for pretrained CLIPs (lr 1e-5, wd 0.2, warm-up, AdamW betas 0.9/0.98)
FINETUNE = {"lock_image": False, "epochs": 10, "batch_size": 128, "lr": 1e-5, "wd": 0.2, "warmup": 500,
            "patience": 3}


@dataclass(frozen=True)
class ClipTrainConfig:
    model: str = field(default="pathoclip-lite", metadata={
        "help": "a registry name ({clip_models}), an open_clip architecture (ViT-B-16 = Patho-CLIP-B, ViT-L-14 = "
                "Patho-CLIP-L) or a clip train RUN_DIR to continue from"})
    pretrained: str | None = field(default=None, metadata={
        "help": "weights to start from: an open_clip tag (openai: needs the hub), hf-hub:<repo>, or a local "
                ".safetensors / .pt / .bin state dict (read with weights_only=True)"})
    epochs: int | None = field(default=None, metadata={"help": "passes over the training pairs (default: the model's)"})
    batch_size: int | None = field(default=None, metadata={"help": "pairs per step and process (default: the model's)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate of AdamW (default: the model's)"})
    wd: float | None = field(default=None, metadata={"help": "AdamW weight decay; gains, biases and the temperature "
                                                             "get none (default: the model's)"})
    warmup: int | None = field(default=None, metadata={"help": "linear warm-up steps before the cosine decay"})
    loss: Literal["clip", "siglip"] = field(default="clip", metadata={
        "help": "clip: open_clip's ClipLoss (InfoNCE both ways); siglip: SigLipLoss (pairwise sigmoid)"})
    lock_image: bool | None = field(default=None, metadata={
        "help": "freeze the image tower (LiT); pathoclip-lite's default. A frozen tower's outputs are computed "
                "once and reused every epoch"})
    lock_text: bool = field(default=False, metadata={"help": "freeze the text tower"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step, as open_clip's accum_freq: the micro-batches' features are "
                "cached, so every pair's negatives span the whole accumulated batch"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass "
                                                                      "(less GPU memory, slower)"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "auto: the model's own (bf16 for most) on a GPU, fp32 on CPU"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of slides (never tiles of one slide on both sides) held out for validation"})
    patience: int | None = field(default=None, metadata={
        "help": "stop after this many epochs without a better validation loss (default: the model's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the shuffling and the augmentations"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (cuda:$LOCAL_RANK under torchrun)"})
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: 0 on CPU, 8 on a GPU)"})

    def __post_init__(self):
        """Settings no run can use are refused before anything is written (one line naming the option)."""
        for name in ("epochs", "batch_size", "patience", "grad_accum", "max_steps"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, v, "at least 1")
        for name in ("lr", "wd"):
            v = getattr(self, name)
            _check(v is None or (v >= 0 and math.isfinite(v)), name, v, "0 or more")
        _check(self.warmup is None or self.warmup >= 0, "warmup", self.warmup, "0 or more")
        _check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        _check(self.num_workers is None or self.num_workers >= 0, "num_workers", self.num_workers, "0 or more")

    def resolved(self, model_defaults: dict | None) -> "ClipTrainConfig":
        """A copy with every None default filled from the model's training defaults (or FINETUNE)."""
        base = {**FINETUNE, **(model_defaults or {})}
        vals = asdict(self)
        for k in ("epochs", "batch_size", "lr", "wd", "warmup", "lock_image", "patience"):
            if vals[k] is None:
                vals[k] = base[k]
        return ClipTrainConfig(**vals)

    # the settings a resumed run must share with the run it continues: where it runs (device, workers,
    # precision) is not part of a run's identity and may change between tries
    def settings(self) -> dict:
        skip = {"device", "num_workers", "precision"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def _check(ok: bool, option: str, value, what: str) -> None:
    if not ok:
        raise RunError(f"--{option.replace('_', '-')} {value!r}: must be {what}")
