"""The batch-level parts of DAPO's dynamic sampling (`vlm.dynamic`), free of the trainer: which groups carry
signal, picking and joining rows of scored generation batches, the metrics of the kept rows, and the seeded
order that refill prompts are drawn in."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch

from .prompts import VlmError

_ROW_KEYS = ("advantages",)
_RIGHT_PAD = {"completion_ids": "pad", "completion_mask": 0, "old_per_token_logps": 0.0,
              "ref_per_token_logps": 0.0, "sampling_per_token_logps": 0.0, "tool_mask": 1}
_LEFT_PAD = {"prompt_ids": "pad", "prompt_mask": 0}
_SPLIT_PAD = ("token_type_ids", "mm_token_type_ids")          # (B, P + C): prompt part left, completion right
_PER_SAMPLE_LISTS = ("num_images", "num_tiles", "pixel_values", "image_grid_thw", "image_position_ids",
                     "pixel_attention_mask", "spatial_shapes", "image_sizes")


def informative_groups(rewards: torch.Tensor | Sequence[float], num_generations: int, atol: float = 1e-6) -> np.ndarray:
    """(n_groups,) bool: True for the groups of `num_generations` consecutive rewards that do not all agree
    (NaN rewards, unscorable completions, are ignored; a group with fewer than two scored rewards is not
    informative)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if num_generations < 1 or r.numel() % num_generations:
        raise VlmError(f"{r.numel()} rewards do not split into groups of {num_generations}")
    groups = r.view(-1, num_generations)
    out = []
    for g in groups:
        g = g[~torch.isnan(g)]
        out.append(bool(g.numel() >= 2 and (g.max() - g.min()).item() > atol))
    return np.asarray(out, dtype=bool)


def _pad(t: torch.Tensor, length: int, value: float, left: bool) -> torch.Tensor:
    if t.size(1) == length:
        return t
    fill = t.new_full((t.size(0), length - t.size(1), *t.shape[2:]), value)
    return torch.cat([fill, t] if left else [t, fill], dim=1)


def select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The rows `rows` of one scored generation batch (pixel values already split per sample with trl's
    `split_pixel_values_by_grid`). `num_items_in_batch` is left out (recomputed after `concat_batches`)."""
    n = batch["completion_ids"].size(0)
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "num_items_in_batch" or key.startswith("_"):
            continue
        if isinstance(value, list):
            if len(value) != n:
                raise VlmError(f"dynamic sampling: {key} has {len(value)} entries for {n} completions")
            out[key] = [value[i] for i in rows]
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == n:
            out[key] = value.index_select(0, idx.to(value.device))
        else:
            raise VlmError(f"dynamic sampling cannot select rows of the model input {key!r}; run without it "
                           "(--stage grpo) or file an issue")
    out["_prompt_len"] = batch["prompt_ids"].size(1)
    return out


def concat_batches(parts: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One batch from parts made by `select_rows`: prompts left-padded and completions right-padded to the
    longest part (token-type ids split at each part's prompt length and padded the same way), per-sample
    lists joined."""
    P = max(p["prompt_ids"].size(1) for p in parts)
    C = max(p["completion_ids"].size(1) for p in parts)
    out: dict[str, Any] = {}
    for key in parts[0]:
        if key == "_prompt_len":
            continue
        values = [p[key] for p in parts]
        if key in _PER_SAMPLE_LISTS or isinstance(values[0], list):
            out[key] = [v for vs in values for v in vs]
        elif key in _LEFT_PAD:
            fill = pad_token_id if _LEFT_PAD[key] == "pad" else _LEFT_PAD[key]
            out[key] = torch.cat([_pad(v, P, fill, left=True) for v in values])
        elif key in _RIGHT_PAD or key == "importance_sampling_ratio":
            fill = pad_token_id if _RIGHT_PAD.get(key) == "pad" else _RIGHT_PAD.get(key, 0.0)
            if values[0].dim() == 2 and values[0].size(1) == 1:   # a sequence-level ratio: (B, 1)
                out[key] = torch.cat(values)
            else:
                out[key] = torch.cat([_pad(v, C, fill, left=False) for v in values])
        elif key in _SPLIT_PAD:
            halves = [(v[:, :p["_prompt_len"]], v[:, p["_prompt_len"]:]) for v, p in zip(values, parts)]
            out[key] = torch.cat([torch.cat([_pad(a, P, 0, True), _pad(b, C, 0, False)], dim=1) for a, b in halves])
        elif key in _ROW_KEYS or values[0].dim() == 1:
            out[key] = torch.cat(values)
        else:
            raise VlmError(f"dynamic sampling cannot join the model input {key!r}; run without it (--stage grpo)")
    return out



