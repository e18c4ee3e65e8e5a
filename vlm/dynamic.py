"""DAPO's dynamic sampling on trl's GRPOTrainer (trl has none: trl #3708, #3973, #4764 ask for it).

A group (the `num_generations` completions of one prompt) whose accuracy rewards all agree (all right or all
wrong) has no signal for the policy: it costs a forward/backward pass and teaches nothing. With
`filter_on="accuracy"` (DAPO's rule, the default) a group is dropped when its accuracy rewards agree, whatever
the other rewards do; with `filter_on="total"` when its weighted total reward agrees. `DynamicSamplingTrainer`
overrides `GRPOTrainer._generate_and_score_completions` (the one place where a generation batch is generated,
scored and turned into advantages): it drops those groups and generates again for prompts drawn from the
training data until the batch holds as many informative groups as it had, or `max_tries` generation rounds
were spent; then the batch is filled up with dropped groups whose completions are masked out (advantage 0,
completion mask 0): they keep trl's batch shape and add nothing to the loss or to its token count.

Refill prompts come from a seeded order that every process shares (`dynamic_batch.RefillOrder`); a refill
never repeats a prompt already in the step's batch on any process (prompts compared by content), and the
order is saved with each checkpoint (`dynamic_sampling_state.json`) and restored on resume.

Metrics: once per optimizer step, over the kept rows of every process (gathered): trl's reward and completion
metrics, `num_tokens`, and the completions table; `dynamic_sampling/kept_groups`, `dropped_groups`
(zero-signal groups seen, over all tries), `filled_groups` (dropped groups used as masked filler), summed over
processes, and `dynamic_sampling/tries`.

The class relies on trl internals (`TRL_INTERNALS`): `check_trl_internals` names the first one a trl upgrade
changed, and pyproject.toml pins trl to the minor version it was tested with.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from collections import deque
from typing import Any

import numpy as np
import torch

from .dynamic_batch import (STAT_COLUMNS, RefillOrder, concat_batches, informative_groups, kept_row_metrics,
                            prompt_key, select_rows, split_needs)
from .prompts import VlmError

log = logging.getLogger(__name__)

FILTERS = ("accuracy", "total")
STATE_FILE = "dynamic_sampling_state.json"
# GRPOTrainer (and transformers Trainer) methods the trainer overrides or calls, with their parameters
TRL_INTERNALS = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_generate": ("self", "prompts"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_get_output_dir": ("self", "trial"),
}
# attributes of a built GRPOTrainer the trainer reads or rewrites
TRL_ATTRIBUTES = ("_metrics", "_logs", "reward_weights", "reward_func_names", "num_generations", "_tokenizer",
                  "eos_token_ids", "train_dataset", "accelerator", "state")


def check_trl_internals(cls: type | None = None) -> None:
    """Raise a VlmError naming the first GRPOTrainer method of `TRL_INTERNALS` that `cls` (default: trl's
    GRPOTrainer) lacks or whose parameters changed, and the trl helpers that are gone."""
    import trl
    import trl.trainer.utils as tu

    if cls is None:
        from trl import GRPOTrainer as cls
    fix = (f"dynamic sampling (--stage dapo) was written for trl 1.16; install it (pip install 'trl>=1.16,<1.17') "
           f"or train with --stage grpo")
    for name, params in TRL_INTERNALS.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            raise VlmError(f"trl {trl.__version__}: GRPOTrainer.{name} is gone; {fix}")
        found = tuple(inspect.signature(fn).parameters)
        if found != params:
            raise VlmError(f"trl {trl.__version__}: GRPOTrainer.{name}{found} changed from {params}; {fix}")
    for helper in ("split_pixel_values_by_grid", "unsplit_pixel_values_by_grid", "nanstd"):
        if not callable(getattr(tu, helper, None)):
            raise VlmError(f"trl {trl.__version__}: trl.trainer.utils.{helper} is gone; {fix}")


def filter_column(filter_on: str, names: list[str]) -> int | None:
    """The reward column that decides which groups are dropped: None for "total" (the weighted sum), else the
    index of the reward function `filter_on` (e.g. "accuracy" -> "accuracy_reward")."""
    if filter_on == "total":
        return None
    for i, n in enumerate(names):
        if n in (filter_on, f"{filter_on}_reward"):
            return i
    raise VlmError(f"--filter-on {filter_on}: no {filter_on} reward among this run's rewards ({', '.join(names)}); "
                   f"give one of {', '.join(FILTERS)} with a matching reward, or --filter-on total")


def _trainer_class():
    from accelerate.utils import gather_object
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import GRPOTrainer
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    from wsi.runtime import atomic_write_json

    check_trl_internals(GRPOTrainer)

    class DynamicSamplingTrainer(GRPOTrainer):
        """trl's GRPOTrainer with DAPO's dynamic sampling (module docstring). `max_tries`: generation rounds
        per batch, the first included (1: drop only, never refill); `filter_on`: "accuracy" or "total"."""

        def __init__(self, *args: Any, max_tries: int = 4, filter_on: str = "accuracy", **kwargs: Any):
            super().__init__(*args, **kwargs)
            missing = [a for a in TRL_ATTRIBUTES if not hasattr(self, a)]
            if missing:
                raise VlmError(f"this trl's GRPOTrainer has no {', '.join(missing)}; dynamic sampling needs trl 1.16")
            if max_tries < 1:
                raise VlmError(f"max_tries {max_tries}: give a number >= 1")
            self.max_tries = int(max_tries)
            self.filter_on = str(filter_on)
            self._filter_col = filter_column(self.filter_on, list(self.reward_func_names))
            self._last_rewards: torch.Tensor | None = None
            self._round_rows: torch.Tensor | None = None
            # the same seed on every process: the processes split one shared order's draws
            self._refills = RefillOrder(len(self.train_dataset), int(self.args.seed) + 7919)

        # ---- trl hooks: what one generation round produced -------------------------------------------
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._last_rewards = rewards          # (global batch, n_funcs): what the advantages were made from
            return rewards

        def _generate(self, prompts):
            out = super()._generate(prompts)
            prompt_ids, completion_ids, tool_mask = out[0], out[1], out[2]
            # the per-row lengths trl logs (`_generate`), kept so the step's metrics cover the kept rows only
            ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            lengths = [sum(m) for m in tool_mask] if tool_mask is not None else [len(c) for c in completion_ids]
            self._round_rows = torch.tensor([[len(p), n, float(c[-1] not in ends) if len(c) else 0.0]
                                             for p, n, c in zip(prompt_ids, lengths, completion_ids)],
                                            dtype=torch.float64)
            return out

        # ---- checkpoints: the refill order ------------------------------------------------------------
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                step = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                folder = os.path.join(self._get_output_dir(trial=trial), step)
                atomic_write_json(os.path.join(folder, STATE_FILE), {"refill_order": self._refills.state_dict()})

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
            if path and os.path.isfile(path):
                with open(path) as f:
                    self._refills.load_state_dict(json.load(f)["refill_order"])
            elif path:
                log.warning("%s: no %s; refill prompts start a fresh order", checkpoint, STATE_FILE)

        # ---- one round's pieces ---------------------------------------------------------------------------
        def _local_rewards(self, n_local: int) -> torch.Tensor:
            start = self.accelerator.process_index * n_local
            return self._last_rewards[start:start + n_local].detach().double().cpu()

        def _informative(self, local_rewards: torch.Tensor) -> np.ndarray:
            if self._filter_col is not None:
                return informative_groups(local_rewards[:, self._filter_col], self.num_generations)
            w = self.reward_weights.detach().double().cpu()
            total = (local_rewards * w.unsqueeze(0)).nansum(1)
            total[torch.isnan(local_rewards).all(dim=1)] = torch.nan
            return informative_groups(total, self.num_generations)

        def _take_logs(self) -> dict[str, Any]:
            """The completions-table entries trl added since the last call (every process's rows, rank order),
            leaving trl's tables empty."""
            taken: dict[str, Any] = {}
            for key, value in self._logs.items():
                if isinstance(value, deque):
                    taken[key] = list(value)
                    value.clear()
                else:
                    taken[key] = {k: list(v) for k, v in value.items()}
                    for v in value.values():
                        v.clear()
            return taken

        def _refill_inputs(self, n_prompts: int, used: set[str]) -> list[dict[str, Any]] | None:
            """`n_prompts` training rows for this process, each repeated `num_generations` times (trl's
            layout), none of whose prompts is in `used` or drawn by another process (`used` grows by the
            drawn prompts). All processes draw from the shared order and see every draw's key, so they take
            the same decisions; None (on every process) when the training set has too few other prompts."""
            W, rank = self.accelerator.num_processes, self.accelerator.process_index
            needs, mine, examined = [n_prompts] * W, [], 0
            while any(needs):
                if examined >= 2 * self._refills.n:
                    return None
                drawn = split_needs(needs, [self._refills.next() for _ in range(sum(needs))])
                examined += sum(needs)
                rows = [dict(self.train_dataset[i]) for i in drawn[rank]]
                keys = [prompt_key(r) for r in rows]
                all_keys = split_needs(needs, gather_object(keys) if W > 1 else keys)
                for r, ks in enumerate(all_keys):
                    for j, k in enumerate(ks):
                        if k not in used:
                            used.add(k)
                            needs[r] -= 1
                            if r == rank:
                                mine.append(rows[j])
            return [x for x in mine for _ in range(self.num_generations)]

        # ---- the step ---------------------------------------------------------------------------------------
        def _generate_and_score_completions(self, inputs):
            if not self.model.training:
                return super()._generate_and_score_completions(inputs)
            G, acc = self.num_generations, self.accelerator
            if len(inputs) % G:
                raise VlmError(f"dynamic sampling needs whole groups per process: {len(inputs)} completions are not "
                               f"a multiple of --num-generations {G}; make --batch-size a multiple of it")
            n_local, want = len(inputs), len(inputs) // G
            metrics = self._metrics["train"]
            marks = {k: len(v) for k, v in metrics.items()}
            tokens_before = self.state.num_input_tokens_seen
            self._take_logs()           # the table shows this step's kept rows only (trl: the latest batch)
            used: set[str] | None = None        # the step's prompts, made at the first refill
            kept, filler, kept_stats, filler_stats, kept_logs = [], [], [], [], []
            n_kept = n_dropped = n_filler = tries = 0
            batch_inputs = inputs
            while True:
                tries += 1
                out = split_pixel_values_by_grid(super()._generate_and_score_completions(batch_inputs))
                rewards = self._local_rewards(n_local)
                stats = torch.cat([rewards, self._round_rows], dim=1)
                good = self._informative(rewards)
                n_dropped += int((~good).sum())
                take = list(np.flatnonzero(good))[:want - n_kept]
                rows_taken = [g * G + k for g in take for k in range(G)]
                if take:
                    kept.append(select_rows(out, rows_taken))
                    kept_stats.append(stats[rows_taken])
                    n_kept += len(take)
                bad = list(np.flatnonzero(~good))[:want - n_filler]
                if bad:             # kept as filler in case the tries run out
                    rows_bad = [g * G + k for g in bad for k in range(G)]
                    filler.append(select_rows(out, rows_bad))
                    filler_stats.append(stats[rows_bad])
                    n_filler += len(bad)
                flags = torch.zeros(n_local, dtype=torch.long, device=acc.device)
                flags[rows_taken] = 1
                kept_logs.append((self._take_logs(), acc.gather(flags).bool().tolist()))
                missing = torch.tensor([want - n_kept], device=acc.device)
                if acc.gather(missing).max().item() <= 0 or tries >= self.max_tries:
                    break
                if used is None:            # every process gets here together: the decision above is shared
                    local_keys = [prompt_key(x) for x in inputs[::G]]
                    used = set(gather_object(local_keys) if acc.num_processes > 1 else local_keys)
                refill = self._refill_inputs(want, used)
                if refill is None:
                    log.info("dynamic sampling: the training set has no more prompts for this batch")
                    break
                batch_inputs = refill
            parts, stat_parts = list(kept), list(kept_stats)
            n_fill = want - n_kept
            if n_fill > 0:
                pool = concat_batches(filler, self._tokenizer.pad_token_id)
                pool["_prompt_len"] = pool["prompt_ids"].size(1)
                pool["advantages"] = torch.zeros_like(pool["advantages"])
                # masked out: no loss, no share of the token count that normalises the loss
                pool["completion_mask"] = torch.zeros_like(pool["completion_mask"])
                parts.append(select_rows({**pool, "num_items_in_batch": None}, list(range(n_fill * G))))
                stat_parts.append(torch.cat(filler_stats)[:n_fill * G])
            batch = concat_batches(parts, self._tokenizer.pad_token_id)
            mask = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
            batch["num_items_in_batch"] = acc.gather(mask.sum()).sum()
            stats = torch.cat(stat_parts)
            stats = torch.cat([stats, torch.zeros(len(stats), 1, dtype=stats.dtype)], dim=1)
            stats[:n_kept * G, -1] = 1.0
            self._log_step(acc.gather(stats.to(acc.device)).cpu(), marks, tokens_before, kept_logs,
                           [n_kept, n_dropped, max(n_fill, 0)], tries)
            return unsplit_pixel_values_by_grid(batch)

        def _log_step(self, stats, marks, tokens_before, kept_logs, counts, tries) -> None:
            """One entry per metric for the step: trl's generation metrics over the kept rows of every
            process (`stats`, gathered), other metrics trl logged during the rounds averaged over them, the
            completions table of the kept rows, the dynamic-sampling counts summed over processes."""
            acc, metrics = self.accelerator, self._metrics["train"]
            rounds: dict[str, list[float]] = {}
            for key, values in metrics.items():
                rounds[key] = values[marks.get(key, 0):]
                del values[marks.get(key, 0):]
            names = list(self.reward_func_names)
            kept_values = kept_row_metrics(stats, self.reward_weights.detach().cpu(), names, self.num_generations)
            for key, values in rounds.items():
                if key not in kept_values and key != "num_tokens" and values:
                    finite = [v for v in values if not np.isnan(v)]
                    metrics[key].append(float(np.mean(finite)) if finite else float("nan"))
            for key, value in kept_values.items():
                metrics[key].append(value)
            F = len(names)
            kept = stats[stats[:, F + STAT_COLUMNS.index("kept")] > 0.5]
            self.state.num_input_tokens_seen = tokens_before + int((kept[:, F] + kept[:, F + 1]).sum().item())
            metrics["num_tokens"] = [self.state.num_input_tokens_seen]
            summed = acc.gather(torch.tensor(counts, device=acc.device)).view(-1, 3).sum(0)
            n_kept, n_dropped, n_filled = summed.tolist()
            metrics["dynamic_sampling/kept_groups"].append(float(n_kept))
            metrics["dynamic_sampling/dropped_groups"].append(float(n_dropped))
            metrics["dynamic_sampling/filled_groups"].append(float(n_filled))
            metrics["dynamic_sampling/tries"].append(float(tries))
            self._keep_logs(kept_logs)

        def _keep_logs(self, rounds: list[tuple[dict[str, Any], list[bool]]]) -> None:
            """trl's completions table: the kept rows of each round (`_take_logs` of the round, global flags)."""
            def kept_only(values: list, flags: list[bool]) -> list:
                return [v for v, f in zip(values, flags) if f] if len(values) == len(flags) else []

            for key, value in self._logs.items():
                if isinstance(value, deque):
                    for taken, flags in rounds:
                        value.extend(kept_only(taken[key], flags))
                else:
                    for taken, flags in rounds:
                        for name, entries in taken[key].items():
                            value[name].extend(kept_only(entries, flags))

    return DynamicSamplingTrainer


_CLASS: list[type] = []


def __getattr__(name: str):
    # trl is imported on first use only: `import vlm.dynamic` stays cheap for the filter's tests and the CLI
    if name == "DynamicSamplingTrainer":
        if not _CLASS:
            _CLASS.append(_trainer_class())
        return _CLASS[0]
    raise AttributeError(name)


__all__ = ["informative_groups", "select_rows", "concat_batches", "kept_row_metrics", "check_trl_internals",
           "filter_column", "FILTERS", "STATE_FILE", "TRL_INTERNALS", "DynamicSamplingTrainer"]
