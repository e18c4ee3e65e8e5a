"""The settings of a MIL run, `TrainConfig` and its weak-to-strong knobs `W2SConfig`, and how its
bags are fed (`DataConfig`: feature cache, DataLoader workers), which changes no result.

The `mil train` options are made from these fields (help texts in their metadata), so each default
is written here only. This module imports neither torch nor the models: building the command line
stays fast. Settings no run can use are refused on construction, one line naming the option.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from wsi.errors import RunError


def check_setting(ok: bool, option: str, value, what: str) -> None:
    """A setting out of range (TrainConfig, W2SConfig): one line naming the option, the value and
    what it must be."""
    if not ok:
        raise RunError(f"--{option.replace('_', '-')} {value!r}: must be {what}")


def _help(text: str) -> dict:
    """Field metadata: the help of its `mil train` option (wsi.cli_common.add_config_options)."""
    return {"help": text}


@dataclass
class W2SConfig:
    """Knobs of the correction; `enabled=False` gives the naive baseline. The `mil train --w2s-*`
    options are made from these fields."""

    enabled: bool = True
    alpha_max: float = field(default=0.75, metadata=_help(
        "weight of the student's own hardened labels once ramped (Burns et al.)"))
    warmup: int = field(default=3, metadata=_help("epochs of plain teacher labels before any correction"))
    ramp: int = field(default=5, metadata=_help("epochs over which the correction rises to its maximum"))
    reject_below: float = field(default=0.1, metadata=_help(
        "student probability under which an instance leaves the bag branch's attention"))
    min_keep: int = field(default=8, metadata=_help("never leave a bag with fewer attended instances than this"))
    fp_rate: float = field(default=0.01, metadata=_help(
        "hardening threshold: the student's positive rate on sure negatives"))
    instance_weight: float = field(default=1.0, metadata=_help("lambda_I, weight of the student's loss"))
    distill_weight: float = field(default=0.5, metadata=_help(
        "lambda_D, weight of the attention distillation at full ramp"))
    min_warmup_steps: int = field(default=50, metadata=_help(
        "optimizer steps the student needs before it may overrule anyone (warm-up is stretched to them)"))
    evidence: bool = field(default=True, metadata={
        "help": "gate the teacher's and the hardened labels by negative-bag evidence (mi-SVM-style k-NN)",
        "off_help": "no negative-bag evidence: the teacher's labels as they are (the teacher before negative-bag evidence)"})
    evidence_kind: Literal["auto", "contrast", "knn", "both"] = field(default="auto", metadata=_help(
        "contrast: a calibrated linear classifier of positive- against negative-bag tiles (sees a subtle shift); "
        "knn: k-NN enrichment against the negative bags (sees a distinct type); both: the larger of the two; "
        "auto: knn, joined by the contrast when knn leaves almost nothing unexplained (--w2s-contrast-below)"))
    contrast_below: float = field(default=0.005, metadata=_help(
        "auto: the contrast joins when k-NN leaves fewer than this share of positive-bag tiles unexplained"))
    contrast_radius: int = field(default=1, metadata=_help(
        "the contrast describes a tile by the mean of its features over this many tiles around it (0: the tile)"))
    contrast_rounds: int = field(default=3, metadata=_help(
        "fits of the contrast: the first on inherited labels, each later one on the positives it kept (mi-SVM)"))
    prefit_steps: int = field(default=600, metadata=_help(
        "instance-level steps fitting the student to the evidence before the bag loop, when the contrast is "
        "part of it (0: none)"))
    evidence_k: int = field(default=5, metadata=_help("neighbours per reference class in the evidence"))
    evidence_refs: int = field(default=8192, metadata=_help(
        "reference instances sampled per class (negative bags, positive bags) for the evidence"))
    evidence_quantile: float = field(default=0.99, metadata=_help(
        "evidence is 1/2 at this quantile of the negative bags' own scores (the null)"))
    backoff_tol: float = field(default=0.01, metadata=_help(
        "validation bag loss (nats) by which feedback may be worse than none before it is turned off"))
    backoff_rel: float = field(default=0.05, metadata=_help(
        "... plus this share of the feedback-free validation bag loss"))
    backoff_patience: int = field(default=2, metadata=_help(
        "consecutive epochs of worse validation bag loss before feedback is turned off for good"))

    def __post_init__(self):
        check_setting(0 <= self.alpha_max <= 1, "w2s_alpha", self.alpha_max, "a weight in [0, 1]")
        check_setting(0 <= self.reject_below < 1, "w2s_reject", self.reject_below, "a probability in [0, 1)")
        check_setting(0 <= self.fp_rate < 1, "w2s_fp_rate", self.fp_rate, "a rate in [0, 1)")
        check_setting(0 < self.evidence_quantile < 1, "w2s_evidence_quantile", self.evidence_quantile, "in (0, 1)")
        check_setting(self.evidence_kind in ("auto", "contrast", "knn", "both"), "w2s_evidence_kind",
                      self.evidence_kind, "auto, contrast, knn or both")
        check_setting(0 <= self.contrast_below <= 1, "w2s_contrast_below", self.contrast_below, "a share in [0, 1]")
        for name in ("evidence_k", "evidence_refs", "backoff_patience", "contrast_rounds"):
            check_setting(getattr(self, name) >= 1, f"w2s_{name}", getattr(self, name), "at least 1")
        for name in ("contrast_radius", "prefit_steps", "warmup", "ramp", "min_keep", "min_warmup_steps", "instance_weight", "distill_weight",
                     "backoff_tol", "backoff_rel"):
            check_setting(getattr(self, name) >= 0, f"w2s_{name}", getattr(self, name), "0 or more")

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, steps_per_epoch: int, epochs: int) -> "W2SConfig":
        """The schedule for a run: warm-up lasts at least `min_warmup_steps` optimizer steps (small
        cohorts make few steps per epoch), but never more than a third of the epochs."""
        need = math.ceil(self.min_warmup_steps / max(1, steps_per_epoch))
        warmup = min(max(self.warmup, need), max(self.warmup, epochs // 3))
        return replace(self, warmup=warmup)

    def ramp_at(self, epoch: int) -> float:
        """0 before warm-up ends, then linear to 1 over `ramp` epochs."""
        if not self.enabled or epoch < self.warmup:
            return 0.0
        return min(1.0, (epoch - self.warmup + 1) / max(1, self.ramp))

    def feedback_on(self, epoch: int) -> bool:
        return self.enabled and epoch >= self.warmup


@dataclass
class TrainConfig:
    """Everything that decides a run; saved in RUN_DIR/config.json. The `mil train` options are made
    from these fields, so each default is written here only."""

    model: str = field(default="abmil", metadata=_help("the MIL model, a name of the mil.models registry"))
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "JSON of model hyper-parameters, e.g. '{\"dropout\": 0.1}'"))
    epochs: int = field(default=40, metadata=_help("training epochs per fold (at most)"))
    batch_size: int = field(default=4, metadata=_help(
        "bags per step, padded and bucketed by size: small cohorts still get many optimizer steps"))
    lr: float = field(default=2e-4, metadata=_help("AdamW learning rate (cosine schedule)"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay"))
    patience: int = field(default=10, metadata=_help(
        "epochs without a better validation loss before a fold stops early"))
    min_epochs: int = field(default=5, metadata=_help("no early stop, and no best epoch chosen, before this"))
    max_instances: int | None = field(default=None, metadata=_help(
        "subsample bags larger than this while training (default: whole bags)"))
    seed: int = field(default=0, metadata=_help("seed of splits, batches and weights"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N"))
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=_help(
        "auto: bf16 autocast on a GPU that supports it, fp32 on CPU (where bf16 is slower) and other GPUs"))
    folds: int = field(default=5, metadata=_help(
        "patient-level stratified folds (ignored with a split column in the labels CSV)"))
    val_fraction: float = field(default=0.15, metadata=_help("share of patients held out for validation"))
    extra_weight: float = field(default=0.5, metadata=_help(
        "weight of the model's own auxiliary loss (CLAM instance loss, DSMIL max-instance)"))
    negative_class: str | None = field(default=None, metadata=_help(
        "multi-class tasks: the class of sure-negative bags (normal tissue) for the instance student and --w2s "
        "(default: the one class named like normal, benign, negative ...; none: pure subtyping)"))
    baseline: bool = field(default=True, metadata={
        "help": "with tile labels, also score the inheritance baseline (mil.baseline) on each fold's test slides",
        "off_help": "skip the inheritance baseline (an instance classifier trained on slide labels given to every "
                    "tile) that is otherwise reported next to the student's instance AUC"})
    w2s: W2SConfig = field(default_factory=lambda: W2SConfig(enabled=False))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Settings no run can use are refused before any work (one line naming the option)."""
        for name in ("epochs", "batch_size", "patience", "folds"):
            check_setting(getattr(self, name) >= 1, name, getattr(self, name), "at least 1")
        check_setting(self.min_epochs >= 0, "min_epochs", self.min_epochs, "0 or more")
        check_setting(self.max_instances is None or self.max_instances >= 1, "max_instances", self.max_instances,
                      "at least 1 (or left out for whole bags)")
        check_setting(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number")
        for name in ("weight_decay", "extra_weight"):
            check_setting(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        check_setting(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        check_setting(self.precision in ("auto", "fp32", "bf16"), "precision", self.precision, "auto, fp32 or bf16")
        if not isinstance(self.model_kwargs, dict):
            raise RunError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r}")

    def first_eligible_epoch(self) -> int:
        # With correction on, keep training until the ramp is complete before choosing a best epoch.
        need = self.w2s.warmup + self.w2s.ramp if self.w2s.enabled else 0
        return max(self.min_epochs, need)


@dataclass
class DataConfig:
    """How bags reach the model: the feature cache and the DataLoader. None of these changes what a
    run computes (the same batches, in the same order, from the same features), so they are not run
    settings: a run may resume under other values. The `mil train` options are made from these fields."""

    cache_gb: float | None = field(default=None, metadata=_help(
        "GiB of bag features held in memory; the other bags are read from the store or h5 files whenever "
        "used (default: a quarter of the machine's memory, at most half of what is free; 0: none)"))
    num_workers: int | None = field(default=None, metadata=_help(
        "DataLoader processes building batches ahead of use (default: 4 on a GPU, 0 on CPU)"))
    prefetch: int = field(default=2, metadata=_help("batches each DataLoader worker builds ahead"))

    def __post_init__(self):
        check_setting(self.cache_gb is None or (self.cache_gb >= 0 and math.isfinite(self.cache_gb)), "cache_gb",
                      self.cache_gb, "0 or more GiB")
        check_setting(self.num_workers is None or self.num_workers >= 0, "num_workers", self.num_workers, "0 or more")
        check_setting(self.prefetch >= 1, "prefetch", self.prefetch, "at least 1")

    def loader(self, device) -> dict[str, Any]:
        """BagBatcher's DataLoader keywords on `device` (a torch.device). Workers: as set, else 4 on a
        GPU (building batches must not stall it) and 0 on CPU, where reading a bag from the page cache
        costs a few percent of its training step and a worker would compete with torch's threads for the
        cores (scripts/bench/bench_mil_memory.py). Pinned memory on a GPU, for non-blocking copies."""
        gpu = device.type == "cuda"
        workers = self.num_workers if self.num_workers is not None else 4 if gpu else 0
        return {"num_workers": workers, "prefetch": self.prefetch, "pin_memory": gpu}
