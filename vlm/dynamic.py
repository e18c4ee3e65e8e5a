"""DAPO's dynamic sampling on trl's GRPOTrainer (trl has none: trl #3708, #3973, #4764 ask for it).

A group (the `num_generations` completions of one prompt) whose rewards all agree (all right or all wrong)
has zero advantage everywhere: it costs a forward/backward pass and teaches nothing. `DynamicSamplingTrainer`
overrides `GRPOTrainer._generate_and_score_completions` (the one place where a generation batch is
generated, scored and turned into advantages): it drops those groups and generates again for prompts drawn
from the training data until the batch holds as many informative groups as it had, or `max_tries`
generation rounds were spent; then the batch is filled up with dropped groups (their advantages are 0, so
they add nothing to the gradient, but the batch keeps trl's shape). Each step logs
`dynamic_sampling/dropped_groups` (zero-variance groups seen this step, over all tries),
`dynamic_sampling/tries` and `dynamic_sampling/filled_groups` (dropped groups used as filler).

Several processes: the groups are chosen per process (each process's slice of a generation batch holds
whole groups when the local batch is a multiple of `num_generations`, which trl asks for), and every process
runs the same number of tries (the count of missing groups is gathered), so trl's collectives stay aligned.
"""
from __future__ import annotations

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


def _trainer_class():
    from trl import GRPOTrainer
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    class DynamicSamplingTrainer(GRPOTrainer):
        """trl's GRPOTrainer with DAPO's dynamic sampling (module docstring). `max_tries`: generation rounds
        per batch, the first included (1: drop only, never refill)."""

        def __init__(self, *args: Any, max_tries: int = 4, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if max_tries < 1:
                raise VlmError(f"max_tries {max_tries}: give a number >= 1")
            self.max_tries = int(max_tries)
            self._last_rewards: torch.Tensor | None = None
            seed = int(self.args.seed) + 7919 * (1 + self.accelerator.process_index)
            self._refill_rng = np.random.default_rng(seed)
            self._refill_order: list[int] = []

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._last_rewards = rewards          # (global batch, n_funcs): what the advantages were made from
            return rewards

        def _refill_inputs(self, n_prompts: int) -> list[dict[str, Any]]:
            """`n_prompts` rows drawn from the training data (a seeded shuffle, reshuffled when used up),
            each repeated `num_generations` times, as trl's sampler lays out a generation batch."""
            rows = []
            for _ in range(n_prompts):
                if not self._refill_order:
                    self._refill_order = list(self._refill_rng.permutation(len(self.train_dataset)))
                rows.append(self.train_dataset[int(self._refill_order.pop())])
            return [dict(r) for r in rows for _ in range(self.num_generations)]

        def _local_informative(self, n_local: int) -> np.ndarray:
            rewards = (self._last_rewards * self.reward_weights.to(self._last_rewards.device).unsqueeze(0)).nansum(1)
            rewards[torch.isnan(self._last_rewards).all(dim=1)] = torch.nan
            start = self.accelerator.process_index * n_local
            return informative_groups(rewards[start:start + n_local].cpu(), self.num_generations)

        def _generate_and_score_completions(self, inputs):
            if not self.model.training:
                return super()._generate_and_score_completions(inputs)
            G = self.num_generations
            if len(inputs) % G:
                raise VlmError(f"dynamic sampling needs whole groups per process: {len(inputs)} completions are not "
                               f"a multiple of --num-generations {G}; make --batch-size a multiple of it")
            want = len(inputs) // G
            kept: list[dict[str, Any]] = []
            filler: list[dict[str, Any]] = []
            n_kept = n_dropped = n_filler = tries = 0
            batch_inputs = inputs
            while True:
                tries += 1
                out = split_pixel_values_by_grid(super()._generate_and_score_completions(batch_inputs))
                good = self._local_informative(len(batch_inputs))
                n_dropped += int((~good).sum())
                take = [g for g in np.flatnonzero(good)][:want - n_kept]
                if take:
                    kept.append(select_rows(out, [g * G + k for g in take for k in range(G)]))
                    n_kept += len(take)
                bad = [g for g in np.flatnonzero(~good)][:want - n_filler]
                if bad:             # kept as filler in case the tries run out
                    filler.append(select_rows(out, [g * G + k for g in bad for k in range(G)]))
                    n_filler += len(bad)
                missing = torch.tensor([want - n_kept], device=self.accelerator.device)
                if self.accelerator.gather(missing).max().item() <= 0 or tries >= self.max_tries:
                    break
                batch_inputs = self._refill_inputs(len(inputs) // G)
            parts = list(kept)
            n_fill = want - n_kept
            if n_fill > 0:
                pool = concat_batches(filler, self._tokenizer.pad_token_id)
                pool["_prompt_len"] = pool["prompt_ids"].size(1)
                pool["advantages"] = torch.zeros_like(pool["advantages"])
                parts.append(select_rows({**pool, "num_items_in_batch": None}, list(range(n_fill * G))))
            batch = concat_batches(parts, self._tokenizer.pad_token_id)
            mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
            batch["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
            metrics = self._metrics["train"]
            metrics["dynamic_sampling/dropped_groups"].append(float(n_dropped))
            metrics["dynamic_sampling/tries"].append(float(tries))
            metrics["dynamic_sampling/filled_groups"].append(float(max(n_fill, 0)))
            return unsplit_pixel_values_by_grid(batch)

    return DynamicSamplingTrainer


_CLASS: list[type] = []


def __getattr__(name: str):
    # trl is imported on first use only: `import vlm.dynamic` stays cheap for the filter's tests and the CLI
    if name == "DynamicSamplingTrainer":
        if not _CLASS:
            _CLASS.append(_trainer_class())
        return _CLASS[0]
    raise AttributeError(name)


__all__ = ["informative_groups", "select_rows", "concat_batches", "DynamicSamplingTrainer"]