# columns of the per-row statistics (`row_stats`), after one column per reward function
STAT_COLUMNS = ("prompt_length", "completion_length", "truncated", "kept")


def kept_row_metrics(stats: torch.Tensor, weights: torch.Tensor, names: Sequence[str],
                     num_generations: int) -> dict[str, float]:
    """trl's generation metrics (rewards/<name>/mean|std, reward, reward_std, frac_reward_zero_std,
    completions/*) over the rows of `stats` whose `kept` column is 1. `stats`: (rows, len(names) +
    len(STAT_COLUMNS)), the reward of each function then `STAT_COLUMNS`; kept rows come in whole groups of
    `num_generations`. Every value is NaN when no row is kept (trl's `log` then reports None)."""
    from trl.trainer.utils import nanstd

    F = len(names)
    rows = stats[stats[:, F + 3] > 0.5].double()
    nan = float("nan")
    keys = [f"rewards/{n}/{w}" for n in names for w in ("mean", "std")] + [
        "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
        "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length",
        "completions/min_terminated_length", "completions/max_terminated_length"]
    if rows.numel() == 0:
        return dict.fromkeys(keys, nan)
    per_func = rows[:, :F]
    out: dict[str, float] = {}
    for i, n in enumerate(names):
        out[f"rewards/{n}/mean"] = torch.nanmean(per_func[:, i]).item()
        out[f"rewards/{n}/std"] = nanstd(per_func[:, i]).item()
    total = (per_func * weights.double().to(per_func.device).unsqueeze(0)).nansum(1)
    total[torch.isnan(per_func).all(1)] = nan               # unscorable rows, as trl leaves them out
    out["reward"] = torch.nanmean(total).item()
    out["reward_std"] = nanstd(total).item()
    group_std = nanstd(total.view(-1, num_generations), dim=1)
    out["frac_reward_zero_std"] = torch.isclose(group_std, torch.zeros_like(group_std)).double().mean().item()
    length, truncated = rows[:, F + 1], rows[:, F + 2] > 0.5
    out["completions/mean_length"] = length.mean().item()
    out["completions/min_length"] = length.min().item()
    out["completions/max_length"] = length.max().item()
    out["completions/clipped_ratio"] = truncated.double().mean().item()
    term = length[~truncated] if bool((~truncated).any()) else torch.zeros(1, dtype=length.dtype)
    out["completions/mean_terminated_length"] = term.mean().item()
    out["completions/min_terminated_length"] = term.min().item()
    out["completions/max_terminated_length"] = term.max().item()
    return out


def prompt_key(example: dict[str, Any]) -> str:
    """A digest of one training example's content (its text fields and its images' pixels): two examples
    with the same key pose the same prompt."""
    h = hashlib.sha1()
    fields = {k: v for k, v in example.items() if k not in ("images", "image")}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    images = example.get("images") or ([example["image"]] if example.get("image") is not None else [])
    for im in images:
        if hasattr(im, "tobytes"):
            h.update(f"{getattr(im, 'mode', '')}{getattr(im, 'size', '')}".encode())
            h.update(im.tobytes())
        else:
            h.update(str(im).encode())
    return h.hexdigest()


class RefillOrder:
    """The order refill prompts are drawn in: a seeded shuffle of the dataset's indices, reshuffled when
    used up. Every process holds the same order (same seed, same draws), so their draws can be split
    without overlap; `state_dict` / `load_state_dict` carry it through a checkpoint (JSON-safe)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise VlmError("dynamic sampling needs a training set with at least one row")
        self.n = int(n)
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next(self) -> int:
        if not self.order:
            self.order = [int(i) for i in self.rng.permutation(self.n)][::-1]
        return self.order.pop()

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "rng": self.rng.bit_generator.state, "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise VlmError(f"the saved refill order covers {state['n']} rows, the training set has {self.n}")
        self.rng.bit_generator.state = state["rng"]
        self.order = [int(i) for i in state["order"]]


def split_needs(needs: Sequence[int], items: Sequence[Any]) -> list[list[Any]]:
    """`items` cut into consecutive runs of lengths `needs` (one run per process, in rank order)."""
    out, pos = [], 0
    for k in needs:
        out.append(list(items[pos:pos + k]))
        pos += k
    if pos != len(items):
        raise VlmError(f"dynamic sampling: {len(items)} refill keys for {sum(needs)} draws")
    return out


__all__ = ["informative_groups", "select_rows", "concat_batches", "kept_row_metrics", "prompt_key", "RefillOrder",
           "STAT_COLUMNS", "split_needs"]
